"""The launchers can set jaxattr.xla_flags: importing jaxattr must not start a JAX backend."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_leave_backend_unstarted():
  """A module-level jax array would start the backend at import and silently drop the flags."""
  code = textwrap.dedent("""
      import importlib, pkgutil
      import jaxattr
      from jaxattr import xla_flags
      names = [m.name for m in pkgutil.walk_packages(jaxattr.__path__, "jaxattr.")]
      for name in names:
        importlib.import_module(name)
        assert not xla_flags._backend_initialised(), f"importing {name} started the JAX backend"
      print("ok", len(names))
      """)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_pipeline_launcher_sets_cpu_flags(tmp_path):
  """launch/pipeline.py logs the flags it set (and a bad config fails before any work)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "launch/pipeline.py", "--config=configs/digits.py:quick",
                        f"--workdir={tmp_path}", "--config.support.k=100000"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" in out.stderr, (
      out.stderr[-3000:])
  assert out.returncode != 0 and "support.k=100000 exceeds attribution.k=32" in out.stderr
  assert not os.listdir(tmp_path)  # validated before any stage wrote anything
