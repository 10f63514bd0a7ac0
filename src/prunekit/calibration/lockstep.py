"""Run several calibration batches through one block *together*, meeting at every hooked layer.

Why: a layer must see the statistics of **all** calibration batches before it is pruned, yet the block's
outputs must be computed with the **pruned** weights. Reference designs (Wanda, SparseGPT, llm-compressor)
therefore run each block twice: a dense pass for statistics, then a pass for pruned outputs. Here each
batch runs in its own greenlet (a coroutine with its own stack, on the same OS thread); a forward pre-hook
on a target layer parks the batch until every batch has arrived at that layer, the layer is pruned once
with the pooled statistics, and all batches resume with the pruned weights. One pass per block, and later
layers of a block see the outputs of already-pruned earlier layers (the "true sequential" order of
the SparseGPT code, Frantar & Alistarh 2023, option ``--true-sequential``).

Greenlets rather than threads: only one batch computes at a time (no oversubscription of the intra-op
thread pool), results are deterministic (statistics are pooled in batch order), and all allocations stay
in one malloc arena (threads would each grow their own and double the peak RSS). Layers that a batch
skips (data-dependent routing) do not deadlock: when every batch is parked or done, the earliest layer
(in the given order) that any batch waits at is finalized with the batches that reached it.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import greenlet
import torch
from torch import nn

T = TypeVar("T")


class LockstepRunner(Generic[T]):
    """Run ``len(jobs)`` forwards through modules hooked at ``layers``; see the module docstring.

    Args:
        layers: the modules to meet at, in forward order.
        collect: ``collect(module, args, state) -> state`` folds one batch's input into the module's
            running statistics (``state`` is ``None`` for the first batch). Inputs are folded in arrival
            order: batch order unless routing lets some skip ahead, and always the same order, so the
            pooled result is deterministic. With ``park``, it runs when the layer is finalized (the
            parked batches hold their inputs anyway), and a layer whose every batch received the very
            same input tensor as at the previously finalized layer (q/k/v, gate/up) *shares* that
            layer's state instead of collecting it again. Without ``park``, it runs on arrival.
        finalize: ``finalize(module, state, batches)``, run once per module when every batch that will
            reach it has (``batches``: their indices, ascending); it may change the module's weights.
        park: ``False`` turns the meeting points off: every batch runs straight through with the weights
            as they are, and every layer is finalized after the last batch (dense statistics).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        collect: Callable[[nn.Module, tuple[Any, ...], Any], Any],
        finalize: Callable[[nn.Module, Any, list[int]], None],
        park: bool = True,
    ) -> None:
        self._park = park
        self._rank = {id(m): i for i, m in enumerate(layers)}
        self._layers = list(layers)
        self._collect = collect
        self._finalize = finalize
        self.finalized: list[nn.Module] = []

    def run(self, jobs: Sequence[Callable[[], T]]) -> list[T]:
        """Run every job (one per batch); return their results in order. Re-raises the first failure."""
        self._scheduler = greenlet.getcurrent()
        self._current: int | None = None
        self._waiting: dict[int, list[int]] = {}
        self._states: dict[int, Any] = {}
        self._arrivals: dict[int, list[tuple[int, tuple[Any, ...]]]] = {}
        self._last: tuple[list[int], list[weakref.ref[Any]], Any] | None = None
        self._done: set[int] = set()
        results: list[Any] = [None] * len(jobs)
        lets = [greenlet.greenlet(job, parent=self._scheduler) for job in jobs]
        runnable: deque[int] = deque(range(len(jobs)))

        handles = [m.register_forward_pre_hook(self._pre_hook, with_kwargs=True) for m in self._layers]
        # Grad mode is thread state that every greenlet shares: a job parked inside ``with torch.no_grad()``
        # while another enters and leaves its own would have the two restore their saved modes out of order,
        # so the caller's mode is restored here whatever the jobs do.
        grad_mode = torch.is_grad_enabled()
        try:
            while runnable or self._waiting:
                if not runnable:
                    runnable.extend(i for i in self._finalize_earliest() if not lets[i].dead)
                    continue
                index = runnable.popleft()
                self._current = index
                value = lets[index].switch()  # returns when the batch parks (None) or finishes (its result)
                if lets[index].dead:
                    results[index] = value
        except BaseException:
            for let in lets:
                if not let.dead:
                    let.throw(greenlet.GreenletExit)
            raise
        finally:
            torch.set_grad_enabled(grad_mode)
            self._current = None
            for handle in handles:
                handle.remove()
        return results

    def _finalize_earliest(self) -> list[int]:
        key = min(self._waiting, key=self._rank.__getitem__)
        parked = self._waiting.pop(key)
        module = self._layers[self._rank[key]]
        state = self._states.pop(key) if not self._park else self._pool_arrivals(module, self._arrivals.pop(key))
        self._done.add(key)
        self._finalize(module, state, sorted(parked))
        self.finalized.append(module)
        return sorted(parked)

    def _pool_arrivals(self, module: nn.Module, arrivals: list[tuple[int, tuple[Any, ...]]]) -> Any:
        """The pooled state of a layer's parked inputs, shared with the previous layer if it saw the same."""
        batches = [index for index, _ in arrivals]
        last = self._last
        if (
            last is not None
            and last[0] == batches
            and all(ref() is inputs[0] for ref, (_, inputs) in zip(last[1], arrivals, strict=True))
        ):
            return last[2]
        state = None
        for _, inputs in arrivals:
            state = self._collect(module, inputs, state)
        self._last = (batches, [weakref.ref(inputs[0]) for _, inputs in arrivals], state)
        return state

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        index = self._current
        key = id(module)
        if index is None or greenlet.getcurrent() is self._scheduler or key in self._done:
            return  # called outside a batch, or a second call after the layer was pruned
        inputs = args if args else tuple(kwargs.values())  # Linear(input=x) passes its input by keyword
        self._waiting.setdefault(key, []).append(index)
        if self._park:
            self._arrivals.setdefault(key, []).append((index, inputs))
            self._scheduler.switch()  # park; resumed once the layer is pruned
        else:
            self._states[key] = self._collect(module, inputs, self._states.get(key))
