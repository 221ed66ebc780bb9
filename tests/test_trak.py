"""TRAK in JAX: the projection, the estimator, and the golden test against the `traker` package.

The golden test trains two small ResNet-9s with the project's trainer (16x16 digits, width
1/8), copies their weights into the torch reference ResNet-9 and computes TRAK scores both ways
with ONE shared projection matrix (drawn here, in each side's parameter order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import augment, config, data
from jaxattr.attribute import trak
from jaxattr.counterfactual import ensemble, store


def tiny_trainer_config(**overrides):
  cfg = config.trainer_section()
  cfg.update({
      "width": 0.125,
      "epochs": 2,
      "batch_size": 32,
      "peak_epoch": 1.0,
      "eval_batch_size": 16,
      "models_per_wave": 2,
      "log_every_s": 1e9
  })
  cfg.update(overrides)
  return cfg


def trak_config(**overrides):
  c = config.base_config()
  c.ensemble = tiny_trainer_config()
  c.trak.update({"num_models": 2, "proj_dim": 32, "chunk_size": 64, "block_rows": 512})
  c.trak.update(overrides)
  return c


@pytest.fixture(scope="module")
def digits():
  train = data.load("digits", "train", size=16).subset(np.arange(256))
  test = data.load("digits", "test", size=16)
  return train, test


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
  """Two models of the project's trainer, kept in an EnsembleStore."""
  train, _ = digits
  trainer = ensemble.Trainer(tiny_trainer_config(), train)
  directory = str(tmp_path_factory.mktemp("ens"))
  variables = store.EnsembleStore(directory, trainer, [3, 4]).train()
  return trainer, variables, directory


def test_margin_is_log_odds():
  logits = jnp.asarray([1.0, 2.5, -0.3, 0.7])
  p = jax.nn.softmax(logits)
  np.testing.assert_allclose(trak.margin(logits, 1), np.log(p[1] / (1 - p[1])), rtol=1e-6)
  np.testing.assert_allclose(
      trak.margins(np.asarray(logits)[None], np.asarray([1]))[0], np.log(p[1] / (1 - p[1])),
      rtol=1e-6)


def test_projection_blocks_equal_one_matrix():
  """Projecting leaf by leaf in blocks equals flat(grads) @ the whole matrix, for any chunk."""
  rng = np.random.default_rng(0)
  tree = {
      "a": jnp.asarray(rng.normal(size=(5, 3, 40)), jnp.float32),  # 120 rows: 4 blocks
      "b": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  }  # 7 rows: one partial block
  for kind in trak.PROJECTIONS:
    proj = trak.Projection(dim=16, kind=kind, seed=3, block_rows=32)
    mat = proj.matrix(jax.tree_util.tree_map(lambda a: a[0], tree), model=2)
    assert mat.shape == (127, 16)
    if kind == "rademacher":
      assert set(np.unique(mat)) == {-1.0, 1.0}
    flat = np.concatenate([np.asarray(tree["a"]).reshape(5, -1), np.asarray(tree["b"])], 1)
    got = jax.jit(proj.project, static_argnums=())(tree, 2)
    np.testing.assert_allclose(got, flat @ mat, rtol=1e-5, atol=1e-4)
    other = jax.jit(proj.project)(tree, 3)  # another model, another matrix
    assert not np.allclose(got, other)


def test_kernel_refuses_singular():
  x = np.ones((4, 8), np.float32)
  with pytest.raises(trak.TrakError, match="proj_dim"):
    trak.kernel(x)
  k = trak.kernel(x, 1.0)
  np.testing.assert_allclose(
      k @ (x.T @ x + np.eye(8)) * np.abs(np.linalg.inv(x.T @ x + np.eye(8))).mean(), np.eye(8),
      atol=1e-4)


def test_settings_are_checked():
  c = config.trak_section()
  c.proj_dim = 0
  with pytest.raises(trak.TrakError, match="trak.proj_dim"):
    trak.check_settings(c)
  c = config.trak_section()
  c.projection = "sparse"
  with pytest.raises(trak.TrakError, match="trak.projection"):
    trak.check_settings(c)


