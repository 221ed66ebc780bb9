"""Many hosts with JAX's own multi-controller runtime (`jax.distributed`), issue #17.

Every host runs the same launcher; `initialize` joins them into one job before any JAX work:

* flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (and JAX's
  `--local_device_ids`), as on a plain multi-node GPU setup; or
* nothing, where the environment says the job is a multi-process one (a TPU VM slice's workers,
  SLURM's `srun` tasks, Open MPI's `mpirun` ranks): JAX's automatic cluster detection; or
* nothing at all: one process, as before.

One log line per process says who it is. Before any stage work, `check_job` makes every
process agree on the config (each hashes its own; a mismatch names the processes) and checks that
the workdir is one directory all processes see (process 0 writes a token, every process reads
it). Stages run with `is_main()` writing shared files and `barrier` between phases.

On the CPU backend the processes talk through gloo (`jax_cpu_collectives_implementation`), as
the tests do with several local processes, and `share_cpu_compilation_cache` lets all of them
load the programs process 0 wrote to the persistent compilation cache.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import os
import secrets
import time
from typing import Any, Iterator

import jax
import numpy as np
from absl import flags, logging

from jaxattr import utils


class DistributedError(RuntimeError):
  """A multi-process job that cannot run as given; the message says what to change."""


# JAX's default is 300 s; a process that never joins is reported after this long.
DEFAULT_TIMEOUT_S = 300

# Seconds this process spent on the costs of running as a job (`overhead`), by kind.
_OVERHEAD: collections.defaultdict[str, float] = collections.defaultdict(float)
_ACTIVE: list[str] = []


@contextlib.contextmanager
def overhead(kind: str) -> Iterator[None]:
  """Adds the block's wall time to this process's `overhead_seconds()[kind]`.

  Kinds used: 'start-up' (joining the job, checking config and workdir), 'barriers' (waiting for
  the other processes), 'gathers' (fetching results to the host, from all processes when there
  are several; the computation has finished before the clock starts), 'checkpoints' (writing
  orbax checkpoints). A block inside another counts for the outer one only.
  """
  if _ACTIVE:
    yield
    return
  _ACTIVE.append(kind)
  t0 = time.perf_counter()
  try:
    yield
  finally:
    _OVERHEAD[kind] += time.perf_counter() - t0
    _ACTIVE.pop()


def overhead_seconds() -> dict[str, float]:
  """{kind: seconds} spent so far by this process (see `overhead`)."""
  return dict(_OVERHEAD)


def define_flags() -> None:
  """The launchers' multi-process flags (absl)."""
  flags.DEFINE_string(
      "coordinator_address", None, "HOST:PORT of process 0's coordinator (jax.distributed); with "
      "--num_processes and --process_id. Unset: JAX's detection on TPU VMs, SLURM and Open MPI, "
      "else one process.")
  flags.DEFINE_integer("num_processes", None, "Processes of the job (with --coordinator_address).",
                       lower_bound=1)
  flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).",
                       lower_bound=0)
  flags.DEFINE_list("local_device_ids", None,
                    "Local devices this process uses (JAX's local_device_ids); unset: all.")
  flags.DEFINE_integer("distributed_timeout", DEFAULT_TIMEOUT_S,
                       "Seconds to wait for every process to join.", lower_bound=1)


def cluster_environment(env: dict[str, str] | None = None) -> str | None:
  """The multi-process environment JAX can detect by itself, or None (then: one process).

  SLURM: an `srun` step of more than one task; Open MPI: `mpirun` with more than one rank; TPU
  VM: JAX's own Cloud TPU detection (only when `env` is None: the process's environment), or a
  slice of more than one worker listed in TPU_WORKER_HOSTNAMES.
  """
  if env is None:
    env = dict(os.environ)
    if _jax_detects_tpu():
      return "TPU VM"
  if env.get("SLURM_STEP_ID") is not None and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "TPU VM slice"
  return None


