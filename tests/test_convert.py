"""Golden tests of jaxattr.convert against the real PyTorch modules (lightly, torchvision).

Each test builds the PyTorch model with random weights and non-trivial BatchNorm statistics, saves
it in one of the checkpoint layouts users hold, converts it, and compares eval-mode features on
the same images (odd sizes included, to catch padding mistakes).
"""

from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
import pytest

from jaxattr import checkpoint, convert

torch = pytest.importorskip("torch", reason="golden conversion tests need PyTorch")
pytestmark = pytest.mark.torch

TOL = 1e-4  # max abs difference relative to the feature scale (float32)


def _lightly():
  return pytest.importorskip("lightly.models", reason="lightly is not installed")


def _randomise_bn(model, seed: int, size: int, batch: int = 16, steps: int = 3):
  """Random BN affine params, then training-mode batches so running stats move away from 0/1."""
  gen = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
  model.train()
  with torch.no_grad():
    for _ in range(steps):
      model(torch.randn(batch, 3, size, size, generator=gen) * 2 + 0.5)
  return model


def _images(seed: int, batch: int, size: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _torch_apply(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return out.reshape(out.shape[0], -1).numpy()


def _jax_apply(path: str, images: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
  variables, meta = checkpoint.load_variables(path)
  model = convert.ENCODERS[meta["encoder"]](**meta["encoder_kwargs"])
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  return jax.tree_util.tree_map(np.asarray, out), meta


def _assert_close(ours: np.ndarray, ref: np.ndarray):
  assert ours.shape == ref.shape
  scale = float(np.abs(ref).max())
  err = float(np.abs(ours - ref).max())
  assert scale > 0 and err <= TOL * scale, f"max abs diff {err:.3g} vs feature scale {scale:.3g}"


def _moco_backbone(num_splits: int = 8, width: float = 1.0):
  """The reference's MoCo backbone: ResNetGenerator children minus the linear + avg pool."""
  resnet = _lightly().ResNetGenerator("resnet-18", width=width, num_splits=num_splits)
  return torch.nn.Sequential(*list(resnet.children())[:-1], torch.nn.AdaptiveAvgPool2d(1))


def _lightning_ckpt(backbone) -> dict:
  """A Lightning-style checkpoint of the reference's MocoModel (backbone, head, momentum)."""
  head = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
  state = {}
  for prefix, module in (("backbone", backbone), ("projection_head.layers", head),
                         ("backbone_momentum",
                          copy.deepcopy(backbone)), ("projection_head_momentum.layers", head)):
    state.update({f"{prefix}.{k}": v.clone() for k, v in module.state_dict().items()})
  state["criterion.memory_bank.bank"] = torch.randn(128, 64)
  return {
      "epoch": 799,
      "global_step": 78000,
      "pytorch-lightning_version": "1.7.7",
      "state_dict": state,
      "optimizer_states": [],
      "lr_schedulers": []
  }


@pytest.fixture(scope="module")
def lightly_moco(tmp_path_factory):
  """(checkpoint saved in train mode, one saved in eval mode, reference features at 33x33)."""
  torch.manual_seed(0)
  backbone = _randomise_bn(_moco_backbone(8), seed=1, size=32)
  tmp = tmp_path_factory.mktemp("lightly")
  train_path = str(tmp / "moco_train.ckpt")
  torch.save(_lightning_ckpt(backbone), train_path)  # per-split statistics still differ
  bn = backbone[1]
  per_split = bn.running_mean.view(8, -1)
  assert float((per_split - per_split.mean(0)).abs().max()) > 1e-3
  backbone.eval()  # lightly's SplitBatchNorm.train(False) averages the splits in place
  eval_path = str(tmp / "moco_eval.ckpt")
  torch.save(_lightning_ckpt(backbone), eval_path)
  images = _images(0, 4, 33)
  return train_path, eval_path, images, _torch_apply(backbone, images)


@pytest.mark.parametrize("saved", ["train", "eval"])
def test_lightly_moco_matches(lightly_moco, tmp_path, saved):
  train_path, eval_path, images, ref = lightly_moco
  src = train_path if saved == "train" else eval_path
  meta = convert.convert(src, str(tmp_path / "enc"))
  assert meta["format"] == "lightly" and meta["encoder"] == "lightly_resnet18"
  assert meta["encoder_kwargs"] == {"width": 1.0, "num_splits": 8, "stem_relu": False}
  assert meta["source_sha256"] == convert.sha256_file(src)
  out, _ = _jax_apply(str(tmp_path / "enc"), images)
  assert set(out) == {"feature"}
  _assert_close(out["feature"], ref)


def test_lightly_average_splits_and_momentum(lightly_moco, tmp_path):
  train_path, _, images, ref = lightly_moco
  dst = str(tmp_path / "enc")
  convert.convert(train_path, dst, average_splits=True, export_momentum=True, export_extras=True)
  out, meta = _jax_apply(dst, images)
  assert meta["encoder_kwargs"]["num_splits"] == 1
  variables, _ = checkpoint.load_variables(dst)
  assert variables["batch_stats"]["bn1"]["mean"].shape == (64,)
  _assert_close(out["feature"], ref)
  # The momentum copy equals the backbone here (a deepcopy), so it gives the same features.
  mom, mom_meta = _jax_apply(dst + "_momentum", images)
  assert mom_meta["momentum_of"] == os.path.abspath(dst)
  _assert_close(mom["feature"], ref)
  extras = np.load(dst + "_extras.npz")
  assert "projection_head.layers.0.weight" in extras.files
  assert "criterion.memory_bank.bank" in extras.files
  assert not any(k.startswith("backbone") for k in extras.files)


def test_plain_lightly_resnet_matches(tmp_path):
  torch.manual_seed(2)
  resnet = _lightly().ResNetGenerator("resnet-18", width=0.5, num_classes=10)
  _randomise_bn(resnet, seed=3, size=32)
  resnet.eval()
  src = str(tmp_path / "resnet.pth")
  torch.save(resnet.state_dict(), src)
  images = _images(1, 3, 32)
  feats = []  # the input of `linear` in lightly's own forward (stem ReLU, 4x4 avg pool)
  hook = resnet.linear.register_forward_hook(lambda m, i, o: feats.append(i[0].numpy()))
  _torch_apply(resnet, images)
  hook.remove()
  meta = convert.convert(src, str(tmp_path / "enc"))
  assert meta["format"] == "lightly_resnet"
  assert meta["encoder_kwargs"] == {"width": 0.5, "num_splits": 1, "stem_relu": True}
  assert meta["dropped_keys"] == ["linear.bias", "linear.weight"]
  out, _ = _jax_apply(str(tmp_path / "enc"), images)
  _assert_close(out["feature"], feats[0])


def test_torchvision_resnet18_matches_with_logits(tmp_path):
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(4)
  model = _randomise_bn(torchvision.models.resnet18(num_classes=7), seed=5, size=64, batch=4)
  model.eval()
  src = str(tmp_path / "resnet18.pth")
  torch.save(model.state_dict(), src)
  images = _images(2, 2, 225)
  logits = _torch_apply(model, images)
  model.fc = torch.nn.Identity()
  feature = _torch_apply(model, images)
  meta = convert.convert(src, str(tmp_path / "enc"), keep_fc=True)
  assert (meta["format"], meta["encoder"], meta["encoder_kwargs"]) == ("torchvision", "resnet18", {
      "num_classes": 7
  })
  out, _ = _jax_apply(str(tmp_path / "enc"), images)
  _assert_close(out["feature"], feature)
  _assert_close(out["logits"], logits)


def test_resnet50_torchvision_and_official_moco_match(tmp_path):
  """One ResNet-50, saved as a torchvision state_dict and in the official MoCo v2 layout."""
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(6)
  model = _randomise_bn(torchvision.models.resnet50(), seed=7, size=64, batch=4, steps=2)
  model.eval()
  tv_path = str(tmp_path / "resnet50.pth")
  torch.save(model.state_dict(), tv_path)
  mlp = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(
      2048, 128))
  model.fc = mlp  # MoCo v2's projection head replaces fc
  state = {}
  for enc in ("encoder_q", "encoder_k"):
    state.update({f"module.{enc}.{k}": v for k, v in model.state_dict().items()})
  state["module.queue"] = torch.randn(128, 4096)
  state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
  moco_path = str(tmp_path / "moco_v2_800ep_pretrain.pth.tar")
  torch.save(
      {
          "epoch": 800,
          "arch": "resnet50",
          "state_dict": state,
          "optimizer": {
              "state": {},
              "param_groups": [{
                  "lr": 0.0
              }]
          }
      }, moco_path)
  images = _images(3, 2, 225)
  model.fc = torch.nn.Identity()
  ref = _torch_apply(model, images)
  meta_tv = convert.convert(tv_path, str(tmp_path / "tv"))
  meta_moco = convert.convert(moco_path, str(tmp_path / "moco"))
  assert (meta_tv["format"], meta_tv["encoder"]) == ("torchvision", "resnet50")
  assert (meta_moco["format"], meta_moco["encoder"]) == ("moco", "resnet50")
  assert meta_tv["dropped_keys"] == ["fc.bias", "fc.weight"]
  assert len(meta_moco["dropped_keys"]) == 4  # fc.0.{weight,bias}, fc.2.{weight,bias}
  model50 = convert.ENCODERS["resnet50"]()
  apply = jax.jit(lambda v, x: model50.apply(v, x, train=False)["feature"])
  for path in ("tv", "moco"):
    variables, _ = checkpoint.load_variables(str(tmp_path / path))
    _assert_close(np.asarray(apply(variables, images)), ref)


# ------------------------------------------------------------------------------------------
# Bad input: one clear error naming the keys, and nothing written.


@pytest.fixture()
def tiny_lightly_state():
  torch.manual_seed(8)
  resnet = _lightly().ResNetGenerator("resnet-18", width=0.125)
  return {k: v.clone() for k, v in resnet.state_dict().items()}


def _expect_error(tmp_path, state, match: str, **kwargs) -> str:
  src = str(tmp_path / "bad.pth")
  torch.save(state, src)
  dst = str(tmp_path / "out")
  with pytest.raises(convert.ConversionError, match=match) as info:
    convert.convert(src, dst, **kwargs)
  assert not os.path.exists(dst)
  assert not [p for p in os.listdir(tmp_path) if p != "bad.pth"], os.listdir(tmp_path)
  return str(info.value)


def test_missing_key(tmp_path, tiny_lightly_state):
  del tiny_lightly_state["layer3.1.bn2.running_var"]
  msg = _expect_error(tmp_path, tiny_lightly_state, "1 missing")
  assert "layer3.1.bn2.running_var" in msg


def test_extra_key_in_lightly_backbone(tmp_path, lightly_moco):
  state = torch.load(lightly_moco[1], weights_only=True)
  state["state_dict"]["backbone.3.0.conv9.weight"] = torch.zeros(3)
  msg = _expect_error(tmp_path, state, "1 unexpected")
  assert "backbone.3.0.conv9.weight" in msg


def test_shape_mismatch(tmp_path, tiny_lightly_state):
  tiny_lightly_state["layer2.0.conv1.weight"] = torch.zeros(16, 8, 5, 5)
  msg = _expect_error(tmp_path, tiny_lightly_state, "1 shape mismatch")
  assert ("layer2.0.conv1.weight: checkpoint (16, 8, 5, 5) -> (5, 5, 8, 16), "
          "expected (3, 3, 8, 16)") in msg


def test_unknown_format(tmp_path):
  state = {f"encoder.blocks.{i}.attn.qkv.weight": torch.zeros(2, 2) for i in range(9)}
  msg = _expect_error(tmp_path, state, "unknown checkpoint format")
  assert "encoder.blocks.0.attn.qkv.weight" in msg and "+3 more" in msg


def test_another_architecture(tmp_path):
  torchvision = pytest.importorskip("torchvision")
  state = torchvision.models.resnet18().state_dict()
  msg = _expect_error(tmp_path, state, "missing", encoder="resnet50")
  assert "layer1.0.conv3.weight" in msg and "unexpected" in msg


def test_stray_keys_in_moco_and_bad_flags(tmp_path, tiny_lightly_state):
  state = {f"module.encoder_q.{k}": v for k, v in tiny_lightly_state.items()}
  state["module.predictor.0.weight"] = torch.zeros(2)
  _expect_error(tmp_path, state, "module.predictor.0.weight")
  _expect_error(tmp_path, tiny_lightly_state, "keep_fc applies to torchvision", keep_fc=True)
  _expect_error(tmp_path, tiny_lightly_state, "unknown format", format="timm")
  _expect_error(tmp_path, tiny_lightly_state, "no momentum", format="lightly_resnet",
                export_momentum=True)


def test_untrusted_pickle_needs_opt_in(tmp_path, tiny_lightly_state):
  """Lightning files may pickle objects (here an argparse.Namespace of hyper-parameters)."""
  import argparse  # pylint: disable=g-import-not-at-top

  state = {"state_dict": tiny_lightly_state, "hyper_parameters": argparse.Namespace(lr=0.1)}
  _expect_error(tmp_path, state, "trust_pickle")
  meta = convert.convert(str(tmp_path / "bad.pth"), str(tmp_path / "enc"), trust_pickle=True)
  assert meta["format"] == "lightly_resnet"


def test_damaged_or_foreign_files_are_named_without_the_pickle_hint(tmp_path, tiny_lightly_state):
  """A text file or a truncated archive is no pickle question: trust_pickle would not help."""
  src, dst = tmp_path / "x.pth", str(tmp_path / "out")
  src.write_text("{'conv1.weight': ...}")
  for trust in (False, True):
    with pytest.raises(convert.ConversionError, match=r"x.pth: not a PyTorch checkpoint \(it "
                       r"starts with b\"\{'co\""):
      convert.convert(str(src), dst, trust_pickle=trust)
  torch.save(tiny_lightly_state, str(src))
  src.write_bytes(src.read_bytes()[:2000])  # cut short, as by a failed copy
  for trust in (False, True):
    with pytest.raises(convert.ConversionError,
                       match="torch.load failed .*the file is damaged") as e:
      convert.convert(str(src), dst, trust_pickle=trust)
    assert "trust_pickle" not in str(e.value)
  assert not os.path.exists(dst)


def test_refuses_to_overwrite(tmp_path, tiny_lightly_state):
  src = str(tmp_path / "ok.pth")
  torch.save(tiny_lightly_state, src)
  dst = str(tmp_path / "enc")
  convert.convert(src, dst)
  with open(os.path.join(dst, "meta.json")) as f:
    assert json.load(f)["encoder_kwargs"]["width"] == 0.125
  with pytest.raises(FileExistsError):
    convert.convert(src, dst)
  convert.convert(src, dst, overwrite=True)


def test_launcher_smoke(tmp_path, tiny_lightly_state):
  """launch/convert.py converts a file and fails cleanly (exit status, message) on a bad one."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = str(tmp_path / "resnet.pth")
  torch.save(tiny_lightly_state, src)
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, os.path.join(root, "launch", "convert.py"), f"--src={src}"]
  ok = subprocess.run(cmd + [f"--dst={tmp_path / 'enc'}", "--average_splits"], env=env,
                      capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert checkpoint.is_checkpoint(str(tmp_path / "enc"))
  bad = subprocess.run(cmd + [f"--dst={tmp_path / 'bad'}", "--encoder=resnet18"], env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "shape mismatch" in bad.stderr
  assert not os.path.exists(tmp_path / "bad")


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
  """benchmarks/benchmark_features.py runs end to end on a tiny batch and writes its JSON."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "features.json"
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([
      sys.executable, "-m", "benchmarks.benchmark_features", "--nets=cifar_resnet18",
      "--batch_size=8", "--repeats=1", "--warmup=0", "--threads=1", f"--out={out}"
  ], env=env, cwd=root, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {r["framework"]: r for r in result["rows"]}
  assert set(rows) == {"jaxattr", "jaxattr+fold", "torch"}
  assert rows["jaxattr"]["max_rel_diff"] < TOL and rows["jaxattr+fold"]["max_rel_diff"] < TOL
  assert result["settings"]["torch_threads"] == 1
