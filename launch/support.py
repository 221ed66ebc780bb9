"""Removal and mislabel support of a config's attribution methods (REFERENCE.md section 2).

  python launch/support.py --config configs/digits.py --workdir workdir/digits

Another method's reference-layout top-k matrix (int64 [n_test, >= k] of train indices, one row
per test index) is one more `support.methods` entry, 'name=PATH', with explicit targets:

  python launch/support.py --config configs/cifar10.py --workdir workdir/cifar10 \
      --config.support.methods=esvm,trak=/path/trak_topk.npy \
      --config.support.targets=/path/targets.txt

Reads WORKDIR/attribution/<method>/ and writes WORKDIR/support/<metric>/<method>/{results.jsonl,
summary.json, curve.png, state.json} and WORKDIR/support/<metric>/curves.png; an interrupted run
resumes where it stopped.
"""

from jaxattr import cli
from jaxattr.counterfactual import support

if __name__ == "__main__":
  cli.launch(support.run, __doc__, multi_process=True)
