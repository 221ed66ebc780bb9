"""`jaxattr.validate`: the shipped configs pass, every bad value is named, all at once."""

import numpy as np
import pytest

from jaxattr import config as config_lib, data as data_lib, validate
from tests.conftest import load_config

# Class sizes of the digits splits (data.load('digits')) and of CIFAR-10 (per class).
DIGITS_TRAIN = [140, 145, 130, 155, 139, 150, 144, 152, 144, 139]
DIGITS_TEST = [38, 37, 47, 28, 42, 32, 37, 27, 30, 41]
PIPELINE = ("pretrain", "features", "attribution", "support", "lds")


def fake(counts, side=16):
  """A Dataset with counts[c] images of class c (all-zero side x side images, no memory)."""
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  n = len(labels)
  images = np.broadcast_to(np.zeros((1, side, side, 3), np.uint8), (n, side, side, 3))
  return data_lib.Dataset(images=images, labels=labels,
                          class_names=[f"c{i}" for i in range(len(counts))], index=np.arange(n))


def digits_data():
  return fake(DIGITS_TRAIN), fake(DIGITS_TEST)


def cifar_data(per_class_train=5000, per_class_test=1000):
  return fake([per_class_train] * 10, 32), fake([per_class_test] * 10, 32)


def put(config, field, value):
  """Sets a dotted field to any value, wrong types included (as a hand-built config could)."""
  *parents, name = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  with config.ignore_type():
    node[name] = value


def found(config, train=None, test=None, **kwargs):
  return validate.problems(config, train, test, **kwargs)


@pytest.mark.parametrize("name,variant,data", [
    ("digits", None, digits_data),
    ("digits", "quick", digits_data),
    ("cifar10", None, cifar_data),
    ("cifar10", "jpeg", cifar_data),
    ("cifar10", "cpu", lambda: cifar_data(500, 500)),
    ("flip", None, cifar_data),
    ("flip", "digits", digits_data),
])
def test_shipped_configs_pass(name, variant, data):
  config = load_config(name, variant)
  train, test = data()
  assert found(config, train, test) == []
  validate.check(config, train, test)  # no raise
  validate.check(config)  # without data too
  if name != "flip":
    # Each stage on its own, as launch/<stage>.py runs it.
    for stage in PIPELINE:
      assert found(config, train, test, stages=(stage,)) == [], stage


