#!/usr/bin/env bash
# Installs what the demo and the tests need besides Rust: a Python virtual environment (.venv) with the
# pinned onnxruntime (its shared library is the ORT runtime quench loads) and onnx for reference checks.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt
.venv/bin/python -c "import onnx, onnxruntime, numpy; print('python tooling: onnx', onnx.__version__, '/ onnxruntime', onnxruntime.__version__)"
