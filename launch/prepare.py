"""Decodes both splits of a 'folder:DIR' tree once into the small resident copy,
WORKDIR/resident/{train,test}_<side>.npy (uint8 [N, S, S, 3], memory-mappable) plus labels.

Resumes a killed run; skipped when WORKDIR/resident matches the data and `config.resident`.

  python launch/prepare.py --config configs/imagenet.py:tiny --workdir workdir/imagenet_tiny
  python launch/prepare.py --config configs/imagenet.py --workdir workdir/imagenet \
      --config.resident.side=64 --config.resident.workers=16
"""

from jaxattr import cli, resident

if __name__ == "__main__":
  cli.launch(resident.run, __doc__)
