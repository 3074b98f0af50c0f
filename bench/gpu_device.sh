#!/usr/bin/env bash
# The one script to run on a lent GPU machine (issue 11): every GPU variant and the plain baseline, one table.
#
#   1. here, with the registry:  bash bench/gpu_device.sh prepare     (downloads nvImageCodec and nvJPEG to .whl/)
#   2. on the device, once:      bash bench/gpu_device.sh run         (carry .whl; results land in $OUT)
#
# The device machine has Python 3.12, torch 2.11 with CUDA 13, no registry and no Prefect/polars; at most
# 64 MiB travels with a call, so only nvImageCodec's wheel (~25 MB) and libnvjpeg's (~4 MB, CUDA 13.0 as torch's;
# without it nvImageCodec registers no GPU JPEG decoder and decodes on the CPU) are carried. Each step has its own
# timeout, so one slow step leaves the others' rows; the whole run is sized for about 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
WHEEL_DIR=.whl

if [[ $mode == prepare ]]; then
    mkdir -p "$WHEEL_DIR"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$WHEEL_DIR" "${NVIMGCODEC:-nvidia-nvimgcodec-cu13}" "${NVJPEG:-nvidia-nvjpeg==13.0.*}"
    ls -l "$WHEEL_DIR"
    exit 0
fi

OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export MLCLS_BENCH_DIR=${MLCLS_BENCH_DIR:-/tmp/mlcls-bench} MLCLS_CACHE=/tmp/mlcls-cache PYTHONPATH=$PWD
RESULTS=$OUT/RESULTS-gpu.md
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/run.log"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -V;
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1
if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    python3 -m pip install --no-deps --no-index "$WHEEL_DIR"/*.whl > "$OUT/pip.log" 2>&1 || log "wheel install failed"
fi
python3 -c "from nvidia import nvimgcodec; print('nvimgcodec', nvimgcodec.__version__)" >> "$OUT/machine.txt" 2>&1 \
    || log "no nvImageCodec: the GPU rows use torchvision's nvJPEG fallback"
python3 -c "import torch; from nvidia import nvimgcodec; from mlcls.images.gpu import decodes_jpeg_on_gpu as g
print('nvimgcodec decodes on the GPU:', g(nvimgcodec, torch.device('cuda')))" >> "$OUT/machine.txt" 2>&1

cores=$(nproc)
common=(--arch resnet50 --batch-size 256 --device cuda --workers "$((cores - 1))" --iters 20 --results "$RESULTS")
variants=(gpu-decode cpu-decode hybrid-0.5 auto auto-dataloader)
log "GPU tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/tag/test_engine.py tests/images/test_gpu.py \
    > "$OUT/tests.log" 2>&1; log "tests rc=$?"
log "ImageNet-like corpus"
timeout 240 python3 bench/throughput.py "${common[@]}" --images 3000 --corpus-kind imagenet \
    --variants "${variants[@]}" > "$OUT/imagenet.log" 2>&1; log "imagenet rc=$?"
log "mixed corpus"
timeout 150 python3 bench/throughput.py "${common[@]}" --images 2000 --skip model \
    --variants gpu-decode cpu-decode auto > "$OUT/mixed.log" 2>&1; log "mixed rc=$?"
log "decode pool A/B (mlcls threads / processes + ring / DataLoader)"
timeout 150 python3 bench/throughput.py "${common[@]}" --images 2000 --corpus-kind imagenet --decode-ab 1 \
    > "$OUT/decode-ab.log" 2>&1; log "decode-ab rc=$?"
log "stand-in device (overlap)"
timeout 60 python3 bench/throughput.py "${common[@]}" --images 2000 --corpus-kind imagenet --simulate-device 20 \
    > "$OUT/simulated.log" 2>&1; log "simulated rc=$?"
log "done"
