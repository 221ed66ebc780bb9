r"""Benchmark: jaxattr's ensemble trainer vs the PyTorch reference loop (ResNet-9 recipe).

Modes:
  speed (default): M models with jaxattr (each --formulations entry, plus M=1 for the
    parallel-vs-alone check) and the same M models trained one after another by a PyTorch loop
    with the same recipe (model, SGD, schedule, label smoothing, batch size, augmentation on
    in-memory tensors). Prints per-model time per epoch, the ratio torch / jaxattr, FLOP/s and
    MFU against --peak_tflops.
  gpu: the accelerator check. --num_models models (default 32) trained at once at full width
    for 24 epochs on the CIFAR-10 JPEG set; prints every model's test accuracy and the cost per
    model in seconds, FLOP/s and MFU; optionally --torch_models reference runs for the ratio.

CPU (this project's 2-core dev box; s_per_model_epoch counts training epochs only on both
sides (augmentation included on both); jaxattr's total_s_per_model adds model init and
predicting 500 eval images, which the torch loop does not do):
  python3 -m benchmarks.benchmark_train --width=0.25 --train_examples=5120 --epochs=2 \
    --num_models=2 --repeats=2                                          # ~2 min
  python3 -m benchmarks.benchmark_train --width=0.5 --train_examples=2560 --epochs=2 \
    --num_models=2 --repeats=1                                          # ~2 min
  python3 -m benchmarks.benchmark_train --width=1 --train_examples=1024 --epochs=2 \
    --num_models=2 --repeats=1                                          # ~3 min
Measured (load ~2): torch / jaxattr per model-epoch 0.81 at width 0.25, 1.15 at 0.5, 1.13 at 1.
On CPU the launcher sets XLA_FLAGS to jaxattr.xla_flags.FAST_CPU_FLAGS unless XLA_FLAGS is
already set or --nofast_cpu_flags is given (pass XLA_FLAGS= to measure XLA's defaults).
H200, (1) which formulation wins, 2 epochs of 32 full-width models each (~2-3 min):
  python3 -m benchmarks.benchmark_train --mode=gpu --num_models=32 --epochs=2 \
    --formulations=vmap,map --data=folder:../shared/data/cifar10-jpeg.tar.gz
(2) the 24-epoch accuracy and s/model with the winner (~5 min at the 8 s/model goal):
  python3 -m benchmarks.benchmark_train --mode=gpu --num_models=32 --formulations=map \
    --data=folder:../shared/data/cifar10-jpeg.tar.gz
In gpu mode s_per_model is the steady-state cost (epochs 2..E; the first compiles);
total_s_per_model includes compilation and evaluation. The timings come from the
`ensemble.RunStats` that `Trainer.train_and_predict` returns.

Measurements behind the trainer's design (2-core CPU, jax 0.10.2, float32):
* formulation (`ensemble.FORMULATION_BY_BACKEND`): width 0.25, 4 models, jaxattr.xla_flags set:
  'map' 1.64 s per model-epoch of 4 steps vs 'vmap' 3.42 (2.1x; 3-5.6x with XLA's default
  flags), vmap's batched convolutions being grouped convolutions that XLA:CPU runs slowly.
  GPU/TPU: not measured yet ('map' assumed; --mode=gpu --formulations=vmap,map decides).
* a training step inside a while loop (lax.scan over steps or models) ran ~50x slower on XLA:CPU
  than the same step jitted alone, a length-1 scan included: hence one jitted step per host
  iteration, the CPU model loop unrolled, and no scan for a single local model.
* a training step inside lax.cond (a nested computation) ran many times slower on XLA:CPU than
  computing it and selecting, so skipped steps are computed and discarded.
* wave size on XLA:CPU, configs/digits.py's support shapes (width 0.125, 16x16, batch 128, 6
  epochs on 1,438 images, 'map'), one Trainer for a 3-model flip ensemble then a 96-model round:
  models_per_wave 8: 11.2 + 84.2 s and 10.2 + 85.9 s (~28 s of it compiling: the unrolled
  8-model step alone ~18 s); models_per_wave 1: 7.2 + 51.1 s and 7.0 + 47.9 s (5.4 s compiling,
  one program for both calls); the same models bit for bit. A model-step costs 8-11 ms either
  way (0.89 GFLOP: ~100 GFLOP/s, a fifth of a float32 matmul's rate here; fwd+bwd is 95% of it).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import bench
from benchmarks.torch_reference import torch_resnet9
from jaxattr import augment, config, xla_flags
from jaxattr.counterfactual import ensemble
from jaxattr.models.resnet9 import resnet9_train_flops

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "speed", ["speed", "gpu"], "What to measure (see the module doc).")
flags.DEFINE_string(
    "data", "synthetic", "'synthetic' (random uint8 images) or a jaxattr.data "
    "source such as folder:../shared/data/cifar10-jpeg.tar.gz.")
flags.DEFINE_integer("train_examples", 0, "Use the first n training images (0 = all; "
                     "synthetic: 0 means 50,000).")
flags.DEFINE_integer("num_models", 0, "M models trained at once (0: 4 in speed mode, 32 in gpu).")
flags.DEFINE_float("width", 0.0, "ResNet-9 width multiplier (0: 0.25 on CPU, 1 elsewhere).")
flags.DEFINE_integer("epochs", 0, "Epochs (0: 1 in speed mode, 24 in gpu mode).")
flags.DEFINE_integer("batch_size", 512, "Images per step.")
flags.DEFINE_list("formulations", ["auto"], "jaxattr formulations to time (auto, vmap, map).")
flags.DEFINE_enum("compute_dtype", "auto", ["auto", "float32", "bfloat16"], "jaxattr compute.")
flags.DEFINE_integer("torch_models", -1, "Reference models to train (-1: M in speed mode, 0 in "
                     "gpu mode).")
flags.DEFINE_float(
    "peak_tflops", 0.0, "Backend peak for MFU (0: 790 on GPU = the project's "
    "H200 bf16 dense figure; on CPU a float32 matmul measured here).")
flags.DEFINE_integer("repeats", 2, "Timed repeats (median) in speed mode.")
flags.DEFINE_bool(
    "fast_cpu_flags", True, "On the CPU backend, set jaxattr.xla_flags."
    "FAST_CPU_FLAGS in XLA_FLAGS when XLA_FLAGS is unset.")
flags.DEFINE_enum("cpu_ops", "auto", ["auto", "on", "off"], "The trainer's cpu_ops setting.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads on CPU (0 = all cores, the "
                     "threads XLA:CPU uses).")
flags.DEFINE_string("out", "bench_results/train.json", "JSON result path.")


def load_data(source: str, limit: int):
  """(train Dataset, test images, test labels); synthetic data when source == 'synthetic'."""
  from jaxattr import data  # pylint: disable=g-import-not-at-top

  if source == "synthetic":
    rng = np.random.default_rng(0)
    n = limit or 50_000
    train = data.Dataset(images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                         labels=rng.integers(0, 10, n).astype(np.int32), class_names=[
                             str(i) for i in range(10)
                         ], index=np.arange(n), source="synthetic", split="train")
    return train, train.images[:500], train.labels[:500]
  train = data.load(source, "train")
  if limit:
    train = train.subset(np.arange(limit))
  test = data.load(source, "test")
  return train, test.images, test.labels


# ---------------------------------------------------------------------------------------------
# The PyTorch reference loop (FFCV's ResNet-9 recipe), data in memory.


def torch_train(images: np.ndarray, labels: np.ndarray, cfg, seed: int, device: str, epochs: int):
  """Trains one reference ResNet-9; returns the model. Images uint8 [N, H, W, 3]."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  gen = torch.Generator(device=device).manual_seed(seed)
  x_all = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
  y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
  n = len(images)
  bs = int(cfg.batch_size)
  model = torch_resnet9(float(cfg.width)).to(device)
  if device == "cuda":
    model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=float(cfg.momentum),
                        weight_decay=float(cfg.weight_decay))
  ipe = n // bs
  sched = np.interp(np.arange((epochs + 1) * ipe), [0, cfg.peak_epoch * ipe, cfg.epochs * ipe],
                    [0, cfg.peak_lr, 0])
  lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: sched[it])
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing))
  mean = torch.tensor(augment.CIFAR_MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(augment.CIFAR_STD, device=device).view(1, 3, 1, 1)
  ar = torch.arange(32, device=device)
  amp = device == "cuda"
  for _ in range(epochs):
    perm = torch.randperm(n, generator=gen, device=device)
    for s in range(n // bs):
      idx = perm[s * bs:(s + 1) * bs]
      x = x_all[idx].float()
      # Flip, translate 2 with zero padding, Cutout 8 with the mean, normalise (per batch).
      flip = torch.rand(bs, generator=gen, device=device) < 0.5
      x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
      xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
      dy = torch.randint(0, 5, (bs,), generator=gen, device=device)
      dx = torch.randint(0, 5, (bs,), generator=gen, device=device)
      rows = (ar[None] + dy[:, None])[:, None, :, None]
      cols = (ar[None] + dx[:, None])[:, None, None, :]
      bidx = torch.arange(bs, device=device).view(-1, 1, 1, 1)
      cidx = torch.arange(3, device=device).view(1, -1, 1, 1)
      x = xp[bidx, cidx, rows, cols]
      cy = torch.randint(0, 25, (bs, 1), generator=gen, device=device)
      cx = torch.randint(0, 25, (bs, 1), generator=gen, device=device)
      inside = (((ar[None] >= cy) & (ar[None] < cy + 8))[:, :, None] &
                ((ar[None] >= cx) & (ar[None] < cx + 8))[:, None, :])
      x = torch.where(inside[:, None], mean, x)
      x = (x - mean) / std
      if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
      with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
        loss = loss_fn(model(x), y_all[idx])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      lr_sched.step()
  if device == "cuda":
    torch.cuda.synchronize()
  return model


# ---------------------------------------------------------------------------------------------


def main(argv):
  del argv
  # Before the first JAX computation: XLA reads XLA_FLAGS when the backend starts.
  set_flags = xla_flags.use_fast_cpu_flags() if FLAGS.fast_cpu_flags else None
  if set_flags:
    logging.info("XLA_FLAGS=%s (jaxattr.xla_flags)", set_flags)
  backend = jax.default_backend()
  gpu_mode = FLAGS.mode == "gpu"
  m = FLAGS.num_models or (32 if gpu_mode else 4)
  width = FLAGS.width or (1.0 if backend != "cpu" else 0.25)
  epochs = FLAGS.epochs or (24 if gpu_mode else 1)
  torch_models = FLAGS.torch_models if FLAGS.torch_models >= 0 else (0 if gpu_mode else m)
  if gpu_mode and FLAGS.data == "synthetic":
    raise app.UsageError("--mode=gpu reports test accuracy: pass --data=folder:PATH/cifar10-jpeg"
                         ".tar.gz")
  train, test_images, test_labels = load_data(FLAGS.data, FLAGS.train_examples)
  n = len(train)
  cfg = config.trainer_section()
  cfg.width, cfg.epochs, cfg.batch_size = width, epochs, FLAGS.batch_size
  cfg.compute_dtype = FLAGS.compute_dtype
  cfg.cpu_ops = FLAGS.cpu_ops
  cfg.models_per_wave = 0
  cfg.log_every_s = 30.0
  steps_per_epoch = n // FLAGS.batch_size
  flops_per_model_epoch = steps_per_epoch * FLAGS.batch_size * resnet9_train_flops(width)
  if FLAGS.peak_tflops:
    peak = FLAGS.peak_tflops
  elif backend == "gpu":
    peak = 790.0
  else:
    peak = bench.cpu_peak_tflops()
  logging.info("peak for MFU: %.3f TFLOP/s", peak)

  rows = []

  def add_row(name, models, seconds, extra=None):
    per = seconds / (models * epochs)
    row = {
        "run": name,
        "models": models,
        "s_per_model_epoch": per,
        "s_per_model": seconds / models,
        "tflops": flops_per_model_epoch / per / 1e12,
        "mfu_pct": 100 * flops_per_model_epoch / per / 1e12 / peak
    }
    row.update(extra or {})
    rows.append(row)
    logging.info("%s", row)
    return row

  seeds = np.arange(m, dtype=np.int64)
  eval_images = test_images if gpu_mode else test_images[:500]
  eval_labels = test_labels if gpu_mode else test_labels[:500]
  for form in FLAGS.formulations:
    cfg.formulation = form
    trainer = ensemble.Trainer(cfg, train)  # compiles once per wave size, reused by repeats
    for models in ([m] if gpu_mode else sorted({1, m})):

      def run(models=models, trainer=trainer):
        return trainer.train_and_predict(eval_images, seeds[:models])

      if gpu_mode:
        # One run (device time is scarce): per-model cost from the steady epochs (2..E, the
        # first compiles), the whole run's wall time reported next to it.
        logits, stats = run()
        acc = (logits.argmax(-1) == eval_labels[None]).mean(1)
        add_row(
            f"jaxattr {form}", models, stats.steady_seconds_per_model * models, {
                "total_s_per_model": stats.total_seconds / models,
                "first_epoch_s": stats.first_epoch_seconds,
                "test_acc_mean": float(acc.mean()),
                "test_acc_min": float(acc.min()),
                "test_acc_max": float(acc.max())
            })
      else:
        # Training epochs only (the torch loop's work), from the trainer's own epoch timers;
        # the whole call (init + training + evaluation) as total_s_per_model.
        train_s = []

        def timed(run=run):
          train_s.append(run()[1].train_seconds)

        t = bench.time_fn(timed, repeats=FLAGS.repeats, warmup=1)
        train_s = train_s[1:]  # the warm-up call compiled
        add_row(
            f"jaxattr {form}", models, float(np.median(train_s)), {
                "min_s_per_model_epoch": min(train_s) / (models * epochs),
                "total_s_per_model": t["median_s"] / models
            })

  torch_threads_used = 0
  if torch_models:
    import torch  # pylint: disable=g-import-not-at-top
    device = "cuda" if torch.cuda.is_available() and backend == "gpu" else "cpu"
    if device == "cpu":
      torch.set_num_threads(FLAGS.torch_threads or os.cpu_count() or 1)
    # Warm-up (allocator, kernels) on a few steps' worth of images.
    torch_train(train.images[:2 * FLAGS.batch_size], train.labels[:2 * FLAGS.batch_size], cfg, 0,
                device, 1)
    times = []
    for _ in range(1 if gpu_mode else FLAGS.repeats):
      t0 = time.perf_counter()
      for i in range(torch_models):
        model = torch_train(train.images, train.labels, cfg, i, device, epochs)
      times.append(time.perf_counter() - t0)
    torch_threads_used = torch.get_num_threads()
    add_row("torch loop", torch_models, float(np.median(times)))
    del model
    ref = rows[-1]["s_per_model_epoch"]
    for row in rows[:-1]:
      row["torch_over_jaxattr"] = ref / row["s_per_model_epoch"]

  columns = [
      "run", "models", "s_per_model_epoch", "s_per_model", "tflops", "mfu_pct",
      "torch_over_jaxattr", "total_s_per_model"
  ]
  if gpu_mode:
    columns += ["first_epoch_s", "test_acc_mean", "test_acc_min", "test_acc_max"]
  print(f"backend {backend}, width {width}, {n} training images ({FLAGS.data}), epochs {epochs}, "
        f"batch {FLAGS.batch_size}, compute {jnp.dtype(ensemble.compute_dtype(cfg)).name}, "
        f"peak {peak:.3f} TFLOP/s, {resnet9_train_flops(width) / 1e9:.3f} GFLOP/image/step, "
        f"cpu_ops {FLAGS.cpu_ops}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"torch threads {torch_threads_used}, load {os.getloadavg()[0]:.2f}")
  print(bench.format_table(rows, columns))
  settings = {
      "mode": FLAGS.mode,
      "data": FLAGS.data,
      "train_examples": n,
      "num_models": m,
      "width": width,
      "epochs": epochs,
      "batch_size": FLAGS.batch_size,
      "compute_dtype": FLAGS.compute_dtype,
      "peak_tflops": peak,
      "torch_models": torch_models,
      "formulations": FLAGS.formulations,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "torch_threads": torch_threads_used,
      "loadavg": os.getloadavg(),
      "trainer": cfg.to_dict()
  }
  bench.write_result(FLAGS.out, "train", rows, settings)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
