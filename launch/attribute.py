"""Top-k attribution (ESVM / l2 / cosine) of a config's test targets, from WORKDIR/features.

Writes WORKDIR/attribution/<method>/ (`jaxattr.attribute.attribution.run`); a killed run restarts
at its first unfinished chunk. Any field of the config's `attribution` section can be overridden:

  python launch/attribute.py --config configs/digits.py --workdir workdir/digits \
      --config.attribution.k=64

Runs as several processes too (`jaxattr.distributed`): each solves its share of the chunks into
WORKDIR/attribution/<method>/chunks, then process 0 writes the result assembled from them. Or as
a job array of separate single-process jobs: `--config.shard.index=i --config.shard.count=n`
each, then launch/merge.py.
"""

from jaxattr import cli
from jaxattr.attribute import attribution

if __name__ == "__main__":
  cli.launch(attribution.run, __doc__, multi_process=True, shard_lock=True)
