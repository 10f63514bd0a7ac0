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

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import greenlet
from torch import nn

T = TypeVar("T")


class LockstepRunner(Generic[T]):
    """Run ``len(jobs)`` forwards through modules hooked at ``layers``; see the module docstring.

    Args:
        layers: the modules to meet at, in forward order.
        collect: ``collect(module, args, state) -> state``, run in the batch's own forward before it
            parks; it folds the batch's input into the module's running statistics (``state`` is ``None``
            for the first batch). Batches arrive in batch order (unless routing lets some skip ahead),
            always in the same order, so the pooled result is deterministic; one running state per
            module is held, never one per batch.
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
        self._done: set[int] = set()
        results: list[Any] = [None] * len(jobs)
        lets = [greenlet.greenlet(job, parent=self._scheduler) for job in jobs]
        runnable: deque[int] = deque(range(len(jobs)))

        handles = [m.register_forward_pre_hook(self._pre_hook, with_kwargs=True) for m in self._layers]
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
            self._current = None
            for handle in handles:
                handle.remove()
        return results

    def _finalize_earliest(self) -> list[int]:
        key = min(self._waiting, key=self._rank.__getitem__)
        parked = self._waiting.pop(key)
        state = self._states.pop(key)
        self._done.add(key)
        module = self._layers[self._rank[key]]
        self._finalize(module, state, sorted(parked))
        self.finalized.append(module)
        return sorted(parked)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        index = self._current
        key = id(module)
        if index is None or greenlet.getcurrent() is self._scheduler or key in self._done:
            return  # called outside a batch, or a second call after the layer was pruned
        inputs = args if args else tuple(kwargs.values())  # Linear(input=x) passes its input by keyword
        self._states[key] = self._collect(module, inputs, self._states.get(key))
        self._waiting.setdefault(key, []).append(index)
        if self._park:
            self._scheduler.switch()  # park; resumed once the layer is pruned
