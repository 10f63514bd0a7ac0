"""Export a (pruned) model to ONNX and check it with onnxruntime (optional extra ``prunekit[onnx]``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit.errors import OutputError


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write ``model`` (in eval mode) to the ONNX file ``path`` with ``torch.onnx.export``; with ``check``,
    run it in onnxruntime on the example inputs and require the same outputs as PyTorch within ``atol``.
    The file appears only when complete (written beside it, then renamed)."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists: choose another path or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            torch.onnx.export(model, tuple(example_inputs), str(tmp), external_data=False)
            expected = model(*example_inputs)
        if check:
            got = run_onnx(tmp, example_inputs)
            want = [t.detach().cpu().numpy() for t in (expected if isinstance(expected, (tuple, list)) else [expected])]
            for a, b in zip(got, want, strict=True):
                if a.shape != b.shape or not np.allclose(a, b, atol=atol, rtol=1e-3):
                    raise OutputError(f"the ONNX export of {type(model).__name__} does not reproduce PyTorch's outputs")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return out


def run_onnx(path: str | os.PathLike[str], inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Outputs of the ONNX model at ``path`` on ``inputs`` (CPU execution provider)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {meta.name: t.detach().cpu().numpy() for meta, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)
