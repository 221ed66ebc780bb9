"""benchmarks/benchmark_train.py end to end on tiny settings, and jaxattr.xla_flags' guards."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(extra)
  return env


def test_fast_cpu_flags_only_when_safe():
  """Set on a fresh CPU process; never over a user's XLA_FLAGS, a started backend or a GPU."""
  code = textwrap.dedent("""
      import os
      from jaxattr import xla_flags
      mode = os.environ["MODE"]
      if mode == "fresh":
        got = xla_flags.use_fast_cpu_flags()
        assert got == " ".join(xla_flags.FAST_CPU_FLAGS) == os.environ["XLA_FLAGS"], got
        import jax, jax.numpy as jnp
        assert jax.default_backend() == "cpu" and float(jnp.ones(2).sum()) == 2.0
        assert xla_flags.use_fast_cpu_flags() is None  # the backend is up now
      elif mode == "user":
        assert xla_flags.use_fast_cpu_flags() is None and os.environ["XLA_FLAGS"] == ""
      elif mode == "gpu":
        assert not xla_flags.will_use_cpu()
        assert xla_flags.use_fast_cpu_flags() is None and "XLA_FLAGS" not in os.environ
      elif mode == "started":
        import jax.numpy as jnp
        jnp.ones(1).block_until_ready()
        assert xla_flags.use_fast_cpu_flags() is None and "XLA_FLAGS" not in os.environ
      print("ok")
      """)
  cases = {
      "fresh": _env(JAX_PLATFORMS="cpu"),
      "user": _env(XLA_FLAGS="", JAX_PLATFORMS="cpu"),
      "gpu": _env(JAX_PLATFORMS="cuda"),
      "started": _env(JAX_PLATFORMS="cpu")
  }
  for mode, env in cases.items():
    env["MODE"] = mode
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, (mode, out.stderr[-2000:])


@pytest.mark.torch
def test_benchmark_train_smoke(tmp_path):
  """Tiny speed-mode run: jaxattr (M=1 and M=2) and the torch loop, ratio and JSON written."""
  pytest.importorskip("torch")
  out = tmp_path / "train.json"
  cmd = [
      sys.executable, "-m", "benchmarks.benchmark_train", "--width=0.0625", "--train_examples=128",
      "--batch_size=64", "--epochs=1", "--num_models=2", "--repeats=1", "--peak_tflops=1",
      f"--out={out}"
  ]
  res = subprocess.run(cmd, env=_env(JAX_PLATFORMS="cpu"), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "--xla_cpu_experimental_ynn_fusion_type" in res.stdout  # the launcher set the flags
  result = json.loads(out.read_text())
  runs = {(r["run"], r["models"]): r for r in result["rows"]}
  assert set(runs) == {("jaxattr auto", 1), ("jaxattr auto", 2), ("torch loop", 2)}
  for key in [("jaxattr auto", 1), ("jaxattr auto", 2)]:
    row = runs[key]
    assert row["s_per_model_epoch"] > 0 and row["torch_over_jaxattr"] > 0
    assert row["total_s_per_model"] >= row["s_per_model"]  # the total adds init + evaluation
  assert result["settings"]["xla_flags"].startswith("--xla_cpu_experimental_ynn_fusion_type")
