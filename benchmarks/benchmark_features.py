r"""Feature-extraction throughput: jaxattr (Flax, converted weights) vs PyTorch eval mode.

For each network a PyTorch model gets random weights and non-trivial BatchNorm statistics, is
saved as a checkpoint in its usual layout and converted with `jaxattr.convert`; both frameworks
then embed the SAME images with the SAME weights (the features are checked to agree). Each
timed call embeds one batch of uint8 images that already live on the device, normalisation
included, and blocks until the features are ready. Warm-up (and compilation) first, then the
median of `--repeats` calls, interleaving the frameworks so that load from other processes hits
both alike.

  python3 -m benchmarks.benchmark_features                       # CPU, float32, both networks
  python3 -m benchmarks.benchmark_features --dtype=bfloat16      # bf16 compute (GPU: autocast)
  python3 -m benchmarks.benchmark_features --nets=cifar_resnet18 --batch_size=512

Rows: 'jaxattr' (the converted model as is), 'jaxattr+fold' (BatchNorm folded into the convs,
`jaxattr.folding.fold_batchnorm`), 'torch' (nn.Module.eval() under torch.inference_mode; on a GPU
channels_last and, for bf16, autocast). Threads: torch gets `--threads` (default: the CPUs this
process may run on); XLA's CPU client sizes its pool from the same CPU set.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags, logging

_NETS = flags.DEFINE_list("nets", ["cifar_resnet18", "resnet50"],
                          "cifar_resnet18 (lightly MoCo backbone, 32x32), resnet50 (224x224).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per call for cifar_resnet18.")
_BATCH_IMAGENET = flags.DEFINE_integer("imagenet_batch_size", 32, "Images per call, resnet50.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per framework (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (after compilation).")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads; 0 = CPUs available.")
_XLA_FLAGS = flags.DEFINE_string(
    "xla_flags",
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "Appended to XLA_FLAGS before the backend starts (CPU-only flags are ignored on GPUs).")
_FOLD = flags.DEFINE_bool("fold_bn", True, "Also time jaxattr with BatchNorm folded into convs.")
_OUT = flags.DEFINE_string("out", "bench_results/features.json", "JSON result path.")

SIZES = {"cifar_resnet18": 32, "resnet50": 224}


def _torch_model(net: str, torch, seed: int):
  """(PyTorch module in its checkpoint layout, state to save, module for features)."""
  torch.manual_seed(seed)
  if net == "cifar_resnet18":
    try:
      from lightly.models import ResNetGenerator  # pylint: disable=g-import-not-at-top

      resnet = ResNetGenerator("resnet-18", num_splits=8)
      backbone = torch.nn.Sequential(*list(resnet.children())[:-1], torch.nn.AdaptiveAvgPool2d(1))
    except ImportError:  # e.g. on the GPU machine; same modules and keys, plain BatchNorm
      logging.warning("lightly is not installed: timing an equivalent plain PyTorch backbone")
      backbone = _torch_cifar_resnet18(torch)
    _warm_bn(backbone, torch, 32, 16)
    state = {"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}
    return backbone, state
  import torchvision  # pylint: disable=g-import-not-at-top

  model = torchvision.models.resnet50()
  _warm_bn(model, torch, 64, 8)
  state = model.state_dict()
  model.fc = torch.nn.Identity()
  return model, state


def _torch_cifar_resnet18(torch):
  """lightly's ResNet-18 MoCo backbone in plain PyTorch (state_dict keys as lightly's)."""
  nn = torch.nn

  class Block(nn.Module):

    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)], 64
  for i, cout in enumerate((64, 128, 256, 512)):
    layers.append(nn.Sequential(Block(cin, cout, 2 if i else 1), Block(cout, cout, 1)))
    cin = cout
  return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))


def _warm_bn(model, torch, size: int, batch: int) -> None:
  """Random BN affine parameters and a few training batches: non-trivial running statistics."""
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
  model.train()
  with torch.no_grad():
    for _ in range(2):
      model(torch.randn(batch, 3, size, size))
  model.eval()


def _bench_net(net: str, batch: int, dtype_name: str, threads: int, workdir: str) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from benchmarks import bench, folding  # pylint: disable=g-import-not-at-top
  from jaxattr import checkpoint, convert, models  # pylint: disable=g-import-not-at-top

  size = SIZES[net]
  tmodel, state = _torch_model(net, torch, seed=0)
  src = os.path.join(workdir, f"{net}.pth")
  torch.save(state, src)
  convert.convert(src, os.path.join(workdir, net), overwrite=True)
  variables, meta = checkpoint.load_variables(os.path.join(workdir, net))
  logging.info("%s: converted as %s %s", net, meta["encoder"], meta["encoder_kwargs"])

  bf16 = dtype_name == "bfloat16"
  jdtype = jnp.bfloat16 if bf16 else jnp.float32
  model = models.ENCODERS[meta["encoder"]](**meta["encoder_kwargs"], dtype=jdtype)
  mean = jnp.asarray(meta["mean"], jnp.float32) * 255
  std = jnp.asarray(meta["std"], jnp.float32) * 255
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)

  # jaxattr: uint8 NHWC on the device, normalised inside the jitted function.
  x_dev = jax.device_put(images)
  variables = jax.device_put(variables)

  @jax.jit
  def embed(variables, x):
    return model.apply(variables, (x.astype(jnp.float32) - mean) / std, train=False)["feature"]

  fparams, fbiases = jax.jit(folding.fold_batchnorm)(variables)

  @jax.jit
  def embed_folded(params, biases, x):
    x = (x.astype(jnp.float32) - mean) / std
    return folding.apply_folded(model, params, biases, x)["feature"]

  # PyTorch: uint8 NCHW on its device, same normalisation inside the timed call.
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  tmodel = tmodel.to(device).eval()
  memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
  tmodel = tmodel.to(memory_format=memory_format)
  t_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  t_mean = torch.tensor(meta["mean"], device=device).view(1, 3, 1, 1) * 255
  t_std = torch.tensor(meta["std"], device=device).view(1, 3, 1, 1) * 255

  def torch_embed():
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
      x = ((t_images.float() - t_mean) / t_std).contiguous(memory_format=memory_format)
      out = tmodel(x).flatten(1)
    if device.type == "cuda":
      torch.cuda.synchronize()
    return out

  fns = {"jaxattr": lambda: embed(variables, x_dev).block_until_ready()}
  if _FOLD.value:
    fns["jaxattr+fold"] = lambda: embed_folded(fparams, fbiases, x_dev).block_until_ready()
  fns["torch"] = torch_embed

  # Agreement check on the timed inputs (bf16 differs by rounding, so only reported).
  ref = torch_embed().float().cpu().numpy()
  scale = float(np.abs(ref).max())
  diffs = {"jaxattr": float(np.abs(np.asarray(embed(variables, x_dev)) - ref).max()) / scale}
  if _FOLD.value:
    out = np.asarray(embed_folded(fparams, fbiases, x_dev))
    diffs["jaxattr+fold"] = float(np.abs(out - ref).max()) / scale
  diffs["torch"] = 0.0

  t0 = time.perf_counter()
  for fn in fns.values():
    for _ in range(_WARMUP.value):
      fn()
  logging.info("%s: warm-up done in %.1fs", net, time.perf_counter() - t0)
  times = {k: [] for k in fns}
  for _ in range(_REPEATS.value):  # interleaved: background load hits every framework alike
    for name, fn in fns.items():
      times[name].append(bench.time_fn(fn, repeats=1, warmup=0)["median_s"])
  rows = []
  torch_rate = batch / float(np.median(times["torch"]))
  for name, ts in times.items():
    med = float(np.median(ts))
    rows.append({
        "net": net,
        "framework": name,
        "dtype": dtype_name,
        "batch": batch,
        "image_size": size,
        "images_per_s": batch / med,
        "vs_torch": batch / med / torch_rate,
        "median_ms": med * 1e3,
        "min_ms": min(ts) * 1e3,
        "max_ms": max(ts) * 1e3,
        "max_rel_diff": diffs[name],
        "device": str(jax.devices()[0]) if name != "torch" else str(device),
        "threads": threads if name == "torch" else len(os.sched_getaffinity(0)),
    })
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  for net in _NETS.value:
    if net not in SIZES:
      raise app.UsageError(f"--nets: unknown net {net!r}; known: {sorted(SIZES)}")
  if _XLA_FLAGS.value:
    # Read when the XLA backend starts, i.e. at the first jax computation below.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAGS.value}".strip()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from benchmarks import bench  # pylint: disable=g-import-not-at-top

  threads = _THREADS.value or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  load = os.getloadavg()
  logging.info("jax %s on %s; torch %s with %d threads; load average %s", jax.__version__,
               jax.devices()[0], torch.__version__, threads, load)
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for net in _NETS.value:
      batch = _BATCH.value if net == "cifar_resnet18" else _BATCH_IMAGENET.value
      rows += _bench_net(net, batch, _DTYPE.value, threads, workdir)
  columns = [
      "net", "framework", "dtype", "batch", "images_per_s", "vs_torch", "median_ms", "min_ms",
      "max_ms", "max_rel_diff", "device", "threads"
  ]
  print(bench.format_table(rows, columns))
  settings = {
      "nets": _NETS.value,
      "batch_size": _BATCH.value,
      "imagenet_batch_size": _BATCH_IMAGENET.value,
      "dtype": _DTYPE.value,
      "repeats": _REPEATS.value,
      "warmup": _WARMUP.value,
      "torch_threads": threads,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "fold_bn": _FOLD.value,
      "cpus": os.cpu_count(),
      "load_average_start": load,
      "load_average_end": os.getloadavg(),
      "torch": torch.__version__
  }
  bench.write_result(_OUT.value, "features", rows, settings)
  logging.info("wrote %s (load average at end %s)", _OUT.value, os.getloadavg())


if __name__ == "__main__":
  app.run(main)
