r"""Converts a PyTorch ResNet checkpoint into a jaxattr variables checkpoint.

  python launch/convert.py --src=moco.ckpt --dst=workdir/encoder
  python launch/convert.py --src=moco_v2_800ep_pretrain.pth.tar --dst=workdir/moco_r50
  python launch/convert.py --src=resnet50.pth --dst=workdir/r50_sup --keep_fc

The output loads with `launch/features.py --config.encoder.checkpoint=DST`. Needs torch
(pip install 'jaxattr[torch]') for this step only. See `jaxattr.convert` for the formats.
"""

from absl import app, flags, logging

from jaxattr import convert, utils

_SRC = flags.DEFINE_string("src", None, "PyTorch checkpoint (.pth, .pth.tar, Lightning .ckpt).",
                           required=True)
_DST = flags.DEFINE_string("dst", None, "Output checkpoint directory.", required=True)
_FORMAT = flags.DEFINE_enum("format", "auto", ("auto",) + convert.FORMATS,
                            "Checkpoint layout; 'auto' detects it from the keys.")
_ENCODER = flags.DEFINE_enum("encoder", None, sorted(convert.ENCODERS),
                             "Force the architecture (default: detected from the keys).")
_WIDTH = flags.DEFINE_float("width", None, "lightly width multiplier (default: from the stem).")
_PREFIX = flags.DEFINE_string(
    "prefix", None, "Key prefix of the encoder, e.g. 'teacher_backbone.' (default: "
    "the format's own).")
_KEEP_FC = flags.DEFINE_bool("keep_fc", False, "torchvision: keep fc as the 'logits' head.")
_AVERAGE_SPLITS = flags.DEFINE_bool("average_splits", False,
                                    "Store SplitBatchNorm statistics averaged (num_splits=1).")
_STEM_RELU = flags.DEFINE_bool(
    "stem_relu", None, "lightly: ReLU after the stem BN (default: only for plain "
    "ResNetGenerator state_dicts).")
_EXPORT_MOMENTUM = flags.DEFINE_bool("export_momentum", False,
                                     "Also convert the momentum encoder to DST_momentum.")
_EXPORT_EXTRAS = flags.DEFINE_bool("export_extras", False,
                                   "Also save heads/queues unchanged to DST_extras.npz.")
_TRUST_PICKLE = flags.DEFINE_bool("trust_pickle", False,
                                  "Allow torch.load(weights_only=False) for trusted files.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  utils.quiet_library_logs()
  try:
    meta = convert.convert(_SRC.value, _DST.value, _FORMAT.value, encoder=_ENCODER.value,
                           width=_WIDTH.value, prefix=_PREFIX.value, keep_fc=_KEEP_FC.value,
                           average_splits=_AVERAGE_SPLITS.value, stem_relu=_STEM_RELU.value,
                           export_momentum=_EXPORT_MOMENTUM.value,
                           export_extras=_EXPORT_EXTRAS.value, trust_pickle=_TRUST_PICKLE.value,
                           overwrite=_OVERWRITE.value)
  except (convert.ConversionError, FileExistsError, FileNotFoundError) as e:
    # The message already names the file and the offending keys; a traceback adds nothing.
    raise SystemExit(f"convert: {e}") from None
  logging.info("wrote %s: %s %s (format %s, %d keys ignored, dropped %s)", _DST.value,
               meta["encoder"], meta["encoder_kwargs"], meta["format"], meta["ignored_keys"],
               meta["dropped_keys"])


if __name__ == "__main__":
  app.run(main)
