# mlcls runtime image: a Prefect worker that tags shards on a GPU (or the CPU).
#
#   docker build -t mlcls .
#   docker run --gpus all -e PREFECT_API_URL=http://prefect:4200/api mlcls
#
# PyPI's Linux torch wheels bundle CUDA (the nvidia-* packages), so a slim
# Python base is enough: the host's driver comes in through the NVIDIA
# container toolkit (`--gpus`, or `nvidia.com/gpu` on Kubernetes).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    # heartbeats let the server mark a run Crashed when this container dies (flows/setup.py)
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 \
    # the library's log records (loggers under `mlcls`) in the run logs (flows/logs.py)
    PREFECT_LOGGING_EXTRA_LOGGERS=mlcls

WORKDIR /opt/mlcls

# A C/C++ compiler: torch.compile builds Triton's launcher (GPU) and Inductor's kernels (CPU) with it, and
# `--compile auto` runs eager without one (mlcls/tag/compiling.py), giving up the compiled model's speed.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer: it is most of the image and changes least.
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY mlcls ./mlcls
COPY flows ./flows
COPY deployments ./deployments
# [gpu]: nvImageCodec with libnvjpeg for the GPU's JPEG engine (inert on a CPU-only host)
RUN pip install ".[gpu]" && useradd --create-home --uid 1000 mlcls
USER mlcls

# One GPU worker (one per GPU): one slot run at a time, each tagging shard after shard in one warm
# process (a concurrency limit guards the device as well). README: "Running at scale".
CMD ["prefect", "worker", "start", "--pool", "mlcls-gpu", "--limit", "1"]
