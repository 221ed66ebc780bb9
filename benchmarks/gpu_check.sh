#!/usr/bin/env bash
# The prepared accelerator check: one run of every benchmark at GPU sizes (about 5-8 minutes on
# one H200), tables in $OUT/*.log and JSON in $OUT/*.json. The CIFAR-10 archive is the one of
# jaxattr/config.py's CIFAR10_JPEG; ../shared does not travel to a lent accelerator machine, so
# a copy at data/cifar10-jpeg.tar.gz in the checkout (git-ignored) stands in for it there. The
# accelerator image lacks ml-collections: wheels in .whl/ (pip download -d .whl ml-collections)
# are installed first when present.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DATA=$(sed -n 's/^CIFAR10_JPEG = "\(.*\)"/\1/p' jaxattr/config.py)
[ -e "${DATA#folder:}" ] || DATA=folder:data/cifar10-jpeg.tar.gz
[ -d .whl ] && python3 -m pip install -q --no-index --find-links .whl ml-collections
# traker (issue 19's reference): pip download --no-deps -d .whl traker==0.3.2
[ -d .whl ] && python3 -m pip install -q --no-deps --no-index --find-links .whl traker
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.log"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.log"
# Issue 3: ResNet-18/32px and ResNet-50/224px inference, jaxattr vs PyTorch, float32 and bf16.
for dtype in float32 bfloat16; do
  timeout 150 python3 -m benchmarks.benchmark_features --dtype=$dtype --batch_size=1024 \
    --imagenet_batch_size=256 --xla_flags= --out="$OUT/features_$dtype.json" \
    2>&1 | tee "$OUT/features_$dtype.log" | tail -n 12
done
# Issue 4: ESVM vs sklearn on random-init CIFAR-10 features; all 10,000 test targets.
timeout 240 python3 -m benchmarks.benchmark_esvm --data=$DATA --num_targets_jax=5000 \
  --num_targets_sklearn=20 --num_targets_dual=2 --cache="$OUT/esvm_features.npz" \
  --out="$OUT/esvm.json" 2>&1 | tee "$OUT/esvm.log" | tail -n 20
# Issue 15: the ESVM on the harder feature families (synthetic: nothing to download or extract),
# targets/s per family beside sklearn's primal loop on the host.
for fam in "hard_synthetic" "imagenet_shaped --family_norm=3" "imagenet_shaped --family_norm=30" \
           "imagenet_shaped --family_norm=1000"; do
  name=$(echo "$fam" | tr -c 'a-z0-9\n' '_')
  timeout 120 python3 -m benchmarks.benchmark_esvm --mode=compare --family=$fam \
    --num_targets_jax=2000 --family_targets=2000 --num_targets_sklearn=10 \
    --num_targets_dual=1 --out="$OUT/esvm_$name.json" 2>&1 | tee "$OUT/esvm_$name.log" | tail -n 12
done
# Issues 15-16: 100 ImageNet-shaped classes x 50 targets, one topk call per class (the full
# 1,000-class sweep: --classes=1000); the streaming loader beside torchvision's DataLoader.
timeout 150 python3 -m benchmarks.esvm_imagenet_sweep --classes=100 --sklearn_every=25 \
  --out="$OUT/esvm_imagenet_sweep.json" 2>&1 | tee "$OUT/esvm_imagenet_sweep.log" | tail -n 8
timeout 150 python3 -m benchmarks.benchmark_loader --classes=4 --per_class=48 --repeats=2 \
  --workers=1,4 --out="$OUT/loader.json" 2>&1 | tee "$OUT/loader.log" | tail -n 14
# Issue 5: which formulation wins, then s/model for 32 full-width ResNet-9s (2 epochs).
timeout 240 python3 -m benchmarks.benchmark_train --mode=gpu --num_models=32 --epochs=2 \
  --formulations=vmap,map --data=$DATA --out="$OUT/train.json" \
  2>&1 | tee "$OUT/train.log" | tail -n 20
# Issue 18: ResNet-18s of the ffcv_rn18_16 recipe on 64 px ImageNet-shaped synthetic data (1,000
# learnable classes, 256,000 images, 2 epochs, 4 models at once, batch 1024): images/s per model,
# MFU, top-1 on held-out images. A full-size run: --train_examples=1281167 --epochs=16.
timeout 300 python3 -m benchmarks.benchmark_imagenet_train --mode=gpu --classes=1000 \
  --train_examples=256000 --epochs=2 --num_models=4 --batch_size=1024 \
  --out="$OUT/imagenet_train.json" 2>&1 | tee "$OUT/imagenet_train.log" | tail -n 8
# Issue 19: TRAK featurisation at full width beside traker (BasicProjector: its CudaProjector
# needs the fast_jl extension); then the CIFAR-10 LDS slice: TRAK-5 over 16 subsets and 1,000
# targets with the full 24-epoch recipe (the paper-scale run: configs/cifar10.py, S = 100, 2,000
# targets, README "TRAK and LDS"). The workdir stays off $OUT (features: 400 MB per model).
timeout 150 python3 -m benchmarks.benchmark_trak --width=1 --examples=4096 --chunk=256 \
  --batch=256 --repeats=2 --out="$OUT/trak.json" 2>&1 | tee "$OUT/trak.log" | tail -n 8
timeout 420 python3 launch/lds.py --config configs/cifar10.py:lds_gpu_slice \
  --workdir /tmp/lds_gpu_slice --config.data.source=$DATA 2>&1 | tail -n 20 > "$OUT/lds_slice.log"
cp /tmp/lds_gpu_slice/lds/summary.json "$OUT/lds_slice.json" 2>/dev/null
tail -n 8 "$OUT/lds_slice.log"
