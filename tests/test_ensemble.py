"""The ensemble trainer: per-model semantics, sampler, schedule, wave independence, sharding.

Training tests use 16x16 digits, width 1/16 and batches of 32 so each compiles and runs in
seconds on a 2-core CPU; trainers are shared between tests so each wave size compiles once.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattr import augment, config, data
from jaxattr.counterfactual import ensemble, flip


def tiny_config(**overrides):
  cfg = config.trainer_section()
  cfg.update({
      "width": 0.0625,
      "epochs": 2,
      "batch_size": 32,
      "eval_batch_size": 16,
      "log_every_s": 1e9
  })
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def tiny():
  """128 training images (4 steps of 32 per epoch) and 16 eval images, 16x16 digits."""
  train = data.load("digits", "train", size=16).subset(np.arange(128))
  test = data.load("digits", "test", size=16)
  return train, test.images[:16]


@pytest.fixture(scope="module")
def trainers(tiny):
  """One Trainer per formulation on the tiny set, reused (their programs compile once)."""
  return {f: ensemble.Trainer(tiny_config(formulation=f), tiny[0]) for f in ("map", "vmap")}


def leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def take(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def relabel(train, positions, cls):
  labels = train.labels.copy()
  labels[positions] = cls
  return data.Dataset(images=train.images, labels=labels, index=train.index,
                      class_names=train.class_names)


# --- pure pieces ------------------------------------------------------------------------------


def test_schedule_matches_hand_computation():
  cfg = config.trainer_section()  # 24 epochs, peak 0.5 at epoch 5, batch 512
  n = 50_000
  assert ensemble.iterations_per_epoch(cfg, n) == 97
  steps = np.array([
      0, 1, 97 * 5 // 2, 97 * 5, 97 * 5 + 1,
      int(97 * 14.5), 97 * 24 - 1, 97 * 24, 97 * 30
  ])
  want = [
      0.0, 0.5 / 485, 0.5 * 242 / 485, 0.5, 0.5 * (1843 - 1) / 1843, 0.5 * 922 / 1843, 0.5 / 1843,
      0.0, 0.0
  ]
  got = np.asarray(ensemble.learning_rate(steps, cfg, n))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  # Removing images does not change the schedule: it follows the FULL set (or the override).
  cfg.schedule_examples = 50_000
  np.testing.assert_allclose(np.asarray(ensemble.learning_rate(steps, cfg, 48_720)), want,
                             rtol=1e-4, atol=1e-7)


def test_optimizer_is_torch_sgd_with_the_schedule():
  """optax chain == torch SGD (g += wd p; buf = m buf + g; p -= lr buf) up to float rounding."""
  cfg = config.trainer_section()
  tx = ensemble.make_optimizer(cfg, 50_000)
  rng = np.random.default_rng(0)
  p = jnp.asarray(rng.normal(size=5), jnp.float32)
  opt_state, want_p, buf = tx.init(p), np.asarray(p, np.float64), np.zeros(5)
  for step in range(4):
    g = jnp.asarray(rng.normal(size=5), jnp.float32)
    updates, opt_state = tx.update(g, opt_state, p)
    p = optax.apply_updates(p, updates)
    lr = np.interp(step, [0, 5 * 97, 24 * 97], [0, 0.5, 0])
    buf = 0.9 * buf + np.asarray(g, np.float64) + 5e-4 * want_p
    want_p = want_p - lr * buf
    np.testing.assert_allclose(np.asarray(p), want_p, rtol=1e-6, atol=1e-7)


def test_epoch_batches_never_draws_removed_images():
  rng = np.random.default_rng(0)
  n, bs = 1000, 64
  keep = rng.random(n) < 0.7
  kept = int(keep.sum())
  seen = []
  for epoch in range(3):
    idx, valid = ensemble.epoch_batches(jax.random.key(epoch), jnp.asarray(keep), bs,
                                        num_steps=n // bs)
    idx, valid = np.asarray(idx), np.asarray(valid)
    assert valid.sum() == kept // bs and valid[:kept // bs].all()
    used = idx[valid].ravel()
    assert keep[used].all(), "a removed image was drawn"
    assert len(np.unique(used)) == len(used), "an image was drawn twice in one epoch"
    seen.append(used)
  assert not np.array_equal(seen[0], seen[1])  # a fresh permutation every epoch
  # Fewer rows are a prefix of more rows: the plan's row count is not part of the result.
  short = ensemble.epoch_batches(jax.random.key(2), jnp.asarray(keep), bs, num_steps=3)
  np.testing.assert_array_equal(np.asarray(short[0]), idx[:3])


def test_counterfactual_subset_removes_or_relabels_the_used_prefix():
  labels = jnp.arange(10, dtype=jnp.int32) % 3
  prefix = jnp.asarray([7, 2, 5, 9], jnp.int32)  # the unused tail may hold anything
  keep, lab = ensemble.counterfactual_subset(prefix, jnp.int32(2), jnp.int32(-1), labels)
  assert np.flatnonzero(~np.asarray(keep)).tolist() == [2, 7]
  np.testing.assert_array_equal(lab, labels)
  keep, lab = ensemble.counterfactual_subset(prefix, jnp.int32(3), jnp.int32(1), labels)
  assert np.asarray(keep).all()
  want = np.asarray(labels).copy()
  want[[7, 2, 5]] = 1
  np.testing.assert_array_equal(lab, want)
  keep, lab = ensemble.counterfactual_subset(prefix, jnp.int32(0), jnp.int32(-1), labels)
  assert np.asarray(keep).all()


def test_trainer_plan_uses_each_models_own_subset(trainers):
  """The batch plan the trainer feeds its step only holds each model's kept images."""
  trainer = trainers["map"]
  prefixes = np.stack([np.zeros(43, int), np.arange(0, 128, 3)])
  sizes = np.array([0, 43], np.int32)  # model 1 removes 43 and keeps 85 images: 2 steps of 32
  keep, _ = trainer.subsets(jnp.asarray(prefixes, jnp.int32), jnp.asarray(sizes),
                            jnp.asarray([-1, -1], jnp.int32), trainer.labels)
  keys = jax.vmap(jax.random.key)(jnp.arange(2, dtype=jnp.uint32))
  idx, valid = trainer.plan(keys, keep, jnp.int32(0))
  idx, valid, keep = np.asarray(idx), np.asarray(valid), np.asarray(keep)
  assert keep.sum(1).tolist() == [128, 85]
  assert valid.tolist() == [[True] * 4, [True, True, False, False]]
  assert keep[1][idx[1][valid[1]]].all()
  assert sorted(idx[0].ravel()) == list(range(128))