def test_pipeline_stages():
  config = load_config("digits")
  assert validate.pipeline_stages(config) == PIPELINE
  config.support.metrics = ""
  config.lds.methods = ""
  config.encoder.checkpoint = "/some/encoder"
  assert validate.pipeline_stages(config) == ("features", "attribution")
  assert validate.pipeline_stages(load_config("flip")) == ("flip",)


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("pretrain.epochs", -1, "pretrain.epochs=-1: must be an int >= 1"),
        ("pretrain.batch_size", -8, "pretrain.batch_size=-8: must be an int >= 1"),
        ("support.num_targets", -14, "support.num_targets=-14: must be an int >= 0"),
        ("attribution.num_targets", 0, "attribution.num_targets=0: must be an int >= 1"),
        ("attribution.num_targets", 360, "attribution.num_targets=360 exceeds the 359 test"),
        ("attribution.k", 131, "attribution.k=131 exceeds the 130 training images of class 2"),
        ("support.num_tests", 0, "support.num_tests=0: must be an int >= 1"),
        ("support.search_budget", -1, "support.search_budget=-1: must be an int >= 0"),
        ("support.metrics", "bogus", "support.metrics='bogus': must be a comma-separated list"),
        ("attribution.methods", "esvm,bogus", "attribution.methods='esvm,bogus'"),
        ("attribution.methods", "", "attribution.methods='': must be a non-empty"),
        ("features.batch_size", 0, "features.batch_size=0: must be an int >= 1"),
        # Removal support drops support.k=128 of the 1438 images: 1310 remain for batches.
        ("ensemble.batch_size", 1311, "ensemble.batch_size=1311 exceeds the 1310 training images"),
        ("pretrain.batch_size", 100, "must be a multiple of encoder.num_splits=8"),
        ("pretrain.memory_bank_size", 64, "pretrain.memory_bank_size=64: must be >= pretrain"),
        # Types: what a hand-built or ignore_type config can hold.
        ("pretrain.epochs", 1.5, "pretrain.epochs=1.5 (float): must be an int >= 1"),
        ("pretrain.epochs", "10", "pretrain.epochs='10' (str): must be an int"),
        ("pretrain.epochs", True, "pretrain.epochs=True (bool): must be an int"),
        ("attribution.same_class", 1, "attribution.same_class=1 (int): must be a bool"),
        ("features.dtype", "float16", "features.dtype='float16': must be one of"),
        ("attribution.target_list", (1.0,), "attribution.target_list=(1.0,) (tuple): must be"),
        # Non-finite floats.
        ("pretrain.base_lr", float("nan"), "pretrain.base_lr=nan: must be a finite number > 0"),
        ("ensemble.log_every_s", float("inf"), "ensemble.log_every_s=inf: must be a finite"),
        ("attribution.tol", float("-inf"), "attribution.tol=-inf"),
        # Ranges of the other sections.
        ("seed", -1, "seed=-1: must be an int >= 0"),
        ("pretrain.momentum", 1.0, "pretrain.momentum=1.0: must be a finite number in [0, 1)"),
        ("pretrain.min_scale", 0.0, "pretrain.min_scale=0.0: must be a finite number in (0, 1]"),
        ("pretrain.max_steps", 0, "pretrain.max_steps=0: must be an int >= 1 or -1"),
        ("pretrain.checkpoint_every_steps", 0, "pretrain.checkpoint_every_steps=0"),
        ("encoder.name", "resnet18", "encoder.name='resnet18': must be one of"),
        ("encoder.width", 0.01, "encoder.width=0.01: must be >= 1/64"),
        ("attribution.targets", "some", "attribution.targets='some': must be one of"),
        ("attribution.C", 0.0, "attribution.C=0.0: must be a finite number > 0"),
        ("attribution.chunk_size", 0, "attribution.chunk_size=0"),
        ("viz.num_targets", 0, "viz.num_targets=0: must be an int >= 1"),
        ("ensemble.model", "resnet50", "ensemble.model='resnet50': must be one of"),
        ("ensemble.peak_epoch", -1.0, "ensemble.peak_epoch=-1.0: must be a finite number >= 0"),
        ("ensemble.label_smoothing", 1.0, "ensemble.label_smoothing=1.0"),
        ("ensemble.formulation", "pmap", "ensemble.formulation='pmap'"),
        ("ensemble.cutout", 17, "ensemble.cutout=17 exceeds the 16-pixel side"),
        ("ensemble.translate", 16, "ensemble.translate=16: must be < the 16-pixel side"),
        ("support.flip_models", 0, "support.flip_models=0: must be an int >= 1"),
        # The ResNet-18 recipes' fields (config.imagenet_recipe) on the digits data.
        ("ensemble.stem", "tiny", "ensemble.stem='tiny': must be one of"),
        ("ensemble.augment", "mixup", "ensemble.augment='mixup': must be one of"),
        ("ensemble.res_max", 8, "ensemble.res_max=8 needs ensemble.augment='rrc'"),
        ("ensemble.data_parallel", 2, "ensemble.data_parallel=2 needs ensemble.model='resnet18'"),
        ("ensemble.data_sharding", "split", "ensemble.data_sharding='split': must be one of"),
        ("ensemble.min_scale", 0.0, "ensemble.min_scale=0.0: must be a finite number in (0, 1]"),
        ("support.k", 129, "support.k=129 exceeds attribution.k=128"),
        ("support.methods", "esvm,cosine", "['cosine'] are not computed by attribution.methods"),
        ("support.methods", "esvm,esvm", "repeated: ['esvm']"),
        ("support.targets", "3,x", "support.targets='3,x': must be ''"),
        ("support.targets", "3,3", "support.targets='3,3': must name at least one test index"),
        ("data.source", "csv:x", "data.source='csv:x': must be 'digits'"),
        ("data.options.size", 0, "data.options.size=0: must be an int >= 1"),
    ])
