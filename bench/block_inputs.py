"""The dense calibration inputs of one SmolLM2-135M decoder block (32 x 512 windows of
``wikitext2_valid.txt``, seed 0), for the per-block profiles ``profile_*_block.py``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import prunekit
from prunekit.calibration.capture import BlockCall, capture_block_inputs
from prunekit.io.loading import prepare_bundled_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Each SmolLM2 block layer and the layer whose input it shares (q/k/v, gate/up): four distinct inputs.
SHARED_INPUT = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
                "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}  # fmt: skip


def dense_block_inputs(block_index: int) -> tuple[nn.Module, list[torch.Tensor], list[BlockCall]]:
    """Block ``block_index`` of the bundled model, its inputs for every window (the dense model's
    activations), and the extra arguments of each window's call."""
    loaded = prunekit.load_model(str(prepare_bundled_model()))
    calib = prunekit.calibration_windows(loaded.tokenizer, DATA / "wikitext2_valid.txt", 32, 512, seed=0)
    blocks = loaded.model.model.layers
    captured = capture_block_inputs(loaded.model, blocks, calib, 1, torch.device("cpu"))
    hidden = captured.hidden
    with torch.no_grad():
        for index in range(block_index):
            hidden = [blocks[index](x, *c.args, **c.kwargs) for x, c in zip(hidden, captured.calls[index], strict=True)]
    return blocks[block_index], hidden, captured.calls[block_index]