def test_cifar_train_views_translate_cutout_flip():
  img = np.full((64, 16, 16, 3), 200, np.uint8)
  x = np.asarray(
      augment.cifar_train_views(jax.random.key(0), img, flip=False, translate=0, cutout=4))
  mean_px = np.isclose(x, 0.0, atol=1e-5).all(-1)  # cutout pixels are the mean -> 0
  assert (mean_px.sum((1, 2)) == 16).all()  # exactly one 4x4 square per image
  x = np.asarray(
      augment.cifar_train_views(jax.random.key(1), img, flip=False, translate=2, cutout=0))
  zero_px = np.isclose(x, -np.asarray(augment.CIFAR_MEAN) / np.asarray(augment.CIFAR_STD),
                       atol=1e-5).all(-1)
  assert zero_px.any() and not zero_px.all()  # zero padding shows at some borders
  ramp = np.broadcast_to(np.arange(16, dtype=np.uint8)[None, None, :, None], (64, 16, 16, 3))
  x = np.asarray(
      augment.cifar_train_views(jax.random.key(2), ramp, flip=True, translate=0, cutout=0))
  flipped = x[:, 0, 0, 0] > x[:, 0, -1, 0]
  assert 10 < flipped.sum() < 54  # about half are flipped
  np.testing.assert_allclose(
      augment.cifar_normalize(np.full((1, 3), 255, np.uint8))[0],
      (255 - np.asarray(augment.CIFAR_MEAN)) / augment.CIFAR_STD, rtol=1e-6)


def test_flip_from_probs():
  probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]])
  np.testing.assert_array_equal(flip.flip_from_probs(probs, np.array([1, 2, 2])), [2, 0, 0])


