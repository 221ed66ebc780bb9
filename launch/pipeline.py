"""The main job of a config: pretrain (or load) the encoder -> features -> attribution ->
support -> report (`jaxattr.pipeline`).

  python launch/pipeline.py --config configs/digits.py --workdir workdir/digits
"""

from jaxattr import cli, pipeline

if __name__ == "__main__":
  cli.launch(pipeline.run, __doc__, multi_process=True)
