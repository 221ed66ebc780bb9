"""Experiment config sections: every configs/*.py starts from `base_config()` and overrides.

This module imports ml_collections and nothing of jaxattr, so a config file stays cheap to load
and the stage modules read their section's fields without defining them. Each field's comment
gives its unit.
"""

import ml_collections
from ml_collections import config_dict

# The real CIFAR-10 JPEG archive of the development machines and CI (../shared/data/README.md),
# relative to the checkout root, from where the README's commands run. The one place that names
# it: configs/cifar10.py (`:jpeg`, `:cpu`), the tests and the benchmarks' --data default use it.
CIFAR10_JPEG = "folder:../shared/data/cifar10-jpeg.tar.gz"


def names(value) -> tuple[str, ...]:
  """The entries of a list field: 'a,b' (as `--config.support.methods=esvm,pytrak=PATH` gives it)
  or a sequence of such strings, split at commas, stripped, empty entries dropped."""
  parts = [value] if isinstance(value, str) else list(value)
  return tuple(s.strip() for part in parts for s in str(part).split(",") if s.strip())


def data_section() -> ml_collections.ConfigDict:
  """`config.data`: the source and the options every source takes (`jaxattr.data.load`)."""
  c = ml_collections.ConfigDict()
  c.source = "digits"  # 'digits' | 'folder:PATH' | 'npz:PATH' | 'tfds:NAME'
  c.options = ml_collections.ConfigDict()
  c.options.size = config_dict.placeholder(int)  # resize to size x size pixels (None = native)
  c.options.limit_per_class = config_dict.placeholder(int)  # first n per class (None = all)
  # Per kind of source (jaxattr.data.SOURCE_OPTIONS; None = not given, the source's default):
  c.options.workers = config_dict.placeholder(int)  # folder: decode threads of a directory (4)
  c.options.val_labels = config_dict.placeholder(str)  # folder: a flat val/ folder's label file
  c.options.data_dir = config_dict.placeholder(str)  # tfds: the data directory it was built in
  # Stream the images of a 'folder:DIR' tree through decode workers instead of loading a split
  # into memory (ImageNet); the features stage then writes memory-mapped .npy files.
  c.stream = False
  return c


def encoder_section() -> ml_collections.ConfigDict:
  """`config.encoder`: the feature encoder, pretrained here or read from a checkpoint."""
  c = ml_collections.ConfigDict()
  c.name = "lightly_resnet18"
  c.width = 1.0  # channel multiplier (1.0 = 64 base channels, 512-d features)
  c.num_splits = 8  # SplitBatchNorm groups during pretraining
  c.checkpoint = ""  # variables checkpoint to use; '' = pretrain into WORKDIR/pretrain
  return c


def pretrain_section() -> ml_collections.ConfigDict:
  """`config.pretrain`: the reference's MoCo recipe (REFERENCE.md section 4), batch 512."""
  c = ml_collections.ConfigDict()
  c.epochs = 800
  c.batch_size = 512  # examples per step (a multiple of encoder.num_splits)
  c.base_lr = 0.06  # lr per 128 examples; the lr is base_lr * batch_size / 128
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.ema_momentum = 0.99  # key encoder: k = m * k + (1 - m) * q
  c.temperature = 0.1
  c.memory_bank_size = 4096  # negatives (keys of past batches)
  c.proj_hidden_dim = 512
  c.proj_out_dim = 128
  c.min_scale = 0.08  # RandomResizedCrop area fraction, lower bound
  c.knn_k = 200  # neighbours of the kNN monitor
  c.knn_temperature = 0.1
  c.knn_every_epochs = 50  # 0 = only at the end
  c.checkpoint_every_steps = 500
  c.log_every_steps = 50
  c.max_steps = -1  # stop after this many steps (debugging, tests); -1 = all epochs
  return c


