"""Removal and mislabel support of a config's attribution methods (REFERENCE.md section 2).

  python launch/support.py --config configs/digits.py --workdir workdir/digits

Another method's reference-layout top-k matrix (int64 [n_test, >= k] of train indices, one row
per test index) is one more `support.methods` entry, 'name=PATH', with explicit targets:

  python launch/support.py --config configs/cifar10.py --workdir workdir/cifar10 \
      --config.support.methods=esvm,pytrak=/path/trak_topk.npy \
      --config.support.targets=/path/targets.txt

Reads WORKDIR/attribution/<method>/ and writes WORKDIR/support/<metric>/<method>/{results.jsonl,
summary.json, curve.png, state.json} and WORKDIR/support/<metric>/curves.png; an interrupted run
resumes where it stopped.

On a cluster without a coordinator, a job array: shard i of n searches its block of the targets
into WORKDIR/support/<metric>/<method>/shard-i-of-n/, then launch/merge.py assembles them:

  python launch/support.py --config C --workdir W --config.shard.index=$i --config.shard.count=4
  python launch/merge.py --config C --workdir W --config.shard.count=4
"""

from jaxattr import cli
from jaxattr.counterfactual import support

if __name__ == "__main__":
  cli.launch(support.run, __doc__, multi_process=True, shard_lock=True)
