r"""Projected accelerator-hours of the paper-style ImageNet support run for each recipe.

The run: 30 targets x (1 + 7 budget) x 5 models x 2 metrics = 2,400 ResNet-18s per method (plus
4 full-data flip models), each trained on ImageNet's 1,281,167 training images for the recipe's
epochs at its crop ramp. Per-model work = sum over epochs of images x the training FLOPs per image
at that epoch's crop, counted by XLA's cost analysis of jaxattr's model (3x the forward).

Device time = work / (peak x MFU). MFU anchor: ffcv-imagenet's rn18 16-epoch run takes 35 min on
one A100 (REFERENCE.md) for ~1.4e17 FLOP (its 160-192 px ramp, counted the same way at 224-px
scaled FLOPs), i.e. ~21% of the A100's 312 bf16 TFLOP/s. Small 40-48 px images leave the
accelerator less work per kernel, so the table also shows a pessimistic 10% MFU;
`launch/gpu_check.sh` measures the real one (benchmark_imagenet_train --mode=gpu).

  python3 -m benchmarks.imagenet_projection
"""

from __future__ import annotations

from absl import app, flags

from benchmarks import bench
from jaxattr import config, xla_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_results/imagenet_projection.json", "JSON result path.")

IMAGES = 1_281_167
MODELS = 30 * (1 + 7) * 5 * 2  # per method: targets x (all-k check + budget) x tests x metrics
FLIP_MODELS = 4
# bf16 dense peaks (TFLOP/s): A100, H200 (8 of them), TPU v5e (256 chips).
PEAKS = {"1 A100": 312.0, "8 H200": 8 * 989.0, "v5e-256": 256 * 197.0}
REFERENCE_A100_HOURS = 700.0  # the estimate of the reference recipe, per method & metric


def main(argv):
  del argv
  xla_flags.use_fast_cpu_flags()
  from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top

  train_flops = ensemble.train_flops

  # The anchor: ffcv's rn18 at its own resolutions (torchvision stem), 16 epochs, 35 A100-min.
  ffcv = config.imagenet_recipe("ffcv_rn18_16")
  ffcv.stem = "imagenet"
  ffcv.cpu_ops = "off"  # accelerators run the plain convolutions
  ffcv_res = [160] * 12 + [192] * 4  # its get_resolution: 160 to epoch 11, 192 from epoch 12
  ffcv_flops = sum(IMAGES * train_flops(ffcv, r, 1000) for r in ffcv_res)
  mfu_anchor = ffcv_flops / (35 * 60) / 1e12 / PEAKS["1 A100"]
  rows = []
  for name in config.RECIPES:
    cfg = config.imagenet_recipe(name)
    cfg.cpu_ops = "off"
    crops = [ensemble.crop_size(cfg, ep, 64) for ep in range(int(cfg.epochs))]
    per_model = sum(IMAGES * train_flops(cfg, r, 1000) for r in crops)
    total = per_model * (MODELS + FLIP_MODELS)
    for mfu in (mfu_anchor, 0.10):
      row = {
          "recipe": name,
          "crops": f"{crops[0]}-{crops[-1]}",
          "pflop_per_model": per_model / 1e15,
          "mfu_pct": 100 * mfu,
      }
      for where, peak in PEAKS.items():
        hours = total / (peak * 1e12 * mfu) / 3600
        chips = {"1 A100": 1, "8 H200": 8, "v5e-256": 256}[where]
        row[f"{where} wall h"] = hours
        row[f"{where} chip-h"] = hours * chips
      row["A100-h / 700 (2 metrics = 1400)"] = row["1 A100 chip-h"] / (2 * REFERENCE_A100_HOURS)
      rows.append(row)
  print(f"ffcv rn18 16 epochs at 160-192 px: {ffcv_flops / 1e15:.0f} PFLOP -> MFU anchor "
        f"{100 * mfu_anchor:.1f}% of an A100; run = {MODELS} + {FLIP_MODELS} models per method")
  print(bench.format_table(rows))
  bench.write_result(
      FLAGS.out, "imagenet_projection", rows, {
          "images": IMAGES,
          "models_per_method": MODELS,
          "flip_models": FLIP_MODELS,
          "peaks_tflops": PEAKS,
          "mfu_anchor": mfu_anchor,
          "ffcv_pflop": ffcv_flops / 1e15
      })
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