def features_section() -> ml_collections.ConfigDict:
  """`config.features`: feature extraction."""
  c = ml_collections.ConfigDict()
  c.batch_size = 512  # images per step over all devices (rounded up to a multiple of them)
  c.dtype = "float32"  # compute dtype, 'float32' | 'bfloat16' (features are stored as float32)
  # Streamed data only (data.stream): the dtype on disk, rows per resumable chunk, decode worker
  # processes (0 = threads of this process), decode threads per process, and whether an
  # unreadable image is skipped (zero image, counted, `ok` False; attribution neither ranks it
  # nor takes it as a target) instead of stopping the run.
  c.store_dtype = "float32"  # 'float32' | 'float16'
  c.chunk_rows = 10000
  c.workers = 0
  c.threads = 4
  c.skip_unreadable = False
  return c


def resident_section() -> ml_collections.ConfigDict:
  """`config.resident`: the small resident copy of a streamed split (`launch/prepare.py`)."""
  c = ml_collections.ConfigDict()
  c.side = 64  # pixels per side: 32 | 64 | 96 | 128 (shorter side resized, centre crop)
  c.chunk_rows = 10000  # images per resumable chunk
  c.batch_size = 256  # images per decode batch
  c.workers = 0  # decode processes (0 = threads of this process)
  c.threads = 4  # decode threads per process
  # Store an unreadable image as zeros (ok=False; no model trains on it) instead of stopping.
  c.skip_unreadable = False
  return c


def attribution_section() -> ml_collections.ConfigDict:
  """`config.attribution`: which targets, which methods, and the ESVM solver's options."""
  c = ml_collections.ConfigDict()
  c.methods = "esvm,l2"  # comma-separated, any of 'esvm', 'l2', 'cosine'
  c.k = 1280  # training examples kept per target
  c.same_class = True  # candidates = training examples with the target's label
  c.targets = "random"  # 'all' test examples, a seeded 'random' sample, or a 'list'
  c.num_targets = 100  # targets of targets='random' (seeded by config.seed)
  c.target_list = ()  # test positions (rows of the test split) of targets='list'
  c.C = 0.1  # sklearn LinearSVC's C (the reference's value)
  c.tol = 1e-5  # ESVM convergence: largest remaining Newton step, in decision-value units
  c.max_iter = 50  # ESVM Newton iterations per target
  c.max_rows = 224  # ESVM: most margin violators an exact Newton step handles (candidates)
  c.chunk_size = 1024  # targets per step (bounds device memory; padded to the devices)
  c.allow_nonconverged = False  # False: finish, write everything, then raise if any failed
  return c


def trainer_section() -> ml_collections.ConfigDict:
  """`config.ensemble`: the counterfactual trainer (REFERENCE.md section 3)."""
  c = ml_collections.ConfigDict()
  c.model = "resnet9"  # 'resnet9' | 'mobilenetv2' | 'resnet18' (torchvision layout)
  c.width = 1.0  # channel multiplier (1.0 = the reference)
  c.stem = "small"  # resnet18 only: 'small' (3x3 / 1 conv + max-pool, 32-64 px) | 'imagenet'
  c.blurpool = False  # resnet18 only: BlurPool before the blocks' strided convs (ffcv-imagenet)
  c.epochs = 24
  c.batch_size = 512  # images per step per model (drop_last)
  c.peak_lr = 0.5  # lr at the peak, per batch of batch_size (mean loss)
  c.peak_epoch = 5.0  # epoch at which the triangular schedule peaks
  # Images of the FULL training set that set the schedule's iterations per epoch (0 = the
  # dataset given); the reference uses 50,000 // 512 = 97 even when images are removed.
  c.schedule_examples = 0
  c.momentum = 0.9  # SGD momentum (torch semantics, no Nesterov)
  c.weight_decay = 5e-4  # L2 added to the gradient of every parameter
  c.bn_weight_decay = True  # False: none on parameters of modules named *bn* (ffcv-imagenet)
  c.label_smoothing = 0.1
  c.compute_dtype = "auto"  # 'auto' (bf16 on GPU/TPU, float32 on CPU) | 'float32' | 'bfloat16'
  # Training views: 'cifar' (the reference's: flip, translate, Cutout; CIFAR statistics) or
  # 'rrc' (ffcv-imagenet's: RandomResizedCrop to the epoch's resolution, flip; ImageNet
  # statistics). Evaluation sees the whole image, normalised the same way.
  c.augment = "cifar"
  c.translate = 2  # 'cifar': random translation in pixels (zero padding)
  c.cutout = 8  # 'cifar': Cutout square side in pixels (filled with the mean); 0 = off
  c.flip = True  # random horizontal flip
  c.min_scale = 0.08  # 'rrc': smallest crop area, a fraction of the image
  # 'rrc': the crop's side per epoch, ffcv-imagenet's ramp: res_min up to epoch ramp_start,
  # res_max from ramp_end, between them linear, rounded to a multiple of res_step (pixels; 0 =
  # the image side).
  c.res_min = 0
  c.res_max = 0
  c.ramp_start = 0
  c.ramp_end = 0
  c.res_step = 8
  c.eval_flip = False  # predict with the logits of the image and its mirror image averaged
  c.models_per_wave = 64  # models trained at once (a multiple of the devices); 0 = all
  # 'map': a device's models one after another in one program (bit-exact whatever the wave);
  # 'vmap': batched (grouped convolutions); 'auto': the backend's measured winner.
  c.formulation = "auto"
  # Same values through ops XLA:CPU differentiates faster: ResNet-9's stride-2 convolution
  # gradient through a space-to-depth convolution; ResNet-18's convolutions with outputs of at
  # most 4 x 4 pixels as patch matrix products, and its conv inputs stored once
  # (`layers.materialize`). 'auto' = on for the CPU backend only | 'on' | 'off'.
  c.cpu_ops = "auto"
  c.eval_batch_size = 500  # images per model per evaluation step
  # Devices per model: each model's batch is split over this many devices (the mesh axis
  # 'data', gradients and BatchNorm statistics of the whole batch), the device groups train
  # different models (axis 'models'). The training images are on every device ('replicated') or
  # split over the data axis ('sharded', 1/data_parallel of them per device, each batch's pixels
  # summed over the axis).
  c.data_parallel = 1
  c.data_sharding = "replicated"
  c.log_every_s = 30.0  # seconds between progress logs
  return c