def test_bad_value_is_named(field, value, expected):
  config = load_config("digits")
  if field == "ensemble.batch_size":  # LDS's half-size subsets would be a second problem
    config.lds.methods = ""
  put(config, field, value)
  train, test = digits_data()
  problems = found(config, train, test)
  assert len(problems) == 1 and expected in problems[0], problems
  with pytest.raises(validate.ConfigError, match=field.replace(".", r"\.")):
    validate.check(config, train, test)


def test_data_checks_need_data():
  config = load_config("digits")
  config.attribution.k = 500
  config.ensemble.batch_size = 5000
  assert found(config) == []
  train, test = digits_data()
  assert [p.split("=")[0] for p in found(config, train, test)] == [
      "attribution.k", "lds.alpha", "ensemble.batch_size"
  ]


def test_pretrain_batch_against_data_and_bank():
  config = load_config("digits")
  config.pretrain.batch_size = 1440
  train, test = digits_data()
  assert [p.split(":")[0] for p in found(config, train, test)] == [
      "pretrain.memory_bank_size=1024", "pretrain.batch_size=1440 exceeds the 1438 training images "
      "of data.source='digits'; lower it (a multiple of encoder.num_splits)"
  ]
  config.pretrain.memory_bank_size = 1440
  config.pretrain.batch_size = 1432
  assert found(config, train, test) == []


def test_removal_needs_a_batch_beyond_support_k():
  config = load_config("digits")
  config.ensemble.batch_size = 1400  # 1438 images: enough for full-data models only
  config.lds.methods = ""  # its half-size subsets would fail first
  train, test = digits_data()
  assert "ensemble.batch_size=1400 exceeds the 1310" in found(config, train, test)[0]
  config.support.metrics = "mislabel"
  assert found(config, train, test) == []
  config.ensemble.batch_size = 1439
  assert "ensemble.batch_size=1439 exceeds the 1438" in found(config, train, test)[0]


def test_one_class_and_missing_test_class():
  config = load_config("digits")
  config.attribution.k = 10
  config.support.k = 10
  config.ensemble.batch_size = 8
  config.attribution.num_targets = 4
  config.support.num_targets = 2
  config.trak.proj_dim = 64  # below the 200 training images (a TRAK check of its own)
  problems = found(config, fake([200]), fake([5]))
  assert len(problems) == 1 and "holds only class(es) [0 ('c0')]" in problems[0], problems
  problems = found(config, fake([200, 0, 200]), fake([5, 5, 5]))
  assert len(problems) == 1 and "test classes [1 ('c1')] have no training images" in problems[0]
  # Pretraining alone needs neither.
  assert found(config, fake([200]), fake([5]), stages=("pretrain", "features")) == []
  # Empty splits.
  assert any("the test split is empty" in p for p in found(config, fake([200, 200]), fake([0])))


def test_all_problems_in_one_error():
  config = load_config("digits")
  config.pretrain.epochs = -1
  config.support.num_targets = -14
  put(config, "pretrain.base_lr", float("nan"))
  config.attribution.k = 500
  train, test = digits_data()
  with pytest.raises(validate.ConfigError) as info:
    validate.check(config, train, test)
  err = info.value
  assert isinstance(err, ValueError)
  assert len(err.problems) == 4
  message = str(err)
  assert message.startswith("invalid config (4 problems;")
  for text in ("pretrain.epochs=-1", "support.num_targets=-14", "pretrain.base_lr=nan",
               "attribution.k=500 exceeds the"):
    assert text in message
  assert len(message.splitlines()) == 5


