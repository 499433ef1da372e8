# pacs-ai-node on an NVIDIA GPU: ONNX Runtime with CUDA 12 and cuDNN 9.
#
#   docker build -t pacs-ai-node .
#   docker run --gpus all -p 11112:11112 -v ainode-data:/var/lib/ainode pacs-ai-node
#
# Own configuration: mount it over /etc/ainode/node.toml (keep data_dir and models_dir as
# below, or mount models elsewhere and point models_dir there).

# onnxruntime-gpu 1.19 and later on PyPI are built for CUDA 12.x + cuDNN 9.x, and run on any
# CUDA 12 minor version (NVIDIA's minor version compatibility).
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

ARG ORT_GPU_SPEC="onnxruntime-gpu>=1.20,<1.23"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/ainode/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates dcmtk \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/ainode/venv \
 && pip install --upgrade pip

WORKDIR /opt/ainode/src
COPY pyproject.toml README.md ./
COPY node ./node

# The package depends on the CPU "onnxruntime"; the [gpu] extra adds "onnxruntime-gpu", the
# [postgresql] extra the driver for a shared queue (several nodes, deploy/cluster).
# Both install the same "onnxruntime" module, so removing one breaks the other's files:
# install both, remove both, then put the GPU build back alone.
RUN pip install ".[gpu,postgresql]" "$ORT_GPU_SPEC" \
 && ORT_GPU_VERSION=$(pip show onnxruntime-gpu | sed -n 's/^Version: //p') \
 && pip uninstall -y onnxruntime onnxruntime-gpu \
 && pip install --no-deps "onnxruntime-gpu==$ORT_GPU_VERSION" \
 && python3 -c "import onnxruntime as ort; p = ort.get_available_providers(); print(ort.__version__, p); assert 'CUDAExecutionProvider' in p" \
 && ainode --help >/dev/null

# Models: the ONNX files are built here, not committed.
COPY models /opt/ainode/models
RUN python3 /opt/ainode/models/ct-tissue/build.py \
 && python3 /opt/ainode/models/chest-xray-demo/build.py \
 && test -s /opt/ainode/models/ct-tissue/model.onnx \
 && test -s /opt/ainode/models/chest-xray-demo/model.onnx

# Configuration: the repository's default, with the container's absolute paths.
COPY config/node.toml /etc/ainode/node.toml
RUN sed -i -E \
        -e 's|^data_dir[[:space:]]*=.*|data_dir = "/var/lib/ainode"|' \
        -e 's|^models_dir[[:space:]]*=.*|models_dir = "/opt/ainode/models"|' \
        /etc/ainode/node.toml \
 && grep -q '^data_dir = "/var/lib/ainode"' /etc/ainode/node.toml \
 && grep -q '^models_dir = "/opt/ainode/models"' /etc/ainode/node.toml

RUN useradd --system --home-dir /var/lib/ainode --shell /usr/sbin/nologin ainode \
 && mkdir -p /var/lib/ainode \
 && chown ainode:ainode /var/lib/ainode
VOLUME /var/lib/ainode

USER ainode
WORKDIR /var/lib/ainode
EXPOSE 11112
# The HTTP face (dashboard, API, /metrics) listens on 127.0.0.1:8080 inside the container; to
# reach it from outside set http.host = "0.0.0.0" with an http.tokens_file, and publish 8080.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["ainode", "echo", "AINODE@127.0.0.1:11112"]
CMD ["ainode", "serve", "--config", "/etc/ainode/node.toml"]
