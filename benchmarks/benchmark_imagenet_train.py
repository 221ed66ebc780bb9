r"""Benchmark: ResNet-18 ensembles on the resident 64 px ImageNet, jaxattr vs a PyTorch loop.

Modes:
  speed (default): M ResNet-18s (config.imagenet_recipe(--recipe), training views at --crop px
    from 64 px images) trained at once by jaxattr's Trainer, for M = 1 and each --num_models,
    beside a PyTorch loop of the same model (torchvision ResNet-18 with the same 3x3 / 1 stem and
    BlurPool), the same recipe (SGD momentum, weight decay off BatchNorm, label smoothing, the
    per-iteration lr) and the same views (RandomResizedCrop with antialiasing + flip, ImageNet
    normalisation) on in-memory tensors, one model after another. Prints images/s per model
    and the ratio jaxattr / torch, from alternating rounds (--repeats).
  accuracy: trains --num_models models of each --recipes entry on a jaxattr data source (e.g.
    folder:../shared/data/cifar10-jpeg.tar.gz resized to 64 px) and prints top-1 on its test
    split, seconds and top-1 per model-hour.
  gpu: one ImageNet-shaped run on synthetic 64 px data that is learnable (per class a random
    smooth template plus noise): images/s per model, MFU and top-1 on held-out synthetic images.
  stages: where the speed mode's time goes. The recipe's ResNet-18 cut into its stem and its four
    stages, each timed alone at --batch_size x --crop px in training mode, forward and backward
    (the backward = a gradient call minus a forward call), jaxattr beside the torch loop's
    model, in alternating rounds (--repeats, medians; --stage_iters calls per timing).

CPU (this project's 2-core dev box):
  python3 -m benchmarks.benchmark_imagenet_train --num_models=4 --train_examples=256 \
    --batch_size=64 --repeats=3                                               # ~10 min
  python3 -m benchmarks.benchmark_imagenet_train --mode=accuracy --recipes=ffcv_rn18_16,rn18_8 \
    --data=folder:../shared/data/cifar10-jpeg.tar.gz --train_examples=5000 --width=0.25
  python3 -m benchmarks.benchmark_imagenet_train --mode=stages --repeats=3          # ~2 min
H200 (launch/gpu_check.sh):
  python3 -m benchmarks.benchmark_imagenet_train --mode=gpu --train_examples=128000 \
    --classes=1000 --epochs=2 --num_models=4
"""

from __future__ import annotations

import ast
import functools
import os
import time
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import bench
from jaxattr import augment, config, xla_flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "speed", ["speed", "accuracy", "gpu", "stages"],
                  "What to measure (module doc).")
flags.DEFINE_string("recipe", "ffcv_rn18_16", "Recipe of the speed and gpu modes.")
flags.DEFINE_list("recipes", ["ffcv_rn18_16", "rn18_8"], "Recipes of the accuracy mode.")
flags.DEFINE_string("data", "synthetic", "'synthetic' or a jaxattr.data source (accuracy mode).")
flags.DEFINE_integer("train_examples", 256, "Training images (synthetic, or the first n).")
flags.DEFINE_integer("classes", 100, "Classes of the synthetic data.")
flags.DEFINE_integer("side", 64, "Image side of the data (the resident copy's).")
flags.DEFINE_integer(
    "crop", 48, "Speed mode: training views of this side (the ffcv recipe's "
    "last crop); 0 = the recipe's ramp.", lower_bound=0)
flags.DEFINE_list("num_models", ["4"], "M values besides 1 (speed), or M (accuracy, gpu).")
flags.DEFINE_integer("batch_size", 64, "Images per step per model.", lower_bound=1)
flags.DEFINE_float("width", 1.0, "Channel multiplier (1 = ResNet-18).")
flags.DEFINE_integer("epochs", 1, "Epochs per timed run (speed, gpu); 0 = the recipe's.")
flags.DEFINE_integer("repeats", 3, "Alternating timed rounds (speed, stages).")
flags.DEFINE_integer("stage_iters", 5, "Calls per timing (stages).", lower_bound=1)
flags.DEFINE_integer(
    "devices", 0, "XLA:CPU devices to split the cores into (0 = XLA's default, one); with D "
    "devices M = 1 trains data parallel over all D, M >= D one model per device group.")