def test_only_requested_stages_are_checked():
  config = load_config("digits")
  config.pretrain.epochs = -1
  config.ensemble.epochs = 0
  config.features.batch_size = 0
  # TRAK trains its own models: with it the attribution stage checks the ensemble too.
  assert [p.split("=")[0] for p in found(config, stages=("attribution",))] == ["ensemble.epochs"]
  config.attribution.methods = "esvm,l2"
  assert found(config, stages=("attribution",)) == []
  assert [p.split("=")[0] for p in found(config, stages=("features",))] == ["features.batch_size"]
  assert [p.split("=")[0] for p in found(config, stages="support")] == ["ensemble.epochs"]
  config.seed = -1  # seed and data always
  assert found(config, stages=("attribution",)) == ["seed=-1: must be an int >= 0"]
  with pytest.raises(ValueError, match="unknown stages"):
    validate.check(config, stages=("attribute",))


def test_flip_config():
  config = load_config("flip", "digits")
  train, test = digits_data()
  config.mode = "predict"
  config.num_models = 0
  config.ensemble.batch_size = 1500
  problems = found(config, train, test)
  assert [p.split("=")[0] for p in problems] == ["mode", "num_models", "ensemble.batch_size"]
  assert "ensemble.batch_size=1500 exceeds the 1438 training images" in problems[2]


def test_attribution_targets():
  config = load_config("digits")
  train, test = digits_data()
  config.attribution.targets = "list"
  config.support.num_targets = 2
  assert "non-empty" in found(config, train, test)[0]
  config.attribution.target_list = (3, 3, -1)
  assert "repeated: [3]" in found(config, train, test)[0]
  config.attribution.target_list = (3, 400)
  assert "positions [400] are outside the 359 test images" in found(config, train, test)[0]
  config.attribution.target_list = (3, 17)
  assert found(config, train, test) == []
  # k only has to fit the classes of the listed targets (test position 3 and 17 hold class 0).
  config.attribution.k = 140
  config.attribution.target_list = (3,)
  config.support.num_targets = 1
  assert found(config, train, test) == []
  config.attribution.same_class = False
  config.attribution.k = 1439
  assert "attribution.k=1439 exceeds the 1438 training images" in found(config, train, test)[0]


def test_support_num_targets_against_attribution():
  config = load_config("digits")  # 16 random targets, support of the first 8
  config.support.num_targets = 17
  assert "support.num_targets=17 exceeds the 16 targets" in found(config)[0]
  config.support.num_targets = 0  # all
  assert found(config) == []
  config.attribution.targets = "all"
  config.support.num_targets = 360
  train, test = digits_data()
  assert found(config) == []  # the test split's size is unknown without data
  assert "support.num_targets=360 exceeds the 359" in found(config, train, test)[0]


def test_support_targets_and_reference_methods(tmp_path):
  config = load_config("digits")
  train, test = digits_data()
  config.support.methods = f"esvm,trak={tmp_path / 'missing.npy'}"
  problems = found(config, train, test)
  assert len(problems) == 2, problems
  assert "top-k file" in problems[0] and "does not exist" in problems[0]
  assert "support.targets='': the reference-layout matrix" in problems[1]
  np.save(tmp_path / "missing.npy", np.zeros((359, 128), np.int64))
  # Explicit targets must be attributed by this run (for esvm) and exist in the test split.
  from jaxattr.attribute.attribution import select_targets  # pylint: disable=import-outside-toplevel
  chosen = select_targets("random", 359, 16, (), 0)[:3]
  config.support.targets = ",".join(map(str, chosen))
  config.support.num_targets = 0
  assert found(config, train, test) == []
  config.support.targets = "1000"
  assert "index values [1000] are not among the 359 test images" in found(config, train, test)[0]
  missing = sorted(set(range(359)) - set(select_targets("random", 359, 16, (), 0).tolist()))
  config.support.targets = str(missing[0])
  assert f"[{missing[0]}] are not among the 16 targets" in found(config, train, test)[0]
  # Launched alone (launch/support.py), the attribution files decide instead.
  assert found(config, train, test, stages=("support",)) == []
  config.support.targets = "1,2"
  config.support.num_targets = 3
  assert "support.num_targets=3 exceeds the 2 targets of support.targets" in found(config)[0]


