"""XLA:CPU flags that make jaxattr's training and inference faster, set only where safe.

Measured on the project's 2-core CPU (jax 0.10.2, ResNet-9 batch 512, float32): XLA:CPU's
default sends convolutions to YNNPACK, whose training convolutions (above all the weight
gradients) were 2-3x slower here than XLA's own Eigen convolutions. Removing that one fusion
type, `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`, took a training step
from ~1.0 s to ~0.45 s at width 0.25 (and ~0.4 s with the `cpu_ops` formulations of
`jaxattr.models.resnet9`); YNNPACK keeps its other fusions (dots, reductions).
`--xla_cpu_use_onednn=true` on top of it changed training by less than the noise (and feature
extraction by ~1.3x, README), so it is not set here.

`use_compilation_cache()` turns on JAX's persistent compilation cache for the launchers: the
ESVM solver alone compiles ~20 step programs per candidate-set shape (~10 s on this CPU), which a
rerun then loads from disk instead (one class of CIFAR-10: ~11.5 s -> ~3.4 s for a cold
1,000-target solve, the rest being tracing).

XLA reads XLA_FLAGS once, when JAX creates its first backend, so `use_fast_cpu_flags()` must
run before any JAX computation (importing jax is fine). It does nothing when the user has set
XLA_FLAGS, when the backend is already up, or when JAX will pick a non-CPU platform, so the GPU
path is untouched (the flags only concern the CPU backend anyway, but a jaxlib that does not
know a flag aborts at start-up, so they are never set where they are not needed).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Sequence

FAST_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
# Feature extraction (inference) was measured 1.5x torch with these and 1.1x with XLA's defaults
# (README); the oneDNN part is untested for training beyond "no measurable change".
INFERENCE_CPU_FLAGS = FAST_CPU_FLAGS + ("--xla_cpu_use_onednn=true",)


def _accelerator_plugin_installed() -> bool:
  """Whether JAX may pick a GPU/TPU by default (a plugin or libtpu is importable)."""
  for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin",
               "libtpu", "jax_plugins"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def _backend_initialised() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # unknown JAX internals: assume the worst
    return "jax" in sys.modules


def will_use_cpu() -> bool:
  """Whether JAX's default backend will be the CPU (judged before it starts)."""
  platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not _accelerator_plugin_installed()


def use_fast_cpu_flags(flags: Sequence[str] = FAST_CPU_FLAGS) -> str | None:
  """Sets XLA_FLAGS to `flags` when the CPU backend is about to be used.

  Call it first thing in a launcher's main(), before any JAX computation.

  Args:
    flags: XLA flags (`FAST_CPU_FLAGS` for training, `INFERENCE_CPU_FLAGS` for features).

  Returns:
    The flags set, or None when nothing was changed (XLA_FLAGS already set by the user, a
    non-CPU platform, or a JAX backend already initialised).
  """
  if "XLA_FLAGS" in os.environ or not will_use_cpu() or _backend_initialised():
    return None
  value = " ".join(flags)
  os.environ["XLA_FLAGS"] = value
  return value


# Where the launchers keep compiled programs unless told otherwise (--compilation_cache).
DEFAULT_COMPILATION_CACHE = os.environ.get(
    "JAXATTR_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxattr", "jax"))


def use_compilation_cache(directory: str | None) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory` (created), for every program.

  JAX by default caches only programs that took over a second to compile; jaxattr's many small
  solver programs take less, so the thresholds are lowered to zero. Cache entries are keyed by
  the program, the JAX/XLA versions and the compile options, so a stale entry is never used.

  Args:
    directory: cache directory; None or "" leaves the cache off.

  Returns:
    The cache directory in use (the user's own when JAX_COMPILATION_CACHE_DIR or the JAX config
    already names one), or None when it is off.
  """
  import jax  # pylint: disable=g-import-not-at-top

  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not directory:
    return None
  directory = os.path.expanduser(directory)
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
