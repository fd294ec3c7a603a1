#!/usr/bin/env bash
# Fresh-machine setup: a venv in .venv with the pinned CPU torch first (an unpinned torch would pull
# a multi-GB CUDA build), then d2export with llama.cpp (built from source, ~4 min) and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[llamacpp,smollm2,test]"
python -c "import llama_cpp, d2quant, converters, runtime_tests" >/dev/null