flags.DEFINE_enum("compute_dtype", "auto", ["auto", "float32", "bfloat16"], "jaxattr compute.")
flags.DEFINE_list(
    "overrides", [], "FIELD=VALUE entries applied to every recipe's ensemble "
    "section, e.g. stem=imagenet (values as Python literals or plain strings).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = all cores).")
flags.DEFINE_float(
    "peak_tflops", 0.0, "Peak for the MFU (0: 989 bf16 dense on GPU (H200), a "
    "float32 matmul measured here on CPU).")
flags.DEFINE_string("out", "bench_results/imagenet_train.json", "JSON result path.")


def synthetic(n: int, classes: int, side: int, seed: int = 0, chunk: int = 2048):
  """Learnable ImageNet-shaped data: per class a smooth random template, per image the template
  shifted, scaled in contrast and plus noise, as uint8 [n, side, side, 3] and labels.

  Chunks of `chunk` images are drawn from their own seeded streams on all host cores (numpy
  releases the GIL), in float32: the GPU check's 266,000 images take seconds, where one core
  in float64 took ~2 ms an image (over 5 minutes, the step's whole time limit).
  """
  head, *streams = np.random.SeedSequence(seed).spawn(1 + -(-n // chunk))
  rng = np.random.default_rng(head)
  coarse = rng.uniform(0, 255, (classes, side // 8, side // 8, 3)).astype(np.float32)
  templates = coarse.repeat(8, 1).repeat(8, 2) - np.float32(128)
  labels = rng.integers(0, classes, n).astype(np.int32)
  images = np.empty((n, side, side, 3), np.uint8)

  def fill(i):
    lo, hi = i * chunk, min(n, (i + 1) * chunk)
    r = np.random.default_rng(streams[i])
    x = np.roll(templates[labels[lo:hi]], tuple(r.integers(-4, 5, 2)), axis=(1, 2))
    x *= r.uniform(0.5, 1.0, (hi - lo, 1, 1, 1)).astype(np.float32)
    x += r.standard_normal(x.shape, dtype=np.float32) * np.float32(40)
    x += np.float32(128)
    images[lo:hi] = np.clip(x, 0, 255, out=x)

  with futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    list(pool.map(fill, range(len(streams))))
  return images, labels


def dataset(images, labels, num_classes, split="train"):
  from jaxattr import data  # pylint: disable=g-import-not-at-top
  return data.Dataset(images=images, labels=labels.astype(np.int32),
                      index=np.arange(len(images)), class_names=[
                          str(i) for i in range(num_classes)
                      ], source="synthetic", split=split)


# ---------------------------------------------------------------------------------------------
# The PyTorch loop: the same ResNet-18, recipe and views, data in memory.


def torch_resnet18(num_classes: int, width: float, blurpool: bool):
  """torchvision's ResNet-18 with jaxattr's 'small' stem (3x3 / 1 conv) and optional BlurPool
  (a fixed [1, 2, 1]^2 / 16 depthwise filter before every strided conv with >= 16 inputs)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  class Blurred(torch.nn.Module):

    def __init__(self, conv):
      super().__init__()
      self.conv = conv
      k = torch.tensor([1.0, 2.0, 1.0])
      self.register_buffer("kernel", (k[:, None] * k[None, :] / 16).expand(
          conv.in_channels, 1, 3, 3).contiguous())

    def forward(self, x):
      x = torch.nn.functional.conv2d(x, self.kernel, padding=1, groups=self.conv.in_channels)
      return self.conv(x)

  model = torchvision.models.resnet18(num_classes=num_classes)
  if width != 1.0:
    raise app.UsageError("the torch loop builds width 1 only")
  model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
  if blurpool:

    def swap(mod):
      for name, child in mod.named_children():
        if isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
          setattr(mod, name, Blurred(child))
        else:
          swap(child)

    swap(model)
  return model


def torch_train(images, labels, cfg, num_classes, seed, epochs, crop, device="cpu"):
  """One model; the recipe's lr per iteration, RandomResizedCrop (torchvision's sampling and
  antialiased resize) + flip per image, ImageNet normalisation, label smoothing."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import v2  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  model = torch_resnet18(num_classes, 1.0, bool(cfg.blurpool)).to(device)
  bn = [p for n, p in model.named_parameters() if "bn" in n]
  other = [p for n, p in model.named_parameters() if "bn" not in n]
  opt = torch.optim.SGD([{
      "params": bn,
      "weight_decay": 0.0 if not cfg.bn_weight_decay else float(cfg.weight_decay)
  }, {
      "params": other,
      "weight_decay": float(cfg.weight_decay)
  }], lr=1.0, momentum=float(cfg.momentum))
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing))
  x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y_all = torch.from_numpy(labels.astype(np.int64))
  mean = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
  n, bs = len(images), int(cfg.batch_size)
  ipe = n // bs
  rrc = v2.RandomResizedCrop(crop, scale=(float(cfg.min_scale), 1.0), antialias=True)
  it = 0
  model.train()
  for _ in range(epochs):
    perm = torch.randperm(n)
    for s in range(ipe):
      idx = perm[s * bs:(s + 1) * bs]
      views = []
      for i in idx.tolist():
        v = rrc(x_all[i].float() / 255.0)
        views.append(v.flip(2) if torch.rand(()) < 0.5 else v)
      x = (torch.stack(views) - mean) / std
      lr = float(np.interp(it, [0, cfg.peak_epoch * ipe, cfg.epochs * ipe], [0, cfg.peak_lr, 0]))
      for g in opt.param_groups:
        g["lr"] = lr
      loss = loss_fn(model(x), y_all[idx])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      it += 1
  return model


# ---------------------------------------------------------------------------------------------


def recipe_config(name: str):
  cfg = config.imagenet_recipe(name)
  cfg.update({
      "batch_size": FLAGS.batch_size,
      "width": FLAGS.width,
      "compute_dtype": FLAGS.compute_dtype,
      "models_per_wave": 0,
      "log_every_s": 30.0,
      "eval_batch_size": 100
  })
  # lr per step scales with the batch (ffcv's 0.5 is at 1024 images a step).
  cfg.peak_lr = 0.5 * FLAGS.batch_size / 1024
  for item in FLAGS.overrides:
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or key not in cfg:
      raise app.UsageError(f"--overrides entry {item!r}: expected FIELD=VALUE with FIELD one of "
                           f"the ensemble section's fields ({', '.join(sorted(cfg))})")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    cfg[key] = value
  if FLAGS.epochs:
    cfg.epochs = FLAGS.epochs
  return cfg


def speed(rows, settings):
  import torch  # pylint: disable=g-import-not-at-top

  from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(FLAGS.torch_threads or os.cpu_count() or 1)
  n, c, side = FLAGS.train_examples, FLAGS.classes, FLAGS.side
  images, labels = synthetic(n, c, side)
  train = dataset(images, labels, c)
  cfg = recipe_config(FLAGS.recipe)
  if FLAGS.crop:  # every epoch at --crop
    cfg.res_min = cfg.res_max = FLAGS.crop
  crop = FLAGS.crop or int(cfg.res_max)
  ms = sorted({1} | {int(m) for m in FLAGS.num_models})
  ndev = jax.device_count()
  # M = 1 on several devices: data parallel over all of them; otherwise a model per device.
  trainers = {}
  for m in ms:
    mc = cfg.copy_and_resolve_references()
    mc.data_parallel = ndev if m < ndev else 1
    trainers[m] = trainers.get((mc.data_parallel,)) or ensemble.Trainer(mc, train)
    trainers[(mc.data_parallel,)] = trainers[m]
  seen = n // cfg.batch_size * cfg.batch_size * cfg.epochs
  times = {f"jaxattr M={m}": [] for m in ms}
  times["torch loop"] = []
  for m in ms:  # warm-up: compiles each wave size once
    trainers[m].train_and_predict(images[:8], np.arange(m))
  torch_train(images[:2 * cfg.batch_size], labels[:2 * cfg.batch_size], cfg, c, 0, 1, crop)
  for r in range(FLAGS.repeats):
    for m in ms:
      _, stats = trainers[m].train_and_predict(images[:8], np.arange(m) + 100 * r)
      times[f"jaxattr M={m}"].append(stats.train_seconds / m)
    t0 = time.perf_counter()
    torch_train(images, labels, cfg, c, r, cfg.epochs, crop)
    times["torch loop"].append(time.perf_counter() - t0)
    logging.info("round %d: %s (load %.2f)", r, {
        k: round(v[-1], 2) for k, v in times.items()
    },
                 os.getloadavg()[0])
  flops = ensemble.train_flops(cfg, crop, c)
  peak = FLAGS.peak_tflops or bench.cpu_peak_tflops()
  ref = [seen / t for t in times["torch loop"]]
  for name, ts in times.items():
    ips = [seen / t for t in ts]
    row = {
        "run": name,
        "images_per_s_per_model": float(np.median(ips)),
        "spread": f"{min(ips):.1f}-{max(ips):.1f}",
        "tflops": float(np.median(ips)) * flops / 1e12,
        "mfu_pct": 100 * float(np.median(ips)) * flops / 1e12 / peak
    }
    if name != "torch loop":
      ratios = [a / b for a, b in zip(ips, ref)]
      row["jaxattr_over_torch"] = float(np.median(ratios))
      row["ratio_spread"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
    rows.append(row)
  settings.update(crop=crop, gflop_per_image=flops / 1e9, peak_tflops=peak,
                  torch_threads=torch.get_num_threads(), trainer=cfg.to_dict())


def accuracy(rows, settings):
  from jaxattr import data  # pylint: disable=g-import-not-at-top
  from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top

  if FLAGS.data == "synthetic":
    images, labels = synthetic(FLAGS.train_examples + 2000, FLAGS.classes, FLAGS.side)
    train = dataset(images[:-2000], labels[:-2000], FLAGS.classes)
    test_images, test_labels = images[-2000:], labels[-2000:]
  else:
    train = data.load(FLAGS.data, "train", size=FLAGS.side)
    rng = np.random.default_rng(0)
    train = train.subset(np.sort(rng.permutation(len(train))[:FLAGS.train_examples]))
    test = data.load(FLAGS.data, "test", size=FLAGS.side)
    test_images, test_labels = test.images, test.labels
  m = int(FLAGS.num_models[0])
  for name in FLAGS.recipes:
    cfg = recipe_config(name)
    if not FLAGS.epochs:
      cfg.epochs = config.imagenet_recipe(name).epochs
    trainer = ensemble.Trainer(cfg, train)
    t0 = time.perf_counter()
    logits, stats = trainer.train_and_predict(test_images, np.arange(m))
    seconds = time.perf_counter() - t0
    acc = (logits.argmax(-1) == test_labels[None]).mean(1)
    steps = len(train) // int(cfg.batch_size) * int(cfg.batch_size)
    work = sum(steps *
               ensemble.train_flops(cfg, ensemble.crop_size(cfg, ep, FLAGS.side), train.num_classes)
               for ep in range(int(cfg.epochs)))
    rows.append({
        "run": name + "".join(f" {o}" for o in FLAGS.overrides),
        "tflop_per_model": work / 1e12,
        "top1_per_pflop": float(acc.mean()) / (work / 1e15),
        "epochs": int(cfg.epochs),
        "models": m,
        "top1_mean": float(acc.mean()),
        "top1_min": float(acc.min()),
        "top1_max": float(acc.max()),
        "s_per_model": seconds / m,
        "train_s_per_model": stats.train_seconds / m,
        "top1_per_model_hour": float(acc.mean()) / (stats.train_seconds / m / 3600)
    })
    logging.info("%s", rows[-1])
  settings.update(train_examples=len(train), test_examples=len(test_images))


def gpu(rows, settings):
  from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top

  n, c, side = FLAGS.train_examples, FLAGS.classes, FLAGS.side
  t0 = time.perf_counter()
  images, labels = synthetic(n + 10_000, c, side)
  logging.info("synthetic data: %d images in %.1fs", len(images), time.perf_counter() - t0)
  train = dataset(images[:n], labels[:n], c)
  m = int(FLAGS.num_models[0])
  cfg = recipe_config(FLAGS.recipe)
  trainer = ensemble.Trainer(cfg, train)
  logits, stats = trainer.train_and_predict(images[n:], np.arange(m))
  acc = (logits.argmax(-1) == labels[n:][None]).mean(1)
  seen = n // cfg.batch_size * cfg.batch_size
  # FLOPs of the steady epochs' crops (the ramp's; 40 px before epoch 12 for ffcv_rn18_16).
  crops = [ensemble.crop_size(cfg, ep, side) for ep in range(1, max(2, int(cfg.epochs)))]
  flops = float(np.mean([ensemble.train_flops(cfg, r, c) for r in crops]))
  peak = FLAGS.peak_tflops or 989.0
  # Steady epochs (the first compiles); the M models train side by side.
  ips_all = seen * m / stats.steady_epoch_seconds
  rows.append({
      "run": f"jaxattr {FLAGS.recipe} M={m}",
      "images_per_s_per_model": ips_all / m,
      "images_per_s_all": ips_all,
      "mfu_pct": 100 * ips_all * flops / 1e12 / peak,
      "first_epoch_s": stats.first_epoch_seconds,
      "total_s": stats.total_seconds,
      "top1_mean": float(acc.mean()),
      "top1_min": float(acc.min())
  })
  settings.update(gflop_per_image=flops / 1e9, peak_tflops=peak, trainer=cfg.to_dict())


def stages(rows, settings):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top
  from jaxattr.models import layers, resnet  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(FLAGS.torch_threads or os.cpu_count() or 1)
  cfg = recipe_config(FLAGS.recipe)
  if float(cfg.width) != 1.0:
    raise app.UsageError("--mode=stages compares width 1 only (the torch model's)")
  crop, b = FLAGS.crop or int(cfg.res_max), int(cfg.batch_size)
  if b < 2:  # torch's BatchNorm refuses a single value per channel in training (1 x 1 maps)
    raise app.UsageError(f"--mode=stages needs --batch_size >= 2 (BatchNorm's training "
                         f"statistics), got {b}")
  model = ensemble.classifier(cfg, FLAGS.classes)  # the trainer's ResNet-18 (stem, BlurPool, ...)
  if model.stem != "small":
    raise app.UsageError(
        "--mode=stages mirrors the torch loop's 3x3 / 1 stem: stem must be 'small'")
  block = functools.partial(resnet.BasicBlock, dtype=model.dtype, blurpool=model.blurpool,
                            patch_below=model.patch_below, materialize=model.materialize)

  class Stem(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = layers.conv(64, 3, 1, 1, model.dtype, name="conv1")(x.astype(model.dtype))
      x = nn.relu(layers.BatchNorm(dtype=model.dtype, name="bn1")(x, True))
      return layers.max_pool(x, 3, 2, 1)

  class Stage(nn.Module):
    planes: int
    stride: int

    @nn.compact
    def __call__(self, x):
      x = block(self.planes, self.stride, name="b0")(x, True)
      return block(self.planes, 1, name="b1")(x, True)

  tm = torch_resnet18(FLAGS.classes, 1.0, bool(cfg.blurpool))
  tm.train()
  parts = [("stem", Stem(), torch.nn.Sequential(tm.conv1, tm.bn1, tm.relu, tm.maxpool))]
  parts += [(f"layer{i + 1}", Stage(64 * 2**i, 1 if i == 0 else 2), getattr(tm, f"layer{i + 1}"))
            for i in range(4)]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, crop, crop, 3)).astype(np.float32)
  timers = []
  for name, mod, tmod in parts:
    xj = jnp.asarray(x)
    variables = mod.init(jax.random.PRNGKey(0), xj)
    stats = variables["batch_stats"]

    def fwd(p, x, mod=mod, stats=stats):
      return mod.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])[0]

    jf = jax.jit(fwd)
    out = np.asarray(jf(variables["params"], xj), np.float32)
    cot = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    grad_x = name != "stem"  # the stem's input is the images: no gradient, as in training

    def loss(p, x, fwd=fwd, cot=cot):
      return jnp.sum(fwd(p, x).astype(jnp.float32) * cot)

    jg = jax.jit(jax.grad(loss, argnums=(0, 1) if grad_x else 0))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(grad_x)
    with torch.no_grad():
      tout = tmod(tx)
    tcot = torch.from_numpy(np.asarray(cot).transpose(0, 3, 1, 2).copy())
    if tuple(tout.shape) != (out.shape[0], out.shape[3], out.shape[1], out.shape[2]):
      raise RuntimeError(f"stage {name}: jaxattr output {out.shape} (NHWC) and torch output "
                         f"{tuple(tout.shape)} (NCHW) differ")

    def t_fwd(tmod=tmod, tx=tx):
      with torch.no_grad():
        tmod(tx)

    def t_grad(tmod=tmod, tx=tx, tcot=tcot):
      (tmod(tx) * tcot).sum().backward()

    timers.append((name, tuple(out.shape), lambda jf=jf, p=variables["params"], xj=xj: jf(p, xj),
                   lambda jg=jg, p=variables["params"], xj=xj: jg(p, xj), t_fwd, t_grad))
    x = out

  def timed(fn, sync):  # ms per call: the median of --stage_iters calls after a warm-up (compiles)
    return bench.time_fn(lambda: sync(fn()), repeats=FLAGS.stage_iters)["median_s"] * 1e3

  keys = ("jax_fwd", "jax_grad", "torch_fwd", "torch_grad")
  ms = {name: {k: [] for k in keys} for name, *_ in timers}
  for r in range(FLAGS.repeats):
    for name, _, jfwd, jgrad, tfwd, tgrad in timers:
      for k, fn, sync in zip(keys, (jfwd, jgrad, tfwd, tgrad),
                             (jax.block_until_ready,) * 2 + (lambda _: None,) * 2):
        ms[name][k].append(timed(fn, sync))
    logging.info("stages round %d done (load %.2f)", r, os.getloadavg()[0])
  total = {k: 0.0 for k in ("jax_fwd", "jax_bwd", "torch_fwd", "torch_bwd")}
  for name, shape, *_ in timers:
    m = {k: float(np.median(v)) for k, v in ms[name].items()}
    row = {
        "stage": name,
        "out_shape": "x".join(map(str, shape)),
        "jax_fwd_ms": m["jax_fwd"],
        "jax_bwd_ms": m["jax_grad"] - m["jax_fwd"],
        "torch_fwd_ms": m["torch_fwd"],
        "torch_bwd_ms": m["torch_grad"] - m["torch_fwd"],
    }
    for k in total:
      total[k] += row[f"{k}_ms"]
    rows.append(row)
  rows.append({"stage": "sum", "out_shape": "", **{f"{k}_ms": v for k, v in total.items()}})
  for row in rows:
    row["fwd_torch_over_jax"] = row["torch_fwd_ms"] / row["jax_fwd_ms"]
    row["bwd_torch_over_jax"] = row["torch_bwd_ms"] / row["jax_bwd_ms"]
  settings.update(crop=crop, batch_size=b, torch_threads=torch.get_num_threads(),
                  trainer=cfg.to_dict())


def main(argv):
  del argv
  set_flags = xla_flags.use_fast_cpu_flags()
  if set_flags:
    logging.info("XLA_FLAGS=%s (jaxattr.xla_flags)", set_flags)
  if FLAGS.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.devices}")
  rows, settings = [], {k: FLAGS[k].value for k in FLAGS if k in _OWN}
  {"speed": speed, "accuracy": accuracy, "gpu": gpu, "stages": stages}[FLAGS.mode](rows, settings)
  settings.update(backend=jax.default_backend(), loadavg=os.getloadavg(), xla_flags=os.environ.get(
      "XLA_FLAGS", ""))
  print(f"backend {jax.default_backend()}, mode {FLAGS.mode}, load {os.getloadavg()[0]:.2f}")
  print(bench.format_table(rows))
  bench.write_result(FLAGS.out, f"imagenet_train_{FLAGS.mode}", rows, settings)
  print(f"wrote {FLAGS.out}")


_OWN = ("mode", "recipe", "recipes", "data", "train_examples", "classes", "side", "crop",
        "num_models", "batch_size", "width", "epochs", "repeats", "compute_dtype", "devices",
        "overrides", "stage_iters")

if __name__ == "__main__":
  app.run(main)