def test_external_matrices_are_read_before_any_stage(tmp_path):
  """The 'name=PATH' files of support.methods and lds.methods are read in the validation pass
  (with the data), as the stages read them, so a bad one fails before the pipeline's first stage."""
  config = load_config("digits")
  train, test = digits_data()
  config.support.targets, config.support.num_targets = "3,5", 0
  topk = np.zeros((359, 128), np.int64)
  topk[[3, 5]] = np.arange(128)
  good, bad = tmp_path / "topk.npy", tmp_path / "bad.npy"
  np.save(good, topk)
  config.support.methods = f"ref={good}"
  assert found(config, train, test, stages=("support",)) == []
  np.save(good, topk.astype(np.float32))  # whole numbers saved as floats are fine
  assert found(config, train, test, stages=("support",)) == []
  np.save(bad, topk + 0.5)
  config.support.methods = f"ref={bad}"
  problems = found(config, train, test, stages=("support",))
  assert len(problems) == 1 and "expected whole-number index values" in problems[0], problems
  assert "first 0.5 at position (0, 0)" in problems[0]
  foreign = topk.copy()
  foreign[5, 7] = 5000
  np.save(bad, foreign)
  problems = found(config, train, test, stages=("support",))
  assert len(problems) == 1 and "1 value(s) that are not training index values" in problems[0]
  assert "(first [5000])" in problems[0]
  bad.write_text("3,5\n")  # a text file where a .npy is expected
  problems = found(config, train, test, stages=("support",))
  assert len(problems) == 1 and "is not a numpy file" in problems[0], problems
  # A target list saved as floats: whole numbers pass, fractions are refused, not truncated.
  listed = tmp_path / "targets.npy"
  np.save(listed, np.array([3.0, 5.0]))
  config.support.methods, config.support.targets = f"ref={good}", str(listed)
  assert found(config, train, test, stages=("support",)) == []
  np.save(listed, np.array([3.0, 5.5]))
  problems = found(config, train, test, stages=("support",))
  assert len(problems) == 1 and "expected whole-number index values" in problems[0], problems
  assert "first 5.5 at position (1,)" in problems[0]
  config.lds.num_targets = 0  # every test image
  scores = tmp_path / "scores.npy"
  np.save(scores, np.zeros((359, 100), np.float32))
  config.lds.methods = f"esvm,ext={scores}"
  problems = found(config, train, test, stages=("lds",))
  assert len(problems) == 1 and problems[0].startswith("lds.methods: entry 'ext="), problems
  assert "scores of shape (359, 100), expected [359 targets, 1438 training images]" in problems[0]
  np.save(scores, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
  problems = found(config, train, test, stages=("lds",))
  assert len(problems) == 1 and "cannot read" in problems[0] and "numpy.save" in problems[0]
  np.save(scores, np.zeros((359, 1438), np.float32))
  assert found(config, train, test, stages=("lds",)) == []
  # Without the data only the file's existence can be checked.
  np.save(scores, np.zeros((359, 100), np.float32))
  assert found(config, stages=("lds",)) == []


def test_trak_projection_needs_fewer_dimensions_than_images_without_a_ridge():
  config = load_config("digits")  # TRAK in attribution.methods and lds.methods
  train, test = digits_data()
  config.trak.proj_dim = 1438
  assert found(config, train, test) == []
  config.trak.proj_dim = 1439
  problems = found(config, train, test)
  assert len(problems) == 1 and problems[0].startswith(
      "trak.proj_dim=1439 exceeds the 1438 training images"), problems
  assert "set trak.lambda_reg > 0" in problems[0]
  config.trak.lambda_reg = 1e-3
  assert found(config, train, test) == []
  config.trak.lambda_reg, config.attribution.methods, config.lds.methods = 0.0, "esvm", "esvm"
  config.support.methods = "esvm"
  assert found(config, train, test) == []  # no TRAK, no check


def test_exhaustive_grid():
  config = load_config("digits")  # k = 128; the default grid reaches 1280
  assert found(config) == []  # not exhaustive: the grid is unused
  config.support.exhaustive = True
  assert "support.grid=(10, 20, 40, 80, 160, 320, 640, 1280): must be strictly" in found(config)[0]
  config.support.grid = (16, 32, 64)
  assert found(config) == []
  config.support.grid = (32, 16)
  assert "support.grid=(32, 16)" in found(config)[0]


def test_encoder_checkpoint(tmp_path):
  config = load_config("digits")
  config.encoder.checkpoint = str(tmp_path / "none")
  assert validate.pipeline_stages(config) == ("features", "attribution", "support", "lds")
  assert "does not exist" in found(config)[0]
  (tmp_path / "none" / "variables").mkdir(parents=True)
  (tmp_path / "none" / "meta.json").write_text("{}")
  assert found(config) == []
  # A damaged meta.json, or one naming an encoder this jaxattr lacks: named with the config.
  (tmp_path / "none" / "meta.json").write_text('{"encoder": "resnet50"')
  problems = found(config)
  assert len(problems) == 1 and "meta.json: cannot read the checkpoint's metadata" in problems[0]
  assert "write it again" in problems[0]
  (tmp_path / "none" / "meta.json").write_text('["resnet50"]')
  assert "expected a JSON object with the encoder's name" in found(config)[0]
  (tmp_path / "none" / "meta.json").write_text('{"encoder": "vit_b"}')
  assert "names the encoder 'vit_b', which this jaxattr does not know" in found(config)[0]
  (tmp_path / "none" / "meta.json").write_text('{"encoder": "resnet50"}')
  assert found(config) == []
  # The variables themselves are read by the features stage: an empty variables/ is one error.
  from jaxattr import checkpoint  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="variables: cannot restore the variables .*write it again"):
    checkpoint.load_variables(str(tmp_path / "none"))


