"""Extracts features of both splits with the encoder of a config into WORKDIR/features.

The encoder is `--config.encoder.checkpoint=PATH` (e.g. written by launch/convert.py) or, when
empty, the one pretrained into WORKDIR/pretrain/encoder.

  python launch/extract_features.py --config configs/digits.py --workdir workdir/digits
"""

from jaxattr import cli, features

if __name__ == "__main__":
  cli.launch(features.run, __doc__)
