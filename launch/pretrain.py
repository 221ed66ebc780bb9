"""Pretrains the MoCo encoder of a config (resumes from WORKDIR/pretrain/checkpoints).

  python launch/pretrain.py --config configs/digits.py --workdir workdir/digits
"""

from jaxattr import cli, pretrain

if __name__ == "__main__":
  cli.launch(pretrain.run, __doc__, multi_process=True)
