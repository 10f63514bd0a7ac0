#!/usr/bin/env bash
# The main job, from nothing: set up, then prune the bundled SmolLM2-135M-Instruct to 50% with Wanda,
# print perplexity before and after (40 windows x 2048 tokens of WikiText-2 test), write the checkpoint
# and the report to out/smollm2-wanda50. About 10 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data="${SHARED_DATA:-../shared/data}"
.venv/bin/prunekit prune --method wanda --sparsity 0.5 \
  --calib "$data/wikitext2_valid.txt" --nsamples 32 --seqlen 512 --seed 0 \
  --ppl "$data/wikitext2_test.txt" --ppl-windows 40 \
  --out out/smollm2-wanda50 --overwrite
