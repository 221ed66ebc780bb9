"""Assembles the shards of a job array of launch/attribute.py into WORKDIR/attribution/<method>/.

On a cluster without a coordinator, run shard i of n as its own single-process job (each holds
its own lock on the shared workdir), then merge once all are done, with the same config:

  python launch/attribute.py --config configs/imagenet.py --workdir W \
      --config.shard.index=$i --config.shard.count=8      # i = 0..7, e.g. a SLURM array
  python launch/merge.py --config configs/imagenet.py --workdir W --config.shard.count=8

The merge refuses shards that have not run or not finished (naming them) and shards computed
with another config or data; the result equals one run's.
"""

from jaxattr import cli
from jaxattr.attribute import attribution

if __name__ == "__main__":
  cli.launch(attribution.merge, __doc__)