def _jax_detects_tpu() -> bool:
  # JAX's own Cloud TPU detection (its metadata-based check, which SSH sessions on a TPU VM
  # slice's workers pass without any environment variable). JAX-internal, so guarded: where it
  # is missing, the environment checks above decide.
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    return any(c.is_env_present()
               for c in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if "Tpu" in c.__name__ and not getattr(c, "opt_in_only_method", False))
  except Exception:  # pylint: disable=broad-except
    return False


@dataclasses.dataclass(frozen=True)
class JobInfo:
  """Who this process is in the job."""

  process_index: int
  process_count: int
  local_devices: int
  global_devices: int
  how: str

  def describe(self) -> str:
    return (f"process {self.process_index} of {self.process_count} ({self.how}): "
            f"{self.local_devices} local devices ({jax.local_devices()[0].platform}), "
            f"{self.global_devices} global devices")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               timeout_s: int = DEFAULT_TIMEOUT_S) -> JobInfo:
  """Joins the job (before any JAX computation) and logs one line saying who this process is.

  Raises:
    DistributedError: flags given partly or inconsistently (naming them), before joining.
  """
  given = {
      "--coordinator_address": coordinator_address,
      "--num_processes": num_processes,
      "--process_id": process_id
  }
  how = "one process"
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise DistributedError(
          f"{', '.join(missing)} not given: a multi-process job needs --coordinator_address, "
          "--num_processes and --process_id on every process (or none of them, where JAX detects "
          "the cluster: TPU VMs, SLURM, Open MPI)")
    if not 0 <= process_id < num_processes:
      raise DistributedError(
          f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
    if ":" not in coordinator_address:
      raise DistributedError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT "
                             "(process 0's host, a free port)")
    if num_processes > 1:
      how = f"coordinator {coordinator_address}"
      with overhead("start-up"):
        _join(coordinator_address, num_processes, process_id, local_device_ids, timeout_s, how)
  elif cluster_environment() is not None:
    how = f"detected {cluster_environment()}"
    with overhead("start-up"):
      _join(None, None, None, local_device_ids, timeout_s, how)
  info = JobInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), how)
  logging.info("%s", info.describe())
  return info


def _join(address, count, pid, local_device_ids, timeout_s, how) -> None:
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    # Cross-process collectives of the CPU backend (several local processes, the tests).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX ends the process itself (a fatal error, not an exception) when some process does not
  # join in time, so the line a user needs comes first.
  logging.info(
      "joining the job (%s) as process %s of %s; waiting up to %d s for every process. If this "
      "times out: start all processes with the same --coordinator_address and --num_processes, "
      "and check that this host reaches the coordinator's host and port", how,
      "?" if pid is None else pid, "?" if count is None else count, timeout_s)
  kwargs: dict[str, Any] = {"initialization_timeout": int(timeout_s)}
  if local_device_ids is not None:
    kwargs["local_device_ids"] = [int(i) for i in local_device_ids]
  jax.distributed.initialize(address, count, pid, **kwargs)
  if jax.local_devices()[0].platform == "cpu" and share_cpu_compilation_cache():
    logging.info("compilation cache: CPU programs keyed alike on every process, so all of them "
                 "load what process 0 compiled (`share_cpu_compilation_cache`)")


def host_cpu_signature() -> str:
  """This host's CPU model and instruction-set flags (what XLA:CPU's code generation targets), as
  Linux lists them in /proc/cpuinfo; elsewhere Python's description of the machine."""
  import platform  # pylint: disable=g-import-not-at-top
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("vendor_id", "model name", "flags") and name not in fields:
          fields[name] = " ".join(sorted(value.split())) if name == "flags" else value.strip()
  except OSError:
    pass
  if "flags" not in fields:
    fields = {"machine": platform.machine(), "processor": platform.processor()}
  return "; ".join(f"{k}={v}" for k, v in sorted(fields.items()))