def test_store_resumes_and_shares_models(digits, trained, tmp_path):
  trainer, variables, directory = trained
  again = store.EnsembleStore(directory, trainer, [3, 4])
  assert again.missing() == []
  reloaded = again.train()  # nothing to train: read back
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(reloaded)):
    np.testing.assert_array_equal(a, b)
  # Another ensemble of the same recipe shares seed 4's model and trains seed 5 only.
  other = store.EnsembleStore(directory, trainer, [4, 5])
  assert other.missing() == [5]
  both = other.train()
  assert other.missing() == []
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(both)):
    np.testing.assert_array_equal(a[1], b[0])
  # Another recipe (config) never reads them.
  cfg = trainer.config.copy_and_resolve_references()
  cfg.epochs = 1
  assert store.EnsembleStore(directory, ensemble.Trainer(cfg, trainer.train), [4]).missing() == [4]
  # evaluate: any function of the logits, for every model.
  _, test = digits
  logits = store.evaluate(trainer, variables, test.images[:20], test.labels[:20], lambda z, y: z,
                          batch_size=8)
  assert logits.shape == (2, 20, 10)
  want, _ = trainer.train_and_predict(test.images[:20], [3, 4])
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_scores_equal_traker(digits, trained, tmp_path):
  """Same weights, same projection matrix: jaxattr's TRAK scores equal traker's within 1e-4."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("trak")
  from trak import TRAKer  # pylint: disable=g-import-not-at-top
  from trak.projectors import AbstractProjector  # pylint: disable=g-import-not-at-top
  from trak.utils import vectorize  # pylint: disable=g-import-not-at-top

  from benchmarks.torch_reference import resnet9_to_torch, torch_resnet9  # pylint: disable=g-import-not-at-top

  train, test = digits
  trainer, variables, _ = trained
  cfg = trainer.config
  proj_dim, m_count = 32, 2
  ref = torch_resnet9(float(cfg.width)).eval()
  one = jax.tree_util.tree_map(lambda a: a[0], variables)
  # The parameter-order map: each Flax leaf filled with its flat positions, moved to torch's
  # layout, read in torch's order.
  leaves, treedef = jax.tree_util.tree_flatten(one["params"])
  sizes = np.cumsum([0] + [x.size for x in leaves])
  positions = jax.tree_util.tree_unflatten(
      treedef, [np.arange(sizes[i], sizes[i + 1]).reshape(x.shape) for i, x in enumerate(leaves)])
  pos_torch, _ = resnet9_to_torch(ref, {"params": positions, "batch_stats": one["batch_stats"]})
  order = np.concatenate([pos_torch[n].ravel() for n, _ in ref.named_parameters()])
  assert sorted(order.tolist()) == list(range(sizes[-1]))
  mat_jax = np.random.default_rng(0).choice([-1.0, 1.0],
                                            size=(sizes[-1], proj_dim)).astype(np.float32)
  mat_torch = torch.from_numpy(mat_jax[order])

  class Shared(AbstractProjector):

    def __init__(self):
      super().__init__(seed=0, proj_dim=proj_dim, grad_dim=sizes[-1], proj_type="rademacher",
                       device="cpu")

    def project(self, grads, model_id):
      if isinstance(grads, dict):
        grads = vectorize(grads, device="cpu")
      return grads @ mat_torch

    def free_memory(self):
      pass

  def shared_project(grads, model_id):
    del model_id
    flat = jnp.concatenate([g.reshape(g.shape[0], -1) for g in jax.tree_util.tree_leaves(grads)], 1)
    return flat @ jnp.asarray(mat_jax)

  c = trak_config(num_models=m_count, proj_dim=proj_dim)
  c.ensemble = cfg
  t = trak.Trak(c, str(tmp_path / "jax"), train, trainer=trainer, project=shared_project)
  t._variables = variables  # the trained models above  # pylint: disable=protected-access
  targets = np.arange(12)
  got = t.scores(test.images[targets], test.labels[targets])  # [T, N]

  def torch_inputs(images):
    x = np.asarray(augment.cifar_normalize(jnp.asarray(images)))
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  traker = TRAKer(model=ref, task="image_classification", train_set_size=len(train),
                  projector=Shared(), proj_dim=proj_dim, device="cpu", use_half_precision=False,
                  save_dir=str(tmp_path / "traker"))
  xs, ys = torch_inputs(train.images), torch.from_numpy(train.labels.astype(np.int64))
  state = {}
  for m in range(m_count):
    p, b = resnet9_to_torch(ref, jax.tree_util.tree_map(lambda a, m=m: a[m], variables))
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in {**p, **b}.items()}
    sd.update({k: v for k, v in ref.state_dict().items() if k not in sd})  # num_batches_tracked
    state[m] = sd
    traker.load_checkpoint(sd, model_id=m)
    for s in range(0, len(train), 64):
      traker.featurize(batch=(xs[s:s + 64], ys[s:s + 64]), num_samples=len(xs[s:s + 64]))
  traker.finalize_features()
  xt = torch_inputs(test.images[targets])
  yt = torch.from_numpy(test.labels[targets].astype(np.int64))
  for m in range(m_count):
    traker.start_scoring_checkpoint(exp_name="golden", checkpoint=state[m], model_id=m,
                                    num_targets=len(targets))
    traker.score(batch=(xt, yt), num_samples=len(targets))
  want = np.asarray(traker.finalize_scores(exp_name="golden")).T  # traker: [N, T]
  assert got.shape == want.shape == (len(targets), len(train))
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
  # And the top-k it gives: same-class positions of the largest scores.
  pos, top = trak.topk_rows(got, train.labels, test.labels[targets], 5, same_class=True)
  assert np.all(train.labels[pos] == test.labels[targets][:, None])
  np.testing.assert_array_equal(top, np.take_along_axis(got, pos, 1))


def test_trak_resumes_featurisation_and_scores_the_same(digits, trained, tmp_path):
  """A run killed mid-featurisation resumes at its first unwritten chunk; scores are the same as
  an uninterrupted run's, and a rerun reads everything back."""
  train, test = digits
  trainer, variables, directory = trained
  c = trak_config(num_models=2, proj_dim=32, chunk_size=8)  # store chunks of 64 rows: 4 per model
  c.ensemble = trainer.config
  targets = np.arange(6)

  def make(workdir):
    t = trak.Trak(c, workdir, train, trainer=trainer)
    t._variables = variables  # pylint: disable=protected-access
    return t

  want = make(str(tmp_path / "a")).scores(test.images[targets], test.labels[targets])
  t = make(str(tmp_path / "b"))
  calls = []
  real = t.featurize

  def dying(*args, **kwargs):
    if len(calls) == 5:  # model 0 done (4 chunks), then one chunk of model 1
      raise KeyboardInterrupt
    calls.append(1)
    return real(*args, **kwargs)

  t.featurize = dying
  with pytest.raises(KeyboardInterrupt):
    t.prepare()
  t = make(str(tmp_path / "b"))
  calls.clear()
  real = t.featurize

  def counting(*args, **kwargs):
    calls.append(len(args[1]))
    return real(*args, **kwargs)

  t.featurize = counting
  got = t.scores(test.images[targets], test.labels[targets])
  # model 1's last three store chunks, then the targets of both models
  assert calls == [64, 64, 64, 6, 6]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  calls.clear()
  again = make(str(tmp_path / "b"))
  again.featurize = counting
  np.testing.assert_array_equal(again.scores(test.images[targets], test.labels[targets]), got)
  assert calls == [6, 6]  # nothing but the targets


