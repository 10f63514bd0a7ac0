#!/usr/bin/env bash
# Create the llm-compressor peer's own virtual environment (never part of prunekit's dependencies).
# llm-compressor 0.14 pins torch <= 2.14.0; torch 2.13.0 (CPU build) installs from this machine's disk.
set -euo pipefail
venv="${1:-.venv-peer}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "llmcompressor==0.14.0.1" "torch==2.13.0"
echo "peer venv ready: $venv/bin/python"