def support_section() -> ml_collections.ConfigDict:
  """`config.support`: removal / mislabel support by counterfactual retraining."""
  c = ml_collections.ConfigDict()
  c.metrics = "removal,mislabel"  # comma-separated ('' = no support stage)
  # Comma-separated methods read from WORKDIR/attribution/<name>/; 'name=PATH' instead reads a
  # reference-layout top-k matrix, int64 [n_test, >= k] of train `index` values, one row per
  # test `index` (its targets must then come from `targets`).
  c.methods = "esvm,l2"
  # Targets as test `index` values: '' (those of each method's attribution), a .npy or text
  # file of integers, or a comma-separated list ('3,17,42').
  c.targets = ""
  c.num_targets = 100  # the first n targets (0 = all)
  c.num_tests = 5  # models per evaluated prefix size; flipped when <= num_tests // 2 are right
  c.search_budget = 7  # bisection steps after the all-k check
  c.k = 1280  # largest prefix size (images); the all-k check removes/relabels this many
  # Evaluate every `grid` prefix size (plus k) in one round instead of bisecting.
  c.exhaustive = False
  c.grid = (10, 20, 40, 80, 160, 320, 640, 1280)  # prefix sizes of exhaustive mode (images)
  c.seed = 0  # root of the search's training seeds (per round, target and test)
  c.flip_models = 10  # full-data models whose mean softmax gives the flip classes
  c.flip_seed = 0
  # Every (metric, method) search in the same rounds: one trainer call a round for all.
  c.joint = True
  return c


def trak_section() -> ml_collections.ConfigDict:
  """`config.trak`: TRAK (`jaxattr.attribute.trak`), method 'trak' of attribution and LDS."""
  c = ml_collections.ConfigDict()
  c.num_models = 5  # full-data models (the `ensemble` section's recipe), seeds seed * 1000 + m
  c.proj_dim = 2048  # dimensions of the random projection of the gradients
  c.projection = "rademacher"  # 'rademacher' (+-1) | 'normal'
  c.seed = 0  # models' seeds and the projection's key
  c.lambda_reg = 0.0  # ridge added to the diagonal of X^T X
  c.chunk_size = 64  # images per per-example-gradient step (a multiple of the devices)
  c.block_rows = 8192  # projection rows generated at once per parameter leaf
  return c


