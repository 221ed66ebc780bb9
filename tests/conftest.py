"""Shared test fixtures: repository paths and the optional real CIFAR-10 archive."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TAR = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg.tar.gz")


@pytest.fixture(scope="session")
def cifar_tar() -> str:
  if not os.path.exists(CIFAR_TAR):
    pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_TAR} (it ships in ../shared/data of "
                "the development machines only)")
  return CIFAR_TAR


def repo_env() -> dict:
  """Environment for subprocesses that run launch/*.py from this checkout."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env