def test_missing_field_and_base_config():
  config = config_lib.base_config()
  assert found(config, stages=PIPELINE[:-1]) == []
  # The lds stage asked for explicitly needs methods (the base config has none).
  assert found(config, stages=("lds",)) == [
      "lds.methods='': must be a non-empty comma-separated list of names"
  ]
  del config.pretrain["epochs"]
  assert found(config, stages=PIPELINE[:-1]) == [
      "pretrain.epochs: missing from the config (start it "
      "from jaxattr.config's sections)"
  ]


def test_imagenet_recipes_are_valid_and_checked_against_the_images():
  """Both ImageNet recipes pass on 64 px images; a crop beyond the images and a ramp that ends
  before it starts are named."""
  for name in config_lib.RECIPES:
    config = load_config("digits")
    config.ensemble = config_lib.imagenet_recipe(name)
    config.ensemble.batch_size = 64
    train, test = digits_data()
    assert found(config) == [], name
    config.ensemble.data_parallel = 3  # 64 images a step do not split over 3 devices
    assert found(config) == [
        "ensemble.batch_size=64 does not divide over ensemble.data_parallel=3 devices; make it "
        "a multiple of 3"
    ]
    config.ensemble.data_parallel = 1
    problems = found(config, train, test)  # digits are 16 px here
    assert any("ensemble.res_max=" in p and "exceeds the 16-pixel side" in p for p in problems)
  config.ensemble.ramp_end = 1
  assert any("ensemble.ramp_end=1 precedes ensemble.ramp_start=5" in p for p in found(config))


def test_trainer_refuses_a_batch_that_does_not_divide_over_the_data_axis():
  from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top

  cfg = config_lib.imagenet_recipe("rn18_8")
  cfg.update({"batch_size": 6, "data_parallel": 4, "width": 0.0625, "res_min": 0, "res_max": 0})
  train, _ = digits_data()
  with pytest.raises(ValueError,
                     match="batch_size=6 does not divide over ensemble.data_parallel=4"):
    ensemble.Trainer(cfg, train)
  cfg.data_parallel = 3
  cfg.batch_size = 6
  with pytest.raises(ValueError, match="data_parallel=3 must divide the 1 devices"):
    ensemble.Trainer(cfg, train)
