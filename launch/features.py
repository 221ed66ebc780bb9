"""Extracts features of both splits with the encoder of a config into WORKDIR/features.

The encoder is `--config.encoder.checkpoint=PATH` (e.g. written by launch/convert.py) or, when
empty, the one pretrained into WORKDIR/pretrain/encoder.
On the CPU backend XLA_FLAGS defaults to jaxattr.xla_flags.INFERENCE_CPU_FLAGS unless set.

  python launch/features.py --config configs/digits.py --workdir workdir/digits
"""

from jaxattr import cli, features, xla_flags

if __name__ == "__main__":
  # Inference only: oneDNN on top of the training flags (~1.3x faster feature extraction).
  cli.launch(features.run, __doc__, cpu_flags=xla_flags.INFERENCE_CPU_FLAGS, multi_process=True)