def test_near_tied_flip_classes_are_found():
  probs = np.array([[0.1, 0.45, 0.45], [0.4, 0.2, 0.4 - 5e-5], [0.3, 0.3, 0.4], [0.5, 0.2, 0.3]])
  # Row 0: 1 and 2 tie (true 0); row 1: 0 beats 2 by 5e-5 (true 1); row 2: the true class 2 is
  # top and 0, 1 tie below it; row 3: 0 wins clearly.
  np.testing.assert_array_equal(flip.near_ties(probs, np.array([0, 1, 2, 1])), [0, 1, 2])


def test_flip_classes_warns_of_near_ties(monkeypatch):
  # Logits whose softmax puts classes 1 and 2 level for image 0 and class 0 clearly first for 1.
  logits = np.log(np.array([[[0.2, 0.4, 0.4], [0.1, 0.2, 0.7]]], np.float32))

  class Stub:

    def train_and_predict(self, images, seeds):
      assert len(seeds) == 1
      return logits, None

  messages = []
  monkeypatch.setattr(flip.logging, "warning", lambda msg, *a: messages.append(msg % a))
  probs, classes = flip.flip_classes(Stub(), np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]),
                                     num_models=1, seed=0)
  np.testing.assert_array_equal(classes, [1, 2])
  np.testing.assert_allclose(probs, np.exp(logits[0]), rtol=1e-6)
  assert len(messages) == 1
  assert "flip classes of 1 of 2 targets (eval positions [0])" in messages[0]
  assert "support.flip_models in the pipeline, num_models in launch/flip.py" in messages[0]
  assert "may separate them" in messages[0]


def test_bad_inputs_fail_early(tiny, trainers):
  train, ev = tiny
  trainer = trainers["map"]
  full = np.arange(128)[None].repeat(2, 0)
  cases = [
      ({
          "seeds": [0.5]
      }, "seeds must be a non-empty int"),
      ({
          "eval_images": ev[:, :8]
      }, r"eval_images must be uint8 \[E, 16, 16, 3\]"),
      ({
          "prefixes": full[:, None]
      }, r"prefixes must be int \[M=2, K\]"),
      ({
          "prefixes": full,
          "sizes": [0, 129]
      }, r"sizes must be int \[M=2\] in \[0, K=128\]"),
      ({
          "prefixes": full + 1,
          "sizes": [128, 5]
      }, r"positions in \[0, N=128\), got prefixes\[0, 127\] = 128"),
      ({
          "prefixes": np.zeros((2, 3), int),
          "sizes": [1, 2]
      }, "got row 1 repeats 0"),
      ({
          "prefixes": full,
          "flip": [0, 10]
      }, r"flip must be int \[M=2\] in \[-1, 10\)"),
      ({
          "prefixes": full,
          "flip": [-2, 0]
      }, r"flip must be int \[M=2\] in \[-1, 10\)"),
      ({
          "prefixes": full,
          "sizes": [0, 100]
      }, r"models \[1\] keep fewer images than one batch"),
      ({
          "sizes": [1, 0]
      }, "sizes without prefixes"),
  ]
  for kwargs, message in cases:
    args = {"eval_images": ev, "seeds": [0, 1], **kwargs}
    with pytest.raises(ValueError, match=message):
      trainer.train_and_predict(**args)
  # Unused prefix entries may hold anything; a relabelled prefix keeps every image.
  trainer.check_arguments(ev, [0, 1], np.full((2, 3), -5), [0, 0], None)
  assert trainer.check_arguments(ev, [0, 1], full, [100, 90], [3, -1])[-1].tolist() == [128, 38]
  with pytest.raises(ValueError, match="formulation"):
    ensemble.Trainer(tiny_config(formulation="pmap"), train)


# --- training semantics -----------------------------------------------------------------------


