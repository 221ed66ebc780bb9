"""The linear datamodeling score (LDS) of a config's methods (`jaxattr.counterfactual.lds`).

  python launch/lds.py --config configs/digits.py --workdir workdir/digits

Trains lds.num_subsets x lds.models_per_subset models on random subsets of lds.alpha of the
training set (one trainer call per wave; a killed run resumes at its first untrained wave),
records the correct-class margin of every LDS target, and scores every method of lds.methods:
'trak', 'esvm', 'l2', 'cosine' (the feature methods need WORKDIR/features) or an external score
matrix 'name=PATH.npy' [targets, train]:

  python launch/lds.py --config configs/cifar10.py:cpu --workdir workdir/cifar10-cpu \
      --config.lds.methods=esvm,l2,dattri=/path/scores.npy

Writes WORKDIR/lds/{summary.json, per_target.npz, scatter.png, margins.npz, subsets.npy,
targets.npy, <method>.scores.npy}.
"""

from jaxattr import cli
from jaxattr.counterfactual import lds

if __name__ == "__main__":
  cli.launch(lds.run, __doc__, multi_process=True)
