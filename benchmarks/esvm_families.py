r"""Feature families for the ESVM solver's benchmarks (issue #15): deterministic, no downloads.

Each family yields, per class, targets [T, d] and candidates [n, d] as float32 numpy arrays (the
same-class problems of `jaxattr.attribute.topk`: a target's candidates are its class's training
features), and a `key()` string of everything the arrays depend on (a cache of another key is
never reused, `cached`). Three regimes of the solver:

(a) `FlaxRandomInit`: what benchmark_esvm measures: real CIFAR-10 JPEGs through a randomly
    initialised lightly ResNet-18 (Flax, width 1, 512-d; mean norm ~26). At the optimum 92-167
    of 5,000 candidates violate the margin (class 0, 10 targets).
(b) `hard_torch`: real CIFAR-10 JPEGs through a randomly initialised torchvision ResNet-18
    (`TorchResNet18`: torch default init, eval mode, ImageNet mean/std, 32x32 input, fc removed:
    512-d), scaled by 0.04: 1,470-4,108 of 5,000 violate (mean 2,870), the regime of issue #15.
    Unscaled (mean norm ~12.9) only 54-106 do: the number of violators falls with the feature
    scale (the intercept's fixed unit column and the penalty are not scale invariant), so this
    recipe reproduces the issue's counts only at a norm of ~0.5. Needs torch and torchvision;
    `hard_synthetic` (no torch; norm 0.8: 1,405-3,050 violate, mean 2,237) stands in.
(c) `imagenet_shaped`: 2048-d, 1,300 candidates per class, like the avgpool features of a
    random-init ResNet-50 on ImageNet, with the feature norm a parameter: at norm 3, 522-1,300
    violate (mean 1,046); at 30, 98-403; at 1,000, 15-70 (but float32 is then the problem).

Violator counts: float64 Newton, C=0.1, class 0, the first 10 targets; sklearn's primal
LinearSVC agrees to <= 3e-6 (/tmp/esvm_study/ref.py of the issue #15 study).

`SyntheticPostReLU` is the model behind (b)'s stand-in and (c): non-negative 'post-ReLU'
features, a shared per-dimension mean profile (class-specific perturbations of it) times a
per-example gain, plus a low-rank residual with a power-law spectrum and isotropic noise, through
a ReLU, scaled to a given mean norm:

  x_i = s relu(g_i mu_c + rho ||mu|| (sqrt(1 - eta) Q diag(sigma) z_i + sqrt(eta / d) e_i) - beta
        mean(mu)),

with mu_j ~ Gamma(k) (a fraction of dimensions negated: dead units), mu_c = mu exp(tau n_c),
g_i log-normal, Q a random orthonormal [d, r] basis, sigma_j ~ j^-alpha (unit norm), z_i, e_i,
n_c standard normal, s the common factor that makes the candidates' mean norm `norm`.

Statistics it is calibrated to (`summarize`; torchvision 0.29, torch.manual_seed(0), CIFAR-10
JPEG train images of class 0), and the presets' values:

                         zeros  cos(x, mean)  top residual PCs (share)  norm CV  per-dim mean CV
  ResNet-18, 32x32       0.23   0.96          0.45 0.11 0.06 0.03       0.24     1.25
  hard_synthetic         0.26   0.96          0.42 0.22 0.06 0.03       0.22     1.25
  ResNet-50, 224x224     0.043  0.999         0.96 0.01 0.005 0.004     0.23     0.99
  imagenet_shaped        0.040  0.999         0.97 0.01 0.003 0.002     0.24     1.02

(ResNet-50: 400 CIFAR images upsampled to 224, mean norm ~800; issue #15 reports ~1,160 on
ImageNet-sized images. Both random-init nets are near rank one, their top residual component
being the per-image gain: eval-mode BatchNorm with default running statistics is the identity,
so the residual blocks add up into one dominant direction.)

  python3 -c "from benchmarks import esvm_families as f; print(f.summarize(f.hard_synthetic()))"
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import numpy as np

from jaxattr import config

# Bumped when a generator changes what it computes: caches of older versions are never reused.
VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class FamilyData:
  """A family's arrays: per class, targets [T, d] and candidates [n, d] (float32).

  Attributes:
    key: the family's `key()`.
    targets: one [T, d] array per class.
    candidates: one [n, d] array per class.
  """

  key: str
  targets: tuple[np.ndarray, ...]
  candidates: tuple[np.ndarray, ...]

  def problems(self):
    """(class position, targets, candidates) of each class."""
    return [(c, t, x) for c, (t, x) in enumerate(zip(self.targets, self.candidates))]


def _key(name: str, params: dict[str, Any]) -> str:
  return json.dumps({"family": name, "version": VERSION, **params}, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class SyntheticPostReLU:
  """Synthetic non-negative 'post-ReLU' features (the module docstring's model).

  Attributes:
    dim: d.
    num_candidates: n per class.
    num_targets: T per class (drawn from the class's distribution, like test images).
    num_classes: classes (each its own problems).
    norm: the candidates' mean feature norm (all classes), the scale s.
    rank: r, the residual's low-rank part.
    decay: alpha, the residual spectrum sigma_j ~ j^-alpha.
    spread: rho, the residual's norm relative to ||mu||.
    noise: eta, the residual's isotropic share of its energy.
    gain_sd: the log-normal per-example gain's sigma.
    class_sd: tau, the class perturbation of the mean profile (log scale).
    mean_shape: k, the Gamma shape of the mean profile (per-dim mean CV = 1 / sqrt(k)).
    dead: fraction of dimensions whose mean is negated (mostly zero after the ReLU).
    shift: beta, subtracted (times mean(mu)) before the ReLU: more zeros.
    seed: the generator's seed.
  """

  dim: int = 512
  num_candidates: int = 5000
  num_targets: int = 100
  num_classes: int = 2
  norm: float = 12.9
  rank: int = 64
  decay: float = 1.0
  spread: float = 0.35
  noise: float = 0.3
  gain_sd: float = 0.22
  class_sd: float = 0.3
  mean_shape: float = 1.0
  dead: float = 0.07
  shift: float = 0.15
  seed: int = 0

  def key(self) -> str:
    return _key("synthetic_post_relu", dataclasses.asdict(self))

  def _shared(self, rng: np.random.Generator) -> dict[str, Any]:
    # What all classes share: the mean profile, the residual's basis and spectrum, the scales.
    d, r = self.dim, min(self.rank, self.dim)
    mu = rng.gamma(self.mean_shape, 1.0, d)
    mu[rng.random(d) < self.dead] *= -1.0
    q, _ = np.linalg.qr(rng.standard_normal((d, r)))
    sigma = np.arange(1, r + 1, dtype=np.float64)**-self.decay
    sigma /= np.linalg.norm(sigma)
    scale = self.spread * np.linalg.norm(mu)
    return dict(mu=mu, q=q, sigma=sigma, low=scale * np.sqrt(1.0 - self.noise),
                iso=scale * np.sqrt(self.noise / d), offset=self.shift * np.mean(np.abs(mu)))

  def _class(self, shared: dict[str, Any], rng: np.random.Generator) -> list[np.ndarray]:
    # One class's unscaled [targets, candidates].
    d, r = self.dim, min(self.rank, self.dim)
    mu_c = shared["mu"] * np.exp(self.class_sd * rng.standard_normal(d))
    parts = []
    for count in (self.num_targets, self.num_candidates):
      gain = np.exp(self.gain_sd * rng.standard_normal(count) - 0.5 * self.gain_sd**2)
      z = rng.standard_normal((count, r)) * shared["sigma"]
      pre = (gain[:, None] * mu_c + shared["low"] * (z @ shared["q"].T) +
             shared["iso"] * rng.standard_normal((count, d)) - shared["offset"])
      parts.append(np.maximum(pre, 0.0))
    return parts

  def _rng(self, *extra: int) -> np.random.Generator:
    return np.random.default_rng([
        self.seed, self.dim, self.num_candidates, self.num_targets, *extra
    ])

  def generate(self) -> FamilyData:
    rng = self._rng()
    shared = self._shared(rng)
    raw = [self._class(shared, rng) for _ in range(self.num_classes)]
    s = self.norm / np.mean(np.concatenate([np.linalg.norm(x, axis=1) for _, x in raw]))
    targets = tuple((s * t).astype(np.float32) for t, _ in raw)
    candidates = tuple((s * x).astype(np.float32) for _, x in raw)
    return FamilyData(self.key(), targets, candidates)

  def class_problem(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c's (targets [T, d], candidates [n, d]) float32 alone, for sweeps over more classes
    than memory holds: the classes share `generate`'s profile and basis, but each draws from its
    own generator (so they differ from `generate`'s), and the scale makes class 0's candidates'
    mean norm `norm`."""
    if not 0 <= c < self.num_classes:
      raise ValueError(f"class {c} outside 0..{self.num_classes - 1}")
    shared, s = _synthetic_shared(self)
    targets, candidates = self._class(shared, self._rng(1, c))
    return (s * targets).astype(np.float32), (s * candidates).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _synthetic_shared(family: SyntheticPostReLU) -> tuple[dict[str, Any], float]:
  # `SyntheticPostReLU.class_problem`'s shared draws and scale, once per family.
  shared = family._shared(family._rng())  # pylint: disable=protected-access
  _, candidates = family._class(shared, family._rng(1, 0))  # pylint: disable=protected-access
  return shared, family.norm / float(np.mean(np.linalg.norm(candidates, axis=1)))


def hard_synthetic(norm: float = 0.8, **overrides: Any) -> SyntheticPostReLU:
  """(b) without torch: the statistics of `TorchResNet18` (the module docstring's table), at the
  scale where most candidates violate at the optimum (`hard_torch`)."""
  return SyntheticPostReLU(norm=norm, **overrides)


def hard_torch(**overrides: Any) -> TorchResNet18:
  """(b): `TorchResNet18` scaled by 0.04 (mean norm ~0.5): ~1,600-4,600 of 5,000 candidates
  violate at the optimum, the counts of issue #15 (at scale 1, norm ~12.9, only 50-110 do)."""
  return TorchResNet18(**{"scale": 0.04, **overrides})


def imagenet_shaped(norm: float = 29.0, **overrides: Any) -> SyntheticPostReLU:
  """(c): 2048-d, 1,300 candidates per class (an ImageNet class), a random-init ResNet-50's
  avgpool statistics (the module docstring's table): almost rank one (cos to the mean 0.999, the
  gain's PC ~96% of the residual), 4% zeros, exponential per-dimension means; `norm` ~3, ~30
  or ~1,000 (the raw features)."""
  params = dict(dim=2048, num_candidates=1300, num_targets=50, norm=norm, rank=128, decay=0.6,
                spread=0.045, noise=0.3, gain_sd=0.23, class_sd=0.1, mean_shape=1.0, dead=0.015,
                shift=0.0)
  params.update(overrides)
  return SyntheticPostReLU(**params)


def _data_fingerprint(data: str) -> str:
  import types  # pylint: disable=g-import-not-at-top

  from jaxattr import fingerprint  # pylint: disable=g-import-not-at-top
  return fingerprint.data_fingerprint(types.SimpleNamespace(source=data, options={}))


def _class_images(data: str, classes: tuple[int, ...], num_candidates: int, num_targets: int):
  """Per class: (test images [T, 32, 32, 3] uint8, train images [n, ...]), the first of each."""
  from jaxattr import data as data_lib  # pylint: disable=g-import-not-at-top

  out = []
  train = data_lib.load(data, "train", limit_per_class=num_candidates)
  test = data_lib.load(data, "test", limit_per_class=num_targets)
  for c in classes:
    out.append((test.images[test.labels == c], train.images[train.labels == c]))
  return out


@dataclasses.dataclass(frozen=True)
class TorchResNet18:
  """(b): CIFAR-10 JPEGs through a random-init torchvision ResNet-18 (needs torch, torchvision).

  torch.manual_seed(seed) then `torchvision.models.resnet18()` (default init), fc removed, eval
  mode, ImageNet mean/std on [0, 1] pixels, 32x32 input: 512-d post-ReLU avgpool features.
  Targets: the first `num_targets` test images of each class (all 1,000 by default, as the
  other families: the candidate set's preparation is shared by that many); candidates: the first
  `num_candidates` training images.
  """

  classes: tuple[int, ...] = (0, 1)
  num_candidates: int = 5000
  num_targets: int = 1000
  seed: int = 0
  scale: float = 1.0
  batch: int = 500
  data: str = config.CIFAR10_JPEG

  def key(self) -> str:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top

    params = dataclasses.asdict(self)
    params.update(classes=list(self.classes), data_fingerprint=_data_fingerprint(self.data),
                  torch=torch.__version__, torchvision=torchvision.__version__)
    return _key("torch_resnet18", params)

  def features(self, images: np.ndarray) -> np.ndarray:
    """The scaled features [N, 512] float32 of uint8 images [N, 32, 32, 3]."""
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top

    torch.manual_seed(self.seed)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.eval()
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    out = []
    with torch.no_grad():
      for i in range(0, len(images), self.batch):
        x = (images[i:i + self.batch].astype(np.float32) / 255.0 - mean) / std
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        out.append((self.scale * model(x).numpy()).astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 512), np.float32)

  def generate(self) -> FamilyData:
    parts = _class_images(self.data, self.classes, self.num_candidates, self.num_targets)
    return FamilyData(self.key(), tuple(self.features(t) for t, _ in parts),
                      tuple(self.features(x) for _, x in parts))


@dataclasses.dataclass(frozen=True)
class FlaxRandomInit:
  """(a): CIFAR-10 JPEGs through benchmark_esvm's encoder: a random-init lightly ResNet-18 (Flax,
  `jax.random.key(seed)`, eval mode, ImageNet mean/std on 0-255 pixels), per class as
  `TorchResNet18`."""

  classes: tuple[int, ...] = (0, 1)
  num_candidates: int = 5000
  num_targets: int = 100
  seed: int = 0
  width: float = 1.0
  batch: int = 250
  data: str = config.CIFAR10_JPEG

  def key(self) -> str:
    import jax  # pylint: disable=g-import-not-at-top

    params = dataclasses.asdict(self)
    params.update(classes=list(self.classes), data_fingerprint=_data_fingerprint(self.data),
                  jax=jax.__version__)
    return _key("flax_lightly_resnet18", params)

  def generate(self) -> FamilyData:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from jaxattr.models import LightlyResNet18  # pylint: disable=g-import-not-at-top

    model = LightlyResNet18(width=self.width)
    variables = model.init(jax.random.key(self.seed), jnp.zeros((2, 32, 32, 3)), train=False)
    mean = jnp.asarray(IMAGENET_MEAN) * 255.0
    std = jnp.asarray(IMAGENET_STD) * 255.0
    apply = jax.jit(lambda im: model.apply(variables, (im.astype(jnp.float32) - mean) / std, train=
                                           False)["feature"])

    def features(images):
      b, out = self.batch, []
      for i in range(0, len(images), b):
        batch = np.zeros((b,) + images.shape[1:], np.uint8)  # one compiled shape
        batch[:len(images[i:i + b])] = images[i:i + b]
        out.append(np.asarray(apply(batch), np.float32)[:len(images[i:i + b])])
      return np.concatenate(out) if out else np.zeros((0, model.feature_dim), np.float32)

    parts = _class_images(self.data, self.classes, self.num_candidates, self.num_targets)
    return FamilyData(self.key(), tuple(features(t) for t, _ in parts),
                      tuple(features(x) for _, x in parts))


def torch_available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def cached(family: Any, directory: str = "bench_results") -> FamilyData:
  """`family.generate()`, stored in directory/esvm_family_<hash of key>.npz and read back from
  there only when the stored key equals `family.key()`."""
  key = family.key()
  path = os.path.join(directory, f"esvm_family_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
  if os.path.exists(path):
    with np.load(path) as z:
      if str(z["key"]) == key:
        n = int(z["num_classes"])
        return FamilyData(key, tuple(z[f"targets_{c}"] for c in range(n)),
                          tuple(z[f"candidates_{c}"] for c in range(n)))
  out = family.generate()
  os.makedirs(directory, exist_ok=True)
  arrays = {f"targets_{c}": t for c, t in enumerate(out.targets)}
  arrays.update({f"candidates_{c}": x for c, x in enumerate(out.candidates)})
  tmp = path + ".tmp.npz"
  np.savez(tmp, key=np.array(key), num_classes=np.int64(len(out.targets)), **arrays)
  os.replace(tmp, path)
  return out


def summarize(features: np.ndarray | FamilyData) -> dict[str, Any]:
  """The statistics of the module docstring's table, of one [n, d] array (or a family's first
  class's candidates)."""
  x = features.candidates[0] if isinstance(features, FamilyData) else features
  x = np.asarray(x, np.float64)
  norms = np.linalg.norm(x, axis=1)
  mean = x.mean(0)
  s = np.linalg.svd(x - mean, compute_uv=False)
  return {
      "shape": x.shape,
      "zeros": float(np.mean(x == 0)),
      "cos_to_mean": float(np.mean(x @ mean / np.maximum(norms, 1e-30) / np.linalg.norm(mean))),
      "top_pc_share": np.round(s[:4]**2 / np.sum(s**2), 3).tolist(),
      "mean_norm": float(norms.mean()),
      "norm_cv": float(norms.std() / norms.mean()),
      "per_dim_mean_cv": float(mean.std() / mean.mean()),
  }
