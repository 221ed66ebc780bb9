#!/usr/bin/env bash
# The prepared accelerator check: one run of every benchmark at GPU sizes, within a budget of 9
# minutes (one device call). Each step's table and JSON go to workdir_gpu_check/gpu_check/ in
# the checkout (git-ignored), packed after every step into $OUT/gpu_check.tar.gz (a lent machine
# sends back at most 8 files); the last lines printed are one status line per step (exit
# status, seconds).
#
#   OUT=/tmp/out bash launch/gpu_check.sh
#
# The accelerator image has jax, flax, optax, orbax-checkpoint, torch and scikit-learn, but not
# ml-collections, grain (+ array-record, portpicker), traker or lightly: `bash
# launch/gpu_check.sh --fetch_wheels` (on a machine with the package registries) downloads
# them for its Python 3.12 into .whl/ (git-ignored), and the check installs whatever is in
# .whl/ into a private folder first. ../shared does not travel there either: the CIFAR-10
# archive of jaxattr/config.py's CIFAR10_JPEG is read from data/cifar10-jpeg.tar.gz in the
# checkout (git-ignored) when ../shared is absent. The device call carries .whl and data.
#
# GPU_CHECK_SMOKE=1 runs every step at toy sizes (about 10 minutes on 2 CPU cores), to rehearse
# the script, in an environment built like the accelerator image, before a lent machine's
# minutes are spent on it (README, "Benchmarks").
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch_wheels" ]; then
  set -e
  platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64"
  platforms="$platforms --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  for w in ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 \
           lightly==1.6.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp $platforms -d .whl "$w"
  done
  python3 -m pip wheel -q --no-deps -w .whl traker==0.3.2  # published as a source archive only
  ls .whl
  exit 0
fi
OUT=${OUT:-bench_results}
RES=workdir_gpu_check/gpu_check  # in the checkout (git-ignored); packed into $OUT after each step
SMOKE=${GPU_CHECK_SMOKE:-0}
# Seconds for all steps together (a device call may run 600 s): a step's time limit is cut to
# what is left, and once under 30 s are left the remaining steps are skipped, so the script
# always ends with its results packed. GPU_CHECK_ONLY="name ..." runs only the named steps (a
# second call for the steps the first one skipped).
BUDGET=${GPU_CHECK_BUDGET:-$([ "$SMOKE" = 1 ] && echo 3600 || echo 540)}
ONLY=${GPU_CHECK_ONLY:-}
STEPS="imagenet_train trak lds_slice esvm_hard_synthetic esvm_imagenet_shaped_family_norm_3
  esvm_imagenet_shaped_family_norm_30 esvm_imagenet_shaped_family_norm_1000 esvm_imagenet_sweep
  loader features_float32 features_bfloat16 esvm train"
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
  echo "GPU_CHECK_BUDGET=$BUDGET: expected whole seconds, e.g. 540" >&2
  exit 2
fi
for name in $ONLY; do
  if [[ " $(echo $STEPS) " != *" $name "* ]]; then
    echo "GPU_CHECK_ONLY names an unknown step '$name'; the steps:" $STEPS >&2
    exit 2
  fi
done
rm -rf "$RES" && mkdir -p "$RES" "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$site"
fi
DATA=$(sed -n 's/^CIFAR10_JPEG = "\(.*\)"/\1/p' jaxattr/config.py)
[ -e "${DATA#folder:}" ] || DATA=folder:data/cifar10-jpeg.tar.gz
SUMMARY=$RES/steps.txt
: > "$SUMMARY"

# size GPU_ARGS SMOKE_ARGS: the arguments of this run's size.
size() { if [ "$SMOKE" = 1 ]; then echo "$2"; else echo "$1"; fi; }