def lds_section() -> ml_collections.ConfigDict:
  """`config.lds`: the linear datamodeling score (`jaxattr.counterfactual.lds`)."""
  c = ml_collections.ConfigDict()
  # Comma-separated: any of 'trak', 'esvm', 'l2', 'cosine', or 'name=PATH.npy' (a float score
  # matrix [targets, train] in the order of the LDS targets and training positions); '' = no
  # LDS stage.
  c.methods = ""
  c.num_subsets = 100  # S random training subsets
  c.alpha = 0.5  # fraction of the training set in each subset
  c.models_per_subset = 1  # R models trained on each subset (margins averaged)
  c.num_targets = 2000  # test images evaluated (a seeded sample; 0 = all)
  c.seed = 0  # subsets, targets and the models' seeds
  c.bootstrap = 1000  # bootstrap resamples of the targets for the 95% intervals
  return c


def base_config() -> ml_collections.ConfigDict:
  """Seed, data, encoder, pretrain, features, attribution, ensemble, support, trak, lds and viz
  sections."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = data_section()
  c.encoder = encoder_section()
  c.pretrain = pretrain_section()
  c.features = features_section()
  c.resident = resident_section()
  c.attribution = attribution_section()
  c.ensemble = trainer_section()
  c.support = support_section()
  c.trak = trak_section()
  c.lds = lds_section()
  c.viz = ml_collections.ConfigDict()
  c.viz.num_targets = 8  # targets shown per method in WORKDIR/attribution/<method>/grid.png
  c.viz.top = 16  # attributed images shown per target
  # Job arrays (clusters without a coordinator): shard `index` of `count` separate single-process
  # jobs of launch/attribute.py; launch/merge.py assembles them. count 1: no sharding.
  c.shard = ml_collections.ConfigDict()
  c.shard.index = 0
  c.shard.count = 1
  return c


# The counterfactual recipes of the resident ImageNet copy (`imagenet_recipe`).
RECIPES = ("ffcv_rn18_16", "rn18_8")


def imagenet_recipe(name: str) -> ml_collections.ConfigDict:
  """`config.ensemble` for ResNet-18s on the resident 64 px ImageNet (configs/imagenet.py).

  'ffcv_rn18_16': ffcv-imagenet's rn18_16_epochs config scaled to 64 px: SGD lr 0.5 at batch
    1024 (its train_imagenet.py uses the lr as given, per step, whatever the batch), momentum
    0.9, weight decay 5e-5 not on BatchNorm, label smoothing 0.1, lr linear from 0 to the peak at
    epoch 2 then to 0 at epoch 16, per iteration; BlurPool; RandomResizedCrop + flip with the
    crop ramped 40 -> 48 px between epochs 11 and 13 (its 160 -> 192 at an evaluation
    resolution of 256, times 64/256; steps of 8 = its 32 x 64/256); evaluation of the whole
    64 px image with flip averaging.
  'rn18_8': the cheaper recipe: the same at half the epochs (peak at epoch 1), crops ramped
    32 -> 40 px between epochs 5 and 7, no BlurPool (README "ImageNet counterfactuals").
  """
  if name not in RECIPES:
    raise ValueError(f"unknown ImageNet recipe {name!r}; known: {RECIPES}")
  c = trainer_section()
  c.update({
      "model": "resnet18",
      "stem": "small",
      "blurpool": True,
      "epochs": 16,
      "batch_size": 1024,
      "peak_lr": 0.5,
      "peak_epoch": 2.0,
      "momentum": 0.9,
      "weight_decay": 5e-5,
      "bn_weight_decay": False,
      "label_smoothing": 0.1,
      "augment": "rrc",
      "translate": 0,
      "cutout": 0,
      "flip": True,
      "min_scale": 0.08,
      "res_min": 40,
      "res_max": 48,
      "ramp_start": 11,
      "ramp_end": 13,
      "res_step": 8,
      "eval_flip": True,
      "models_per_wave": 8,
      "eval_batch_size": 250,
  })
  if name == "rn18_8":
    c.update({
        "blurpool": False,
        "epochs": 8,
        "peak_epoch": 1.0,
        "res_min": 32,
        "res_max": 40,
        "ramp_start": 5,
        "ramp_end": 7,
    })
  return c
