r"""Benchmark: TRAK featurisation (per-example margin gradients + random projection), jaxattr vs
the `traker` PyTorch package, same model, same weights, same proj_dim, same images, one run.

Each side featurises --examples CIFAR-shaped images of one ResNet-9 (the reference's, at
--width) with a Rademacher projection to --proj_dim: jaxattr's `trak.featurizer` with its seeded
block projection (`trak.Projection`), jitted over chunks of --chunk images; traker's
`TRAKer.featurize` (`BasicProjector`, float32, the CPU path; on CUDA its `CudaProjector` needs
the fast_jl extension, which this benchmark does not install) over batches of --batch images.
Both compute the out-to-loss term too. Repeats alternate the two sides; the table gives
examples/s (median, min-max) and the ratio. Checks that both sides' margins agree first.

CPU (this project's 2-core box):
  python3 -m benchmarks.benchmark_trak --width=0.25 --examples=1024 --repeats=3
GPU (launch/gpu_check.sh):
  python3 -m benchmarks.benchmark_trak --width=1 --examples=4096 --chunk=256 --batch=256
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import bench
from jaxattr import augment, xla_flags

FLAGS = flags.FLAGS
flags.DEFINE_float("width", 0.25, "ResNet-9 width multiplier.")
flags.DEFINE_integer("examples", 1024, "Images featurised per timed repeat.")
flags.DEFINE_integer("proj_dim", 2048, "Projection dimension (both sides).")
flags.DEFINE_integer("chunk", 256, "jaxattr: images per jitted featurisation step.")
flags.DEFINE_integer("batch", 128, "traker: images per featurize() call (its loader batch).")
flags.DEFINE_integer("repeats", 3, "Timed repeats per side (alternating).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads on CPU (0 = all cores).")
flags.DEFINE_bool("fast_cpu_flags", True, "On the CPU backend, set jaxattr.xla_flags.")
flags.DEFINE_string("out", "bench_results/trak.json", "JSON result path.")


def main(argv):
  del argv
  if FLAGS.fast_cpu_flags:
    xla_flags.use_fast_cpu_flags()
  import torch  # pylint: disable=g-import-not-at-top
  from trak import TRAKer  # pylint: disable=g-import-not-at-top
  from trak.projectors import BasicProjector, ProjectionType  # pylint: disable=g-import-not-at-top

  from benchmarks.torch_reference import resnet9_to_torch, torch_resnet9  # pylint: disable=g-import-not-at-top
  from jaxattr.attribute import trak  # pylint: disable=g-import-not-at-top
  from jaxattr.models.resnet9 import ResNet9  # pylint: disable=g-import-not-at-top

  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
  n, width = FLAGS.examples, FLAGS.width
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  model = ResNet9(width=width, num_classes=10)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(0))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  num_params = trak.num_parameters(variables["params"])

  # jaxattr
  proj = trak.Projection(FLAGS.proj_dim, "rademacher", seed=0)
  fn = jax.jit(trak.featurizer(model, augment.cifar_normalize, proj.project))
  chunk = FLAGS.chunk

  def run_jax():
    outs = []
    for s in range(0, n, chunk):
      outs.append(fn(variables, images[s:s + chunk], labels[s:s + chunk], 0))
    jax.block_until_ready(outs)
    return outs

  # traker
  ref = torch_resnet9(width).eval().to(device)
  p, b = resnet9_to_torch(ref, variables)
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in {**p, **b}.items()}
  sd.update({k: v for k, v in ref.state_dict().items() if k not in sd})
  ref.load_state_dict(sd)
  x_t = torch.from_numpy(
      np.asarray(augment.cifar_normalize(jnp.asarray(images))).transpose(0, 3, 1, 2).copy())
  y_t = torch.from_numpy(labels.astype(np.int64))
  tmp = tempfile.mkdtemp(prefix="trak_bench_")
  projector = BasicProjector(grad_dim=num_params, proj_dim=FLAGS.proj_dim, seed=0,
                             proj_type=ProjectionType.rademacher, device=device,
                             dtype=torch.float32)
  runs = {"n": 0}

  def run_torch():
    runs["n"] += 1
    traker = TRAKer(model=ref, task="image_classification", train_set_size=n, projector=projector,
                    proj_dim=FLAGS.proj_dim, device=device, use_half_precision=False,
                    save_dir=os.path.join(tmp, str(runs["n"])), logging_level=logging.WARNING)
    traker.load_checkpoint(sd, model_id=0)
    for s in range(0, n, FLAGS.batch):
      traker.featurize(batch=(x_t[s:s + FLAGS.batch].to(device), y_t[s:s + FLAGS.batch].to(device)),
                       num_samples=len(x_t[s:s + FLAGS.batch]))
    if device == "cuda":
      torch.cuda.synchronize()
    return traker

  # Agreement first: the out-to-loss terms of both sides (the projections differ by design).
  outs = run_jax()
  q_jax = np.concatenate([np.asarray(o[1]) for o in outs])
  q_torch = np.asarray(run_torch().saver.current_store["out_to_loss"])[:, 0]
  q_err = float(np.abs(q_jax - q_torch).max())
  logging.info("out-to-loss max |jaxattr - traker| = %.2e", q_err)
  times = {"jaxattr": [], "traker": []}
  for _ in range(FLAGS.repeats):
    for side, f in (("jaxattr", run_jax), ("traker", run_torch)):
      t0 = time.perf_counter()
      f()
      times[side].append(time.perf_counter() - t0)
  load = os.getloadavg()
  rows = []
  for side in ("jaxattr", "traker"):
    s = bench.summarize(times[side])
    rows.append({
        "side": side,
        "batch": chunk if side == "jaxattr" else FLAGS.batch,
        "examples_per_s": n / s["median_s"],
        "min_per_s": n / s["max_s"],
        "max_per_s": n / s["min_s"],
        "median_s": s["median_s"],
    })
  ratio = rows[0]["examples_per_s"] / rows[1]["examples_per_s"]
  ratios = [t / j for j, t in zip(times["jaxattr"], times["traker"])]
  print(f"TRAK featurisation, ResNet-9 width {width} ({num_params:,} parameters), proj_dim "
        f"{FLAGS.proj_dim}, {n} images, {jax.default_backend()} / torch {device}, load "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  print(bench.format_table(rows))
  print(f"jaxattr / traker examples/s: {ratio:.2f}x (per repeat {min(ratios):.2f}-"
        f"{max(ratios):.2f}); out-to-loss agreement {q_err:.1e}")
  bench.write_result(
      FLAGS.out, "trak_featurisation", rows, {
          "width": width,
          "num_params": num_params,
          "examples": n,
          "proj_dim": FLAGS.proj_dim,
          "chunk": chunk,
          "batch": FLAGS.batch,
          "repeats": FLAGS.repeats,
          "ratio": ratio,
          "ratio_per_repeat": ratios,
          "out_to_loss_max_abs_diff": q_err,
          "loadavg": load,
          "torch_threads": torch.get_num_threads(),
          "device": device,
      })


if __name__ == "__main__":
  app.run(main)