@pytest.mark.parametrize("formulation", ["vmap", "map"])
def test_two_models_equal_two_single_runs(tiny, trainers, formulation):
  """Model i's result does not depend on the other models of its wave (one removal, one
  mislabel model in the same call, with different step counts)."""
  train, ev = tiny
  trainer = trainers[formulation]
  prefixes = np.stack([np.arange(128), np.arange(128)[::-1]])
  sizes, flips, seeds = np.array([40, 64]), np.array([-1, 3]), np.array([3, 7])  # 2 vs 4 steps
  logits, _, params = trainer.train_and_predict(ev, seeds, prefixes, sizes, flips,
                                                return_params=True)
  for i in range(2):
    lo, _, pa = trainer.train_and_predict(ev, seeds[i:i + 1], prefixes[i:i + 1], sizes[i:i + 1],
                                          flips[i:i + 1], return_params=True)
    if formulation == "map":  # models run one after another: bit for bit
      np.testing.assert_array_equal(logits[i], lo[0])
      for a, b in zip(leaves(take(params, i)), leaves(take(pa, 0))):
        np.testing.assert_array_equal(a, b)
    else:  # batched convolutions round differently: float tolerance
      np.testing.assert_allclose(logits[i], lo[0], rtol=1e-3, atol=1e-3)
      for a, b in zip(leaves(take(params, i)), leaves(take(pa, 0))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  assert not np.allclose(logits[0], logits[1])


def test_same_seed_is_bitwise_reproducible_and_formulations_agree(tiny, trainers):
  _, ev = tiny
  a, _ = trainers["vmap"].train_and_predict(ev, [5])
  b, _ = trainers["vmap"].train_and_predict(ev, [5])
  c, _ = trainers["map"].train_and_predict(ev, [5])
  np.testing.assert_array_equal(a, b)
  # vmap and lax.map round differently and training amplifies it; same model up to that.
  np.testing.assert_allclose(a, c, rtol=0, atol=1e-2)


def test_removed_images_and_their_labels_are_never_used(tiny, trainers):
  """Changing removed images (pixels and labels) leaves the trained model bit-for-bit unchanged."""
  train, ev = tiny
  removed = np.flatnonzero(np.arange(128) % 4 == 1)  # 96 kept: 3 steps per epoch
  args = (ev, [1], removed[None], [len(removed)])
  base, _ = trainers["map"].train_and_predict(*args)
  garbled = relabel(train, removed, (train.labels[removed] + 3) % 10)
  garbled.images = train.images.copy()
  garbled.images[removed] = 255 - garbled.images[removed]
  other, _ = ensemble.Trainer(tiny_config(formulation="map"), garbled).train_and_predict(*args)
  np.testing.assert_array_equal(base, other)
  # ... while changing a KEPT image does change it (the check above can fail).
  kept = np.setdiff1d(np.arange(128), removed)
  garbled.images[kept] = 255 - garbled.images[kept]
  changed, _ = ensemble.Trainer(tiny_config(formulation="map"), garbled).train_and_predict(*args)
  assert not np.array_equal(base, changed)


def test_unreadable_images_are_trained_on_by_no_model(tiny, trainers):
  """Images a resident copy marks unreadable (`Dataset.ok` False) are removed from every model's
  training set: the models equal models that remove them, bit for bit, with or without a prefix
  of their own (which may name them too)."""
  train, ev = tiny
  unreadable = np.flatnonzero(np.arange(128) % 4 == 1)  # 96 readable: 3 steps per epoch
  ok = np.ones(128, bool)
  ok[unreadable] = False
  marked = ensemble.Trainer(
      tiny_config(formulation="map"),
      data.Dataset(images=train.images, labels=train.labels, index=train.index,
                   class_names=train.class_names, ok=ok))
  prefix = np.array([1, 0, 5, 2])  # two unreadable, two readable: 94 kept, 2 steps
  got, stats = marked.train_and_predict(ev, [1, 1], np.stack([prefix, prefix]), [0, 4])
  full, _ = trainers["map"].train_and_predict(ev, [1], unreadable[None], [len(unreadable)])
  both = np.union1d(unreadable, prefix)
  fewer, _ = trainers["map"].train_and_predict(ev, [1], both[None], [len(both)])
  np.testing.assert_array_equal(got[0], full[0])
  np.testing.assert_array_equal(got[1], fewer[0])
  assert not np.array_equal(got[0], got[1])
  # A mislabel model relabels its prefix but still never trains on the unreadable images.
  relab, _ = marked.train_and_predict(ev, [1], prefix[None], [4], [3])
  want, _ = ensemble.Trainer(tiny_config(formulation="map"), relabel(train, [0, 2], 3)).\
      train_and_predict(ev, [1], unreadable[None], [len(unreadable)])
  np.testing.assert_array_equal(relab, want)


def test_mislabelled_prefix_trains_like_a_relabelled_dataset(tiny, trainers):
  """A mislabel model equals a full-data model on a Dataset with the prefix relabelled."""
  train, ev = tiny
  prefix = np.arange(0, 128, 2)
  a, _ = trainers["map"].train_and_predict(ev, [2], prefix[None], [len(prefix)], [4])
  relabelled = ensemble.Trainer(tiny_config(formulation="map"), relabel(train, prefix, 4))
  b, _ = relabelled.train_and_predict(ev, [2])
  c, _ = trainers["map"].train_and_predict(ev, [2])
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_flip_classes_are_the_full_data_models(tiny, trainers):
  """flip_classes' ensemble is the full-data models of seeds seed, seed + 1 (same trainer)."""
  _, ev = tiny
  logits, _ = trainers["map"].train_and_predict(ev, np.array([11, 12]))
  probs, flips = flip.flip_classes(trainers["map"], ev, np.zeros(16, np.int32), num_models=2,
                                   seed=11)
  want = np.asarray(jax.nn.softmax(logits, axis=-1)).mean(0)
  np.testing.assert_allclose(probs, want, rtol=1e-6)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(flips, flip.flip_from_probs(want, np.zeros(16, np.int32)))
  assert (flips != 0).all()


def test_waves_give_the_same_models_and_compile_once(tiny, trainers, monkeypatch):
  """M=3 in waves of 2 (last wave padded) equals M=3 at once; with waves of the same shape the
  step is traced once over two calls, whatever each wave's step count."""
  train, ev = tiny
  prefixes = np.arange(128)[None].repeat(3, 0)
  sizes = np.array([0, 0, 64])  # model 2 takes 2 steps per epoch, the others 4
  cfg = tiny_config(formulation="map", epochs=1)
  at_once, stats = ensemble.Trainer(cfg, train).train_and_predict(ev, [0, 1, 2], prefixes, sizes)
  assert (stats.models, stats.waves, stats.wave) == (3, 1, 3)
  chex.clear_trace_counter()
  monkeypatch.setattr(ensemble, "train_step", chex.assert_max_traces(ensemble.train_step, n=1))
  cfg.models_per_wave = 2
  trainer = ensemble.Trainer(cfg, train)
  in_waves, stats = trainer.train_and_predict(ev, [0, 1, 2], prefixes, sizes)
  np.testing.assert_array_equal(at_once, in_waves)
  assert (stats.waves, stats.wave, stats.epochs) == (2, 2, 1)
  assert stats.total_seconds >= stats.train_seconds >= stats.first_epoch_seconds > 0
  again, _ = trainer.train_and_predict(ev, [2, 0, 1], prefixes, sizes[[2, 0, 1]])
  np.testing.assert_array_equal(again[[1, 2, 0]], in_waves)


def test_crop_ramp_follows_ffcv_imagenet():
  """ffcv-imagenet's get_resolution at 64/256 scale: the low side up to ramp_start, the high
  side from ramp_end, in between rounded to res_step (half to even, as np.round)."""
  ffcv = config.imagenet_recipe("ffcv_rn18_16")
  assert [ensemble.crop_size(ffcv, e, 64) for e in range(16)] == [40] * 12 + [48] * 4
  cheap = config.imagenet_recipe("rn18_8")
  assert [ensemble.crop_size(cheap, e, 64) for e in range(8)] == [32] * 7 + [40]
  assert ensemble.crop_size(config.trainer_section(), 3, 32) == 32  # 'cifar' views keep the side


def test_no_weight_decay_on_batchnorm_only():
  """bn_weight_decay=False (ffcv-imagenet): BatchNorm's scales and biases take no decay, every
  convolution kernel and the fc (kernel and bias) do."""
  cfg = config.imagenet_recipe("rn18_8")
  cfg.width = 0.0625
  model = ensemble.classifier(cfg, 10)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  mask = jax.tree_util.tree_flatten_with_path(ensemble.decay_mask(params["params"]))[0]
  for path, decayed in mask:
    names = [str(getattr(k, "key", "")) for k in path]
    assert decayed == (not any("bn" in n for n in names)), names
  assert {tuple(str(k.key) for k in p) for p, d in mask if d} >= {("fc", "bias"), ("fc", "kernel")}
  assert sum(not d for _, d in mask) == 2 * 20  # 20 BatchNorms in a ResNet-18
