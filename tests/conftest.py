"""Shared test fixtures: repository paths, config files and the optional real CIFAR-10 archive."""

import importlib.util
import os

import pytest

from jaxattr import config as config_lib, xla_flags

# The launchers' XLA:CPU flags for the in-process tests too (before JAX starts its backend):
# training convolutions ~2x faster. The tests compile far more than they compute, so LLVM's
# optimisation level drops to 1: the trainer's equality tests took half the time and the CIFAR
# learning test no longer. Launcher subprocesses inherit the flags, so the shared compilation
# cache below serves both.
xla_flags.use_fast_cpu_flags(xla_flags.FAST_CPU_FLAGS + ("--xla_backend_optimization_level=1",))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The archive of config.CIFAR10_JPEG, whose path is relative to the checkout root.
CIFAR_TAR = os.path.normpath(os.path.join(REPO, config_lib.CIFAR10_JPEG.partition(":")[2]))


@pytest.fixture(scope="session")
def cifar_tar() -> str:
  if not os.path.exists(CIFAR_TAR):
    pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_TAR} (it ships in ../shared/data of "
                "the development machines only)")
  return CIFAR_TAR


def load_config(name: str, variant: str | None = None):
  """`get_config(variant)` of configs/<name>.py, loaded as the launchers' --config does."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def repo_env() -> dict:
  """Environment for subprocesses that run launch/*.py from this checkout."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent JAX compilation cache for the whole run, tests and launcher subprocesses.

  Many tests compile the same programs again (a stage run twice for resume checks, a launcher in
  a subprocess after the library in-process); from the cache they load instead. The cache is
  fresh per run, so a test never depends on what an earlier run left behind.
  """
  import jax  # pylint: disable=import-outside-toplevel

  path = str(tmp_path_factory.mktemp("jax_cache"))
  os.environ["JAXATTR_COMPILATION_CACHE"] = path
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield path


def save_tiny_encoder(path: str):
  """A random-init 1/16-width one-stage ResNet-18 saved at `path` as an encoder checkpoint that
  records a 16 px input (as launch/convert.py records a converted network's); (model, variables)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jaxattr import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxattr.models import get_encoder  # pylint: disable=g-import-not-at-top

  kwargs = {"width": 0.0625, "stage_sizes": [1]}
  model = get_encoder("lightly_resnet18", **kwargs)
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
  checkpoint.save_variables(
      path, variables, {
          "encoder": "lightly_resnet18",
          "encoder_kwargs": kwargs,
          "image_size": 16,
          "mean": [0.5] * 3,
          "std": [0.25] * 3
      })
  return model, variables
