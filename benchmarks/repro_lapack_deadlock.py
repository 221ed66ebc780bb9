r"""Reproducer: batched LAPACK Cholesky in a program sharded over several XLA:CPU devices hangs.

jaxlib 0.10's CPU LAPACK kernels (`jax::CholeskyFactorization::Kernel`, via
`jax::ParallelBatchMap`) split a batch over XLA:CPU's intra-op thread pool and block the calling
pool thread until the pieces are done. With JAX_NUM_CPU_DEVICES=N, the N per-device programs run
at once on that same pool; when all of its threads are inside such a kernel, waiting for pieces
that no free thread can run, the process deadlocks (gdb: every `tf_XLAEigen` thread in
`BlockingCounter::Wait` under `ParallelBatchMap`). It is timing-dependent: a run hangs in some
tries only. `jaxattr.attribute.solver.Solver` therefore avoids LAPACK on multi-device CPU meshes.

  JAX_NUM_CPU_DEVICES=4 python3 -m benchmarks.repro_lapack_deadlock   # exit 0: no hang in --tries

Exits with status 1 (and a Python stack dump) if one try does not finish within --timeout_s.
"""

import faulthandler
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import PartitionSpec as P

_TRIES = flags.DEFINE_integer("tries", 50, "Calls of the sharded program.")
_BATCH = flags.DEFINE_integer("batch", 16, "Matrices (over all devices).")
_SIZE = flags.DEFINE_integer("size", 256, "Matrix size.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 60, "Seconds before a hang is declared.")


def main(argv):
  del argv
  if jax.device_count() < 2:
    sys.exit("needs several devices: run with JAX_NUM_CPU_DEVICES=4")
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("b",))

  def factor(a):  # [B / devices, n, n] per device
    m = a @ jnp.swapaxes(a, 1, 2) + a.shape[1] * jnp.eye(a.shape[1], dtype=a.dtype)
    return jax.lax.linalg.cholesky(m)

  fn = jax.jit(jax.shard_map(factor, mesh=mesh, in_specs=P("b"), out_specs=P("b")))
  a = np.random.default_rng(0).normal(size=(_BATCH.value, _SIZE.value, _SIZE.value))
  a = a.astype(np.float32)
  faulthandler.dump_traceback_later(_TIMEOUT.value, exit=True)  # exit status 1 on a hang
  for i in range(_TRIES.value):
    jax.block_until_ready(fn(a))
  faulthandler.cancel_dump_traceback_later()
  print(f"no hang in {_TRIES.value} calls on {jax.device_count()} {jax.devices()[0].platform} "
        f"devices (jax {jax.__version__}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
  app.run(main)