def share_cpu_compilation_cache() -> bool:
  """Keys the programs of a multi-process CPU job alike on every process, so that all of them load
  the entries process 0 writes to JAX's persistent compilation cache. Returns whether it could
  (False where this JAX lacks the internals it replaces, or they take other arguments; nothing
  changes then). Call it only in a process whose backend is the CPU.

  JAX writes cache entries from process 0 only, and keys them, among other things, by the
  devices' topology and by the device assignment. On the CPU backend the topology is that of each
  process's own client (its local devices), so it differs from process to process: the other
  processes never find process 0's entries and compile every program of every run again, while
  process 0 waits for them at the next collective (measured on 2 cores: ~15 s per run for the
  MoCo step alone, and every per-process program of the ESVM solver). Here, as JAX itself does for
  GPUs, the device assignment is left out of the key (the executable is loaded onto the devices
  of the call, whichever process holds them), and the topology fingerprint is replaced by the
  number of devices, which of them share a process (numbered in order of appearance, so process
  1's one-device programs key like process 0's) and this host's CPU (`host_cpu_signature`). The
  rest of the key (the program, its shardings and compile options, the JAX/XLA versions and
  flags) is JAX's own, so a process loads only what it would have compiled itself, and a host
  with another CPU compiles its own.
  """
  try:
    from jax._src import cache_key  # pylint: disable=g-import-not-at-top
    hash_topology = cache_key._hash_accelerator_config  # pylint: disable=protected-access
    hash_options = cache_key._hash_serialized_compile_options  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False
  if getattr(hash_topology, "jaxattr_shared", False):
    return True
  try:  # Replaced only where they take the arguments this was written against.
    expected = (["hash_obj",
                 "accelerators"], ["hash_obj", "compile_options_obj", "strip_device_assignment"])
    if [list(inspect.signature(f).parameters) for f in (hash_topology, hash_options)
       ] != list(expected):
      return False
  except (TypeError, ValueError):
    return False
  cpu = host_cpu_signature()

  def hash_accelerator_config(hash_obj, accelerators):
    devices = list(np.asarray(accelerators).flat)
    if not devices or any(getattr(d, "platform", None) != "cpu" for d in devices):
      return hash_topology(hash_obj, accelerators)
    order: dict[int, int] = {}
    layout = [order.setdefault(d.process_index, len(order)) for d in devices]
    hash_obj.update(f"jaxattr cpu: {len(devices)} devices, processes {layout}; {cpu}".encode())

  def hash_serialized_compile_options(hash_obj, compile_options_obj, strip_device_assignment=False):
    del strip_device_assignment
    return hash_options(hash_obj, compile_options_obj, strip_device_assignment=True)

  hash_accelerator_config.jaxattr_shared = True
  cache_key._hash_accelerator_config = hash_accelerator_config  # pylint: disable=protected-access
  cache_key._hash_serialized_compile_options = hash_serialized_compile_options  # pylint: disable=protected-access
  return True


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_main() -> bool:
  """Whether this process writes the job's shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    with overhead("barriers"):
      multihost_utils.sync_global_devices(name)


def global_array(mesh: Any, array: np.ndarray, spec: Any) -> jax.Array:
  """A global jax.Array laid out as `NamedSharding(mesh, spec)` from a host array that every
  process holds in full (each process places its own devices' pieces: multi-host safe)."""
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def host_copy(tree: Any) -> Any:
  """NumPy copies of a pytree of (possibly global) arrays, in full on every process.

  Replicated arrays are copied from this process's own devices; arrays sharded over processes
  are gathered from all of them, so where any leaf is, every process must call this (a
  collective, in the same order everywhere).
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      with overhead("gathers"):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree_util.tree_map(one, tree)


def job_overhead() -> dict[str, Any]:
  """Every process's `overhead_seconds()`, gathered (all processes must call it):
  {'processes', 'devices', 'seconds': {kind: [seconds of process 0, 1, ...]}}."""
  kinds = ("start-up", "barriers", "gathers", "checkpoints")
  mine = np.asarray([_OVERHEAD.get(k, 0.0) for k in kinds], np.float64)
  rows = _allgather(mine).reshape(-1, len(kinds)) if jax.process_count() > 1 else mine[None]
  return {
      "processes": jax.process_count(),
      "devices": jax.device_count(),
      "seconds": {
          k: [round(float(v), 3) for v in rows[:, i]] for i, k in enumerate(kinds)
      }
  }


def _allgather(values: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def check_job(config: Any, workdir: str) -> None:
  """Every process runs the same config on one shared workdir (no-op for one process).

  Raises:
    DistributedError: configs that differ between processes (naming them and the hashes), or a
      workdir that is not the same directory on every process (naming those that cannot see
      process 0's files), before any stage work.
  """
  if jax.process_count() == 1:
    return
  with overhead("start-up"):
    _check_job(config, workdir)


def _check_job(config: Any, workdir: str) -> None:
  n = jax.process_count()
  mine = utils.config_hash(config)
  hashes = _allgather(np.frombuffer(mine.encode(), np.uint8))
  texts = [bytes(h.astype(np.uint8)).decode() for h in hashes.reshape(n, -1)]
  if len(set(texts)) > 1:
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(texts):
      groups.setdefault(h, []).append(i)
    raise DistributedError("the processes run different configs (hash: processes " +
                           "; ".join(f"{h}: {ids}" for h, ids in groups.items()) +
                           "); give every process the same --config file and --config.* overrides")
  everyone = _who_sees(workdir, "workdir")
  if not everyone.all():
    raise DistributedError(
        f"--workdir={workdir} is not one directory that all processes see: processes "
        f"{np.flatnonzero(~everyone).tolist()} cannot read what process 0 wrote there; put "
        "the workdir on a file system every host mounts (NFS, a shared disk, GCS through "
        "gcsfuse) at the same path")
  _share_compiled_programs()


def _who_sees(directory: str | None, what: str) -> np.ndarray:
  """Which processes (bool [process_count]) read back the token process 0 writes into
  `directory` (created on process 0; None: no process sees it). A collective: every process
  calls it, in the same order."""
  # The token is a nonce all processes share, so a stale file never passes for a shared one.
  nonce = _allgather(np.frombuffer(secrets.token_hex(8).encode(), np.uint8))[0]
  token = bytes(nonce.astype(np.uint8)).decode()
  path = os.path.join(directory, f".shared-check-{token}") if directory else None
  if path and is_main():
    os.makedirs(directory, exist_ok=True)
    with utils.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write(token)
  barrier(f"jaxattr-shared-{what}-written")
  seen = False
  if path:
    try:
      with open(path) as f:
        seen = f.read() == token
    except OSError:
      pass
  everyone = _allgather(np.asarray([int(seen)], np.int32)).reshape(-1)
  barrier(f"jaxattr-shared-{what}-read")
  if path and is_main():
    os.remove(path)
  return everyone.astype(bool)


def _share_compiled_programs() -> None:
  """Where every process uses one persistent compilation cache directory, turns on JAX's sharing
  of compiled programs (`jax_share_binary_between_hosts`): a program over the devices of several
  processes that is in no cache yet is compiled by one process and handed to the others through
  the job's key-value store, instead of being compiled by all of them at once (on this project's
  2-core machine the 2 processes of a cold run compiled every such program twice, on the same
  cores). Only where the cache is shared: with one cache per host, process 0 could find a program
  in its own cache while another process waits for it to be compiled. The processes decide
  together, so they all share or none does.
  """
  directory = jax.config.jax_compilation_cache_dir
  everyone = _who_sees(directory, "cache")
  if everyone.all():
    jax.config.update("jax_share_binary_between_hosts", True)
    logging.info(
        "compilation cache %s is shared by all processes: programs over several "
        "processes are compiled once and handed to the others", directory)
  else:
    logging.info(
        "compilation cache not shared by all processes (processes %s do not see process 0's "
        "%s): each compiles its own programs, and on reruns only process 0 finds them (JAX "
        "writes the cache from process 0 only); give every host --compilation_cache on a shared "
        "file system to share them",
        np.flatnonzero(~everyone).tolist(), directory or "cache")
