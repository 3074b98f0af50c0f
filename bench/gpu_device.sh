#!/usr/bin/env bash
# The one script to run on a lent GPU machine (issue 11): every GPU variant and the plain baseline, one table.
#
#   1. here, with the registry:  bash bench/gpu_device.sh prepare     (downloads nvImageCodec and nvJPEG to .whl/)
#   2. on the device, once:      bash bench/gpu_device.sh run         (carry .whl; results land in $OUT)
#   0. before that, here:        bash bench/gpu_device.sh dry         (every step on the CPU, small, with what the
#                                device lacks made unimportable by bench/devsim; exits non-zero if a step fails)
#
# The device machine has Python 3.12, torch 2.11 with CUDA 13, no registry and no Prefect, polars or deltalake;
# at most 64 MiB travels with a call (deltalake alone is 52 MB, so the mlcls rows tag Parquet parts without the
# table there: bench/throughput.py's tag_parts_only). Only nvImageCodec's wheel (~25 MB) and libnvjpeg's (~4 MB,
# CUDA 13.0 as torch's; without it nvImageCodec registers no GPU JPEG decoder and decodes on the CPU) are carried.
# Each step has its own timeout, so one slow step leaves the others' rows; the whole run is sized for about 8 minutes.
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
[[ ! -f $RESULTS ]] || mv "$RESULTS" "$OUT/RESULTS-gpu.previous.md"  # a rerun's failed rows are its own
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/run.log"; }
failed=0
step() {  # step NAME TIMEOUT COMMAND...: run, log its exit status, remember a failure
    local name=$1 limit=$2; shift 2
    log "$name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    log "$name rc=$rc"
    [[ $rc == 0 ]] || failed=1
}

if [[ $mode == dry ]]; then  # the device's steps on this CPU, small: catches what would fail there
    export PYTHONPATH=$PWD/bench/devsim:$PWD
    device=cpu arch=mobilenet_v3_large batch=32 workers=2 iters=2 n_imagenet=96 n_mixed=64 python=${PYTHON:-python3}
else
    device=cuda arch=resnet50 batch=256 workers=$(($(nproc) - 1)) iters=20 n_imagenet=3000 n_mixed=2000 python=python3
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; $python -V;
  $python -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1
if [[ $mode == run ]] && ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    $python -m pip install --no-deps --no-index "$WHEEL_DIR"/*.whl > "$OUT/pip.log" 2>&1 || log "wheel install failed"
fi
$python -c "from nvidia import nvimgcodec; print('nvimgcodec', nvimgcodec.__version__)" >> "$OUT/machine.txt" 2>&1 \
    || log "no nvImageCodec: the GPU rows use torchvision's nvJPEG fallback"
$python -c "import torch; from nvidia import nvimgcodec; from mlcls.images.gpu import decodes_jpeg_on_gpu as g
print('nvimgcodec decodes on the GPU:', g(nvimgcodec, torch.device('cuda')))" >> "$OUT/machine.txt" 2>&1
# the hardware JPEG engine alone: under gVisor, or without the container's video capability, nvImageCodec
# falls back to its CUDA decoders and the line above still says True
$python -c "from nvidia import nvimgcodec as n; from mlcls.images.gpu import probe_jpeg
d = n.Decoder(device_id=0, backends=[n.Backend(n.BackendKind.HW_GPU_ONLY)])
print('hardware JPEG engine decodes:', d.decode([probe_jpeg(256)])[0] is not None)" >> "$OUT/machine.txt" 2>&1
df -h /dev/shm >> "$OUT/machine.txt" 2>&1  # the DataLoader variant moves batches through it

common=(--arch "$arch" --batch-size "$batch" --device "$device" --workers "$workers" --iters "$iters"
        --results "$RESULTS")
variants=(gpu-decode cpu-decode hybrid-0.5 auto auto-dataloader)
step tests 120 $python -m pytest -q -p no:cacheprovider -m gpu tests/tag/test_engine.py tests/images/test_gpu.py
step imagenet 240 $python bench/throughput.py "${common[@]}" --images "$n_imagenet" --corpus-kind imagenet \
    --variants "${variants[@]}"
step mixed 150 $python bench/throughput.py "${common[@]}" --images "$n_mixed" --skip model \
    --variants gpu-decode cpu-decode auto
step decode-ab 150 $python bench/throughput.py "${common[@]}" --images "$n_mixed" --corpus-kind imagenet --decode-ab 1
step simulated 60 $python bench/throughput.py "${common[@]}" --images "$n_mixed" --corpus-kind imagenet \
    --simulate-device 20
step transport 90 $python bench/transport.py --workers "$workers" --images "$n_imagenet" --passes 3  # its .log
if grep -l "| failed: " "$RESULTS" 2>/dev/null; then log "a row failed: see $RESULTS"; failed=1; fi
log "done"
[[ $mode != dry ]] || exit $failed
