# The recsqueeze image: Prefect flow-run jobs (the kubernetes work pool's job template) and the
# Ray head and workers (infra/k8s/raycluster.yaml) all run it, so driver and workers share one
# Python, one Ray and one recsqueeze.
#
#   CPU:  docker build -t recsqueeze:cpu .
#   CUDA: docker build -t recsqueeze:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The install is infra/install.sh, the same script `make .venv` runs (without the dev extra and
# not editable). CUDA wheels of torch carry their CUDA runtime; the GPU nodes need the NVIDIA
# driver and device plugin only.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim-bookworm

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /opt/recsqueeze
COPY pyproject.toml README.md ./
COPY infra/ infra/
COPY tasks/ tasks/
COPY flows/ flows/
COPY cluster/ cluster/
RUN TORCH="$TORCH" TORCH_INDEX="$TORCH_INDEX" infra/install.sh /opt/venv \
    && useradd --create-home --uid 1000 recsqueeze
USER 1000
CMD ["recsqueeze", "--help"]
