"""Comparison peer: llm-compressor's REAP expert pruning (``REAPPruningModifier``) on a MoE checkpoint.

Independent of prunekit (it does not import it); run with llm-compressor's own venv::

    .venv-peer/bin/python bench/peer_llmcompressor_reap.py MODEL CALIB.safetensors REMOVE OUT

``CALIB.safetensors`` holds one int64 tensor ``input_ids`` ``(nsamples, seqlen)``: the same windows prunekit
calibrates on, passed as an already-tokenized dataset (no re-tokenising, truncation, padding or shuffling).
The modifier removes ``REMOVE`` of each layer's experts with the sequential (layer-by-layer) pipeline; the
experts are repacked (``repack_moe``, llm-compressor's step before saving: without it the checkpoint holds
linearized expert names that transformers does not load) and the model is saved with plain
``save_pretrained`` to ``OUT`` with ``OUT/retained.json`` (the experts kept per
layer, llm-compressor's own report) and ``OUT/peer.json`` (time, version).
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version as pkg_version
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    model_dir, calib_path, remove, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import repack_moe
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

    ids = load_file(calib_path)["input_ids"].to(torch.int64)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=None).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    modifier = REAPPruningModifier(sparsity=remove, report_path=str(out / "retained.json"))
    started = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=modifier,
        dataset=dataset,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",
        output_dir=None,
    )
    seconds = time.perf_counter() - started
    repack_moe(model)  # its documented step before save_pretrained: fused 3-D experts again, as transformers loads
    type(model).save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    (out / "peer.json").write_text(
        json.dumps(
            {"tool": "llm-compressor", "version": pkg_version("llmcompressor"), "remove": remove, "seconds": seconds}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
