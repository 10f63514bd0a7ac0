"""Comparison peer: one-shot Wanda / SparseGPT pruning with llm-compressor.

This script is deliberately independent of prunekit (it does not import it). It
prunes a Hugging Face causal LM with llm-compressor's ``oneshot`` entry point so
the benchmark can compare prunekit against it on the *same* calibration windows.

What it does:

* loads the model in float32 on CPU (outside the timed region);
* reads ``--calib-ids``, a safetensors file with one int64 tensor ``input_ids`` of
  shape ``(nsamples, seqlen)``, and wraps it as an already-tokenized
  ``datasets.Dataset`` (``input_ids`` + all-ones ``attention_mask``), so
  llm-compressor neither re-tokenizes, truncates, pads nor shuffles it;
* runs ``WandaPruningModifier`` or ``SparseGPTModifier`` at 50% unstructured
  sparsity or 2:4, on every ``nn.Linear`` inside the decoder layers (``lm_head``
  ignored), with the sequential (layer-by-layer) calibration pipeline;
* times only the ``oneshot`` call, records peak RSS, measures the resulting
  sparsity of the targeted weights, saves a dense (uncompressed) checkpoint plus
  tokenizer that plain ``transformers`` can load, and writes a JSON result.

Run it with the llm-compressor virtual environment, e.g.::

    /work/lcvenv/bin/python bench/peer_llmcompressor.py \\
        --model /tmp/smol_f32 --calib-ids calib.safetensors \\
        --method wanda --sparsity 0.5 \\
        --out /tmp/smol_lc_wanda50 --result /tmp/smol_lc_wanda50.json

``--pattern 2:4`` replaces ``--sparsity 0.5`` for semi-structured pruning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import sys
import time
from importlib.metadata import version as pkg_version
from pathlib import Path

log = logging.getLogger("peer_llmcompressor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prune a causal LM with llm-compressor (Wanda/SparseGPT) as a benchmark peer."
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory (dense)")
    p.add_argument(
        "--calib-ids",
        required=True,
        help="safetensors file with an int64 tensor 'input_ids' of shape (nsamples, seqlen)",
    )
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="unstructured sparsity, e.g. 0.5")
    target.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4")
    p.add_argument("--out", required=True, help="directory for the pruned dense checkpoint")
    p.add_argument("--result", required=True, help="path of the JSON result file")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="calibration batch size passed to oneshot (default 1)",
    )
    args = p.parse_args(argv)
    if args.sparsity is not None and not 0.0 < args.sparsity < 1.0:
        p.error("--sparsity must be in (0, 1)")
    if args.pattern is not None:
        m = re.fullmatch(r"(\d+):(\d+)", args.pattern)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            p.error("--pattern must look like N:M with 0 < N < M, e.g. 2:4")
    return args


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def load_calibration(path: str):
    """Turn the calibration windows into an already-tokenized ``datasets.Dataset``."""
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "input_ids" not in tensors:
        raise SystemExit(f"{path}: no tensor named 'input_ids' (found {sorted(tensors)})")
    ids = tensors["input_ids"]
    if ids.ndim != 2:
        raise SystemExit(f"{path}: input_ids must be 2-D (nsamples, seqlen), got {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    nsamples, seqlen = ids.shape
    ds = Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
        }
    )
    return ds, nsamples, seqlen


def decoder_layer_classes(model) -> list[str]:
    """Class names of the decoder blocks (the HF ``_no_split_modules``)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise SystemExit("model does not declare _no_split_modules; cannot find decoder layers")
    return names


def build_modifier(method: str, sparsity: float | None, pattern: str | None, layer_classes: list[str]):
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier

    if pattern is not None:
        n, m = (int(x) for x in pattern.split(":"))
        sparsity, mask_structure = n / m, pattern
    else:
        mask_structure = "0:0"  # llm-compressor's spelling of "unstructured"

    # `targets` names the *containers* whose Linear/Conv children get pruned. With
    # the decoder block class every q/k/v/o/gate/up/down projection is pruned and
    # nothing outside the blocks is; lm_head is also listed in `ignore` for safety
    # (llm-compressor's default targets=["Linear"] would prune lm_head, and with tied
    # embeddings that would also sparsify the input embedding table).
    return Modifier(
        sparsity=sparsity,
        mask_structure=mask_structure,
        targets=layer_classes,
        ignore=["re:.*lm_head"],
    )


def targeted_linears(model, layer_classes: list[str]):
    """(name, module) for every nn.Linear inside a decoder block: what the modifier prunes."""
    import torch

    for name, block in model.named_modules():
        if type(block).__name__ in layer_classes:
            for sub, mod in block.named_modules():
                if isinstance(mod, torch.nn.Linear) and "lm_head" not in sub:
                    yield f"{name}.{sub}", mod


def measure_sparsity(model, layer_classes: list[str], pattern: str | None) -> float:
    """Fraction of zeros over targeted weights; checks the N:M constraint when given."""
    import torch

    zeros = total = 0
    n_layers = 0
    for name, mod in targeted_linears(model, layer_classes):
        w = mod.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
        n_layers += 1
        if pattern is not None:
            n, m = (int(x) for x in pattern.split(":"))
            groups = w.reshape(w.shape[0], -1, m)  # groups of m along the input dim
            per_group = (groups == 0).sum(dim=-1)
            if not bool(torch.all(per_group >= n)):
                log.warning("%s: %d groups with fewer than %d zeros", name, int((per_group < n).sum()), n)
    if total == 0:
        raise SystemExit("no targeted Linear layers found")
    log.info("measured sparsity over %d targeted Linear layers: %.6f", n_layers, zeros / total)
    return zeros / total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pattern_label = args.pattern if args.pattern is not None else f"{round(args.sparsity * 100):g}%"

    dataset, nsamples, seqlen = load_calibration(args.calib_ids)
    log.info("calibration: %d windows x %d tokens from %s", nsamples, seqlen, args.calib_ids)

    log.info("loading %s (float32, cpu)", args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map=None)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layer_classes = decoder_layer_classes(model)
    log.info("decoder layer classes (sequential + pruning targets): %s", layer_classes)

    modifier = build_modifier(args.method, args.sparsity, args.pattern, layer_classes)
    log.info("recipe: %r", modifier)

    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=modifier,
        dataset=dataset,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=args.batch_size,
        pipeline="sequential",
        sequential_targets=layer_classes,
        output_dir=None,  # we save ourselves, outside the timed region
    )
    prune_seconds = time.perf_counter() - t0
    rss = peak_rss_gb()
    log.info("oneshot took %.2f s; peak RSS %.3f GB", prune_seconds, rss)

    sparsity = measure_sparsity(model, layer_classes, args.pattern)

    # Plain transformers save (bypasses llm-compressor's save_pretrained wrapper, which
    # would add a compressed-tensors `quantization_config` and a recipe.yaml): a dense
    # float32 safetensors checkpoint that AutoModelForCausalLM loads without extras.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    type(model).save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    log.info("saved pruned model and tokenizer to %s", out)

    result = {
        "tool": "llm-compressor",
        "version": pkg_version("llmcompressor"),
        "torch": torch.__version__,
        "transformers": pkg_version("transformers"),
        "method": args.method,
        "pattern": pattern_label,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "prune_seconds": prune_seconds,
        "peak_rss_gb": rss,
        "out": str(out.resolve()),
        "measured_sparsity_of_targets": sparsity,
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"llm-compressor {args.method} {pattern_label}: {nsamples}x{seqlen} "
        f"prune {prune_seconds:.1f}s, peak RSS {rss:.2f} GB, "
        f"sparsity {sparsity:.4f} -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