# pack: every result so far into $OUT/gpu_check.tar.gz (written under a temporary name, then
# renamed), so that a call stopped from outside still brings back what finished.
pack() {
  tar -czf "$OUT/.gpu_check.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")" &&
    mv "$OUT/.gpu_check.tar.gz" "$OUT/gpu_check.tar.gz"
}

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit (at most what is left of the
# budget) with its output in NAME.log, shows the log's last lines, records the exit status and
# packs the results.
step() {
  local name=$1 limit=$2 start=$SECONDS rc left
  shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    printf '%-38s skipped (budget of %d s spent)\n' "$name" "$BUDGET" >> "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  tail -n 10 "$RES/$name.log"
  printf '%-38s rc %-4s %5d s\n' "$name" "$rc" $((SECONDS - start)) >> "$SUMMARY"
  pack
}

{ if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi
  python3 -c "import sys, jax, torch; print(sys.version.split()[0], 'jax', jax.__version__,
torch.__version__, jax.devices())"; } > "$RES/env.log" 2>&1
cat "$RES/env.log"
# The steps, those that measure an open issue's accelerator goals first (#18's MFU, #19's
# TRAK and LDS); a step whose limit does not fit in what is left of the budget gets what is
# left.
# Issue 18: ResNet-18s of the ffcv_rn18_16 recipe on 64 px ImageNet-shaped synthetic data (1,000
# learnable classes, 256,000 images, 2 epochs, 4 models at once, batch 1024): images/s per model,
# MFU, top-1 on held-out images. A full-size run: --train_examples=1281167 --epochs=16.
step imagenet_train 300 python3 -m benchmarks.benchmark_imagenet_train --mode=gpu \
  $(size "--classes=1000 --train_examples=256000 --epochs=2 --num_models=4 --batch_size=1024" \
         "--classes=10 --train_examples=256 --epochs=1 --num_models=2 --batch_size=64 \
          --width=0.25") \
  --out="$RES/imagenet_train.json"
# Issue 19: TRAK featurisation at full width beside traker (BasicProjector: its CudaProjector
# needs the fast_jl extension); then the CIFAR-10 LDS slice: TRAK-5 over 16 subsets and 1,000
# targets with the full 24-epoch recipe (the paper-scale run: configs/cifar10.py, S = 100, 2,000
# targets, README "TRAK and LDS"). Its workdir (features: 400 MB per model) is workdir_gpu_check/
# in the checkout (git-ignored), off $OUT.
step trak 150 python3 -m benchmarks.benchmark_trak \
  $(size "--width=1 --examples=4096 --chunk=256 --batch=256 --repeats=2" \
         "--width=0.125 --examples=64 --chunk=32 --batch=32 --repeats=1 --proj_dim=128") \
  --out="$RES/trak.json"
rm -rf workdir_gpu_check/lds
step lds_slice 420 python3 launch/lds.py --workdir workdir_gpu_check/lds \
  $(size "--config configs/cifar10.py:lds_gpu_slice --config.data.source=$DATA" \
         "--config configs/digits.py:quick --config.lds.methods=trak --config.lds.num_subsets=4")
cp workdir_gpu_check/lds/lds/summary.json "$RES/lds_slice.json" 2>/dev/null && pack
# Issue 15: the ESVM on the harder feature families (synthetic: nothing to download or extract),
# targets/s per family beside sklearn's primal loop on the host (no dual fits: at norm 3 one
# takes over a minute).
for fam in "hard_synthetic" "imagenet_shaped --family_norm=3" "imagenet_shaped --family_norm=30" \
           "imagenet_shaped --family_norm=1000"; do
  name=esvm_$(echo "$fam" | tr -c 'a-z0-9\n' '_' | sed 's/__*/_/g; s/_$//')
  step "$name" 120 python3 -m benchmarks.benchmark_esvm --mode=compare --family=$fam \
    $(size "--num_targets_jax=2000 --family_targets=2000 --num_targets_sklearn=10" \
           "--num_targets_jax=20 --family_targets=20 --num_targets_sklearn=1 --repeats=1") \
    --num_targets_dual=0 --out="$RES/$name.json"
done
# Issues 15-16: 100 ImageNet-shaped classes x 50 targets, one topk call per class (the full
# 1,000-class sweep: --classes=1000); the streaming loader beside torchvision's DataLoader.
step esvm_imagenet_sweep 150 python3 -m benchmarks.esvm_imagenet_sweep \
  $(size "--classes=100 --sklearn_every=25" \
         "--classes=2 --targets=4 --candidates=300 --dim=256 --k=128 --sklearn_every=2") \
  --out="$RES/esvm_imagenet_sweep.json"
step loader 150 python3 -m benchmarks.benchmark_loader \
  $(size "--classes=4 --per_class=48 --repeats=2 --workers=1,4" \
         "--classes=2 --per_class=16 --batch=8 --repeats=1 --workers=1,2") \
  --out="$RES/loader.json"
# Issue 3: ResNet-18/32px and ResNet-50/224px inference, jaxattr vs PyTorch, float32 and bf16.
for dtype in float32 bfloat16; do
  step features_$dtype 150 python3 -m benchmarks.benchmark_features --dtype=$dtype --xla_flags= \
    $(size "--batch_size=1024 --imagenet_batch_size=256" \
           "--batch_size=16 --imagenet_batch_size=2 --repeats=1 --warmup=0") \
    --out="$RES/features_$dtype.json"
done
# Issue 4: ESVM vs sklearn on random-init CIFAR-10 features; all 10,000 test targets.
step esvm 240 python3 -m benchmarks.benchmark_esvm --data=$DATA \
  $(size "--num_targets_jax=5000 --num_targets_sklearn=20 --num_targets_dual=2" \
         "--mode=compare --encoder_width=0.125 --num_targets_jax=40 --num_targets_sklearn=2 \
          --num_targets_dual=1 --repeats=1") \
  --cache=workdir_gpu_check/esvm_features.npz --out="$RES/esvm.json"
rm -f workdir_gpu_check/esvm_features.npz
# Issue 5: which formulation wins, then s/model for 32 full-width ResNet-9s (2 epochs).
step train 240 python3 -m benchmarks.benchmark_train --mode=gpu --formulations=vmap,map \
  --data=$DATA \
  $(size "--num_models=32 --epochs=2" \
         "--num_models=2 --epochs=1 --width=0.125 --train_examples=512 --batch_size=128") \
  --out="$RES/train.json"
echo "== steps (rc 0: ran to the end; 124: stopped at its time limit)"
cat "$SUMMARY"
pack && echo "all tables and JSON: $OUT/gpu_check.tar.gz"
