#!/usr/bin/env bash
# The GPU check in one go: a virtualenv with onnxruntime-gpu installed the way the README and
# the Dockerfile do it, then benchmarks/gpu.py (CUDA and TensorRT: models check, model stage
# against ONNX Runtime's own time, TensorRT engines cached between starts).
#
#   bash benchmarks/gpu.sh [--wheels DIR] [gpu.py options...]
#
# --wheels DIR installs from a folder of wheels only (a machine without a package index).
# Environment: VENV (default .venv-gpu), ORT_GPU_SPEC (default as in the Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
ORT_GPU_SPEC=${ORT_GPU_SPEC:-"onnxruntime-gpu>=1.20,<1.23"}
PIP_FROM=()
if [[ "${1:-}" == "--wheels" ]]; then
    PIP_FROM=(--no-index --find-links "$2")
    shift 2
fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q "${PIP_FROM[@]}")
# onnxruntime and onnxruntime-gpu install the same module: install both, remove both, then
# put the GPU build back alone (README, "On a GPU without Docker").
"${PIP[@]}" -e ".[gpu]" "$ORT_GPU_SPEC"
version=$("$VENV/bin/pip" show onnxruntime-gpu | sed -n 's/^Version: //p')
"$VENV/bin/pip" uninstall -q -y onnxruntime onnxruntime-gpu
"${PIP[@]}" --no-deps "onnxruntime-gpu==$version"
# onnxruntime-gpu finds CUDA and cuDNN from the NVIDIA wheels when they are installed
# (its [cuda,cudnn] extras); preload them if present, else the system's libraries are used.
"$VENV/bin/python" - <<'EOF'
import onnxruntime as ort
try:
    ort.preload_dlls()
except Exception as exc:  # older builds have no preload_dlls; the system's CUDA is used
    print("preload_dlls:", exc)
print("onnxruntime", ort.__version__, ort.get_available_providers(), ort.get_device())
EOF
exec "$VENV/bin/python" benchmarks/gpu.py "$@"
