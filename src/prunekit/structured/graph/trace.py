"""Trace any ``nn.Module`` into an ATen graph whose inputs are its parameters and buffers.

The module is run once under :func:`torch.fx.experimental.proxy_tensor.make_fx` with fake tensors (no
real computation, any Python control flow executed as in a normal forward), through
:func:`torch.func.functional_call` so that every parameter and buffer is a graph input carrying its
name, and :func:`torch.func.functionalize` so that in-place operations (``ReLU(inplace=True)``,
``x += y``) appear as ordinary ones. When fake tensors are not enough (data-dependent code such as
``.item()``), the trace is retried with real tensors.

A module that cannot be traced either way raises :class:`~prunekit.core.errors.UntraceableModuleError`
naming the innermost submodule that was running when the trace failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx

from prunekit.core.errors import UntraceableModuleError

log = logging.getLogger(__name__)


@dataclass
class TracedModel:
    """An ATen graph of one forward pass. ``state_names[i]`` is the parameter or buffer behind the
    ``i``-th placeholder; the placeholders after them are the example inputs' tensors, in order."""

    graph: torch.fx.Graph
    state_names: list[str]
    placeholders: list[torch.fx.Node]
    mode: str

    @property
    def input_placeholders(self) -> list[torch.fx.Node]:
        return self.placeholders[len(self.state_names) :]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters then buffers by name; a tied parameter appears once (under its first name)."""
    state: dict[str, torch.Tensor] = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        state.setdefault(name, buffer)
    return state


class _ModuleStack:
    """Forward hooks that remember which submodule is running: to name the culprit of a failed trace, and to
    tag each traced node with the innermost module that produced it (``node.meta["prunekit_module"]``)."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.spans: list[tuple[str, int, int]] = []
        self._open: list[tuple[str, int]] = []
        #: Nodes traced so far (how far a failed trace got).
        self.progress = 0
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave()))

    def _graph_length(self) -> int:
        mode = get_proxy_mode()
        length = len(mode.tracer.graph.nodes) if mode is not None else 0
        self.progress = max(self.progress, length)
        return length

    def _enter(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(name)
            self._open.append((name, self._graph_length()))

        return hook

    def _leave(self) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.stack:
                self.stack.pop()
            if self._open:
                name, start = self._open.pop()
                self.spans.append((name, start, self._graph_length()))

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def tag(self, graph: torch.fx.Graph) -> None:
        """Record in each node the innermost module whose forward created it (outer spans first)."""
        nodes = list(graph.nodes)
        for position, node in enumerate(nodes):
            node.meta["prunekit_position"] = position
        for name, start, end in sorted(self.spans, key=lambda span: (span[1], -span[2])):
            for node in nodes[start:end]:
                node.meta["prunekit_module"] = name

    def culprit_name(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def culprit(self, model: nn.Module) -> str:
        if not self.stack:
            return "the model's inputs or outputs (outside every submodule; outputs must be tensors, tuples, lists or dicts)"
        name = self.stack[-1]
        module = model.get_submodule(name) if name else model
        return f"{name or '<root>'} ({type(module).__name__})"


def trace_model(
    model: nn.Module,
    example_inputs: Sequence[Any],
    example_kwargs: dict[str, Any] | None = None,
    tracing_mode: str | None = None,
) -> TracedModel:
    """Trace ``model(*example_inputs, **example_kwargs)`` in eval mode (the model's mode is restored), with
    fake tensors, then real ones if that fails (``tracing_mode`` forces one).

    Raises :class:`UntraceableModuleError` naming the submodule where tracing failed.
    """
    state = state_of(model)
    names = list(state)
    tensors = [state[n] for n in names]
    kwargs = dict(example_kwargs or {})
    args = tuple(example_inputs)

    def forward(state_tensors: list[torch.Tensor], inputs: tuple[Any, ...], named: dict[str, Any]) -> Any:
        return torch.func.functional_call(
            model, dict(zip(names, state_tensors, strict=False)), inputs, named, strict=False
        )

    was_training = model.training
    model.eval()
    errors: list[str] = []
    try:
        for mode in ("fake", "real") if tracing_mode is None else (tracing_mode,):
            hooks = _ModuleStack(model)
            try:
                with torch.no_grad():
                    # real tensors may be read (``.item()``, ``if mask.all()``): the trace takes that branch
                    gm = make_fx(
                        torch.func.functionalize(forward),
                        tracing_mode=mode,
                        _error_on_data_dependent_ops=mode == "fake",
                    )(tensors, args, kwargs)
            except Exception as error:
                errors.append(f"{mode} tensors: {type(error).__name__}: {error}".splitlines()[0][:400])
                culprit, culprit_name, progress = hooks.culprit(model), hooks.culprit_name(), hooks.progress
                log.debug("trace with %s tensors failed in %s: %s", mode, culprit, error)
                continue
            finally:
                hooks.close()
            hooks.tag(gm.graph)
            gm.graph.eliminate_dead_code()  # functionalisation replays views whose results nothing reads
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            return TracedModel(gm.graph, names, placeholders, mode)
    finally:
        model.train(was_training)
    error = UntraceableModuleError(
        f"cannot trace {type(model).__name__}: the forward pass failed in {culprit}. "
        + "; ".join(errors)
        + ". Pass example inputs the model accepts, or exclude that module (ignored_modules=[...]) after "
        "making it traceable (no data-dependent Python control flow on tensor values)."
    )
    error.module_name = culprit_name
    error.progress = progress
    raise error
