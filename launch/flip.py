"""Flip classes of the mislabel support: an ensemble trained on the full data, its mean softmax.

  python launch/flip.py --config configs/flip.py:digits --workdir workdir/flip_digits
  python launch/flip.py --config configs/flip.py --workdir workdir/flip_cifar10
"""

from jaxattr import cli
from jaxattr.counterfactual import flip

if __name__ == "__main__":
  cli.launch(flip.run, __doc__, multi_process=True)
