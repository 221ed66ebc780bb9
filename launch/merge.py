"""Assembles the shards of a job array of launch/attribute.py or launch/support.py.

On a cluster without a coordinator, run shard i of n as its own single-process job (each holds
its own lock on the shared workdir), then merge once all are done, with the same config:

  python launch/attribute.py --config configs/imagenet.py --workdir W \
      --config.shard.index=$i --config.shard.count=8      # i = 0..7, e.g. a SLURM array
  python launch/merge.py --config configs/imagenet.py --workdir W --config.shard.count=8

Attribution shards take every count-th chunk of the targets and merge into
WORKDIR/attribution/<method>/; support shards search a contiguous block of the targets each and
merge into WORKDIR/support/<metric>/<method>/ (the shards of one stage must all have finished
before the next stage's job array starts).

The merge refuses shards that have not run or not finished (naming them) and shards computed
with another config or data; the result equals one run's.
"""

from jaxattr import cli, pipeline

if __name__ == "__main__":
  cli.launch(pipeline.merge_shards, __doc__)
