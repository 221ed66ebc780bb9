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
  out = subprocess.run([
      sys.executable, "launch/pipeline.py", "--config=configs/digits.py:quick",
      f"--workdir={tmp_path}", "--config.support.k=100000"
  ], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" in out.stderr, (
      out.stderr[-3000:])
  assert out.returncode != 0 and "support.k=100000 exceeds attribution.k=32" in out.stderr
  # Validated before any stage wrote anything; only the failure's traceback is kept.
  assert os.listdir(tmp_path) == ["error.log"]


def test_compilation_cache_is_written_and_reused(tmp_path):
  """use_compilation_cache keeps even quick compiles; a second process reads them back."""
  cache = str(tmp_path / "cache")
  code = textwrap.dedent(f"""
      import os, jax, jax.numpy as jnp
      from jaxattr import xla_flags
      assert xla_flags.use_compilation_cache({cache!r}) == {cache!r}
      total = float(jax.jit(lambda a: jnp.sum(jnp.sin(a) @ a.T))(jnp.arange(12.0).reshape(3, 4)))
      print("entries", len(os.listdir({cache!r})), total)
      """)
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
  runs = [
      subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                     text=True, timeout=300) for _ in range(2)
  ]
  for out in runs:
    assert out.returncode == 0, out.stderr[-3000:]
  first, second = (out.stdout.split() for out in runs)
  assert int(first[1]) >= 1 and first == second  # nothing new compiled, the same result
  # Off when asked, and the user's own JAX setting wins.
  code = textwrap.dedent("""
      from jaxattr import xla_flags
      assert xla_flags.use_compilation_cache("") is None
      import jax
      jax.config.update("jax_compilation_cache_dir", "/somewhere/else")
      assert xla_flags.use_compilation_cache("/tmp/ignored") == "/somewhere/else"
      print("ok")
      """)
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_bad_compilation_cache_is_a_clear_error(tmp_path):
  """A --compilation_cache that cannot be a directory stops the launcher before any work."""
  (tmp_path / "file").write_text("x")
  bad = tmp_path / "file" / "cache"
  out = subprocess.run([
      sys.executable, "launch/attribute.py", "--config=configs/digits.py",
      f"--workdir={tmp_path / 'w'}", f"--compilation_cache={bad}"
  ], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and f"--compilation_cache={bad}: cannot use it" in out.stderr, (
      out.stderr[-2000:])
  assert not (tmp_path / "w").exists()
