"""Export a (pruned) model to ONNX and check it with onnxruntime (optional extra ``prunekit[onnx]``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.core.errors import OutputError


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


class OnnxRuntimeModule(nn.Module):
    """An ONNX file run by onnxruntime's CPU execution provider, called like the PyTorch module it was
    exported from (tensors in, a tensor or a tuple of tensors out), so that the same measurement code
    (:func:`~prunekit.structured.report.compare_latency`) times the model as PyTorch runs it and as a
    deployment runtime does. onnxruntime applies its own graph optimisations (all levels: batch norms folded
    into convolutions, activations fused), and runs on ``threads`` intra-op threads (its default otherwise).
    ``options`` replaces those settings with the caller's ``onnxruntime.SessionOptions`` (for instance a
    process-wide thread pool, ``use_per_session_threads = False``, which keeps two sessions timed in turn from
    competing: each session's own threads keep spinning for a while after a run, on the cores the other needs).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None, options: Any = None) -> None:
        super().__init__()
        import onnxruntime

        if options is None:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [meta.name for meta in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path} takes {len(self.input_names)} inputs, got {len(inputs)}")
        feeds = {
            name: np.ascontiguousarray(t.detach().cpu().numpy())
            for name, t in zip(self.input_names, inputs, strict=True)
        }
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def run_onnx(path: str | os.PathLike[str], inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Outputs of the ONNX model at ``path`` on ``inputs`` (CPU execution provider)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {meta.name: t.detach().cpu().numpy() for meta, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)