_SHARDED = r"""
import sys
from jaxattr import xla_flags
xla_flags.use_fast_cpu_flags()
import jax, numpy as np
from jaxattr import config, data
from jaxattr.attribute import trak
from jaxattr.counterfactual import ensemble

train = data.load("digits", "train", size=16).subset(np.arange(96))
test = data.load("digits", "test", size=16)
c = config.base_config()
c.ensemble.update({"width": 0.0625, "epochs": 1, "batch_size": 32, "eval_batch_size": 16,
                   "models_per_wave": 0, "log_every_s": 1e9})
c.trak.update({"num_models": 2, "proj_dim": 16, "chunk_size": 12, "block_rows": 256})
t = trak.Trak(c, sys.argv[1], train, trainer=ensemble.Trainer(c.ensemble, train))
np.save(sys.argv[1] + "/scores.npy", t.scores(test.images[:5], test.labels[:5]))
print(jax.local_device_count())
"""


def test_trak_sharded_over_devices_equals_one_device(tmp_path):
  """Chunks sharded over 4 fake CPU devices give one device's scores (and the same models)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from tests.conftest import REPO, repo_env  # pylint: disable=g-import-not-at-top
  out = {}
  for devices in (1, 4):
    env = repo_env()
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=1")
    d = tmp_path / str(devices)
    d.mkdir()
    res = subprocess.run([sys.executable, "-c", _SHARDED, str(d)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(devices)
    out[devices] = np.load(d / "scores.npy")
  np.testing.assert_allclose(out[4], out[1], rtol=1e-5, atol=1e-6 * np.abs(out[1]).max())
