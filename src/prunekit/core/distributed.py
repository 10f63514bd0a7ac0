"""Several processes pruning one model together through ``torch.distributed`` (launched by ``torchrun``: gloo
on CPUs, NCCL on GPUs, one node or many). Every function is a no-op, or the one-process answer, when no
process group is initialised, so the pipelines call them unconditionally.

What the ranks exchange is small and always in the same order on every rank: sums of statistics
(:func:`all_reduce_sum_`), one rank's result for everyone (:func:`broadcast_async`), rows gathered in rank order
(:func:`all_gather_rows`), and Python records (:func:`all_gather_objects`). :func:`check_same_everywhere`
refuses ranks that were started with different settings, :func:`agree` makes a check done on one rank fail
on all of them, and :func:`collective_errors` turns a rank that died into a clear error on the others.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from prunekit.core.errors import ConfigError, PrunekitError

#: What ``torchrun`` sets in every rank's environment.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: How long a collective waits for a rank that stopped answering before it fails.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedError(PrunekitError, RuntimeError):
    """Ranks of a distributed run disagree, or one of them stopped: every rank raises it, nothing is written."""


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def init_from_torchrun(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> torch.device:
    """Join the process group ``torchrun`` set up (NCCL when CUDA is available, else gloo) and return this
    rank's device (``cuda:LOCAL_RANK`` or the CPU). Already joined: returns the device. Without torchrun's
    environment: a :class:`~prunekit.core.errors.ConfigError` naming the command to use."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing and not is_distributed():
        raise ConfigError(
            f"--distributed runs under torchrun, whose environment is missing here ({', '.join(missing)}): "
            "start it as `torchrun --nproc-per-node N -m prunekit prune ... --distributed`, or drop --distributed"
        )
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not is_distributed():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return device


def _comm_device() -> torch.device:
    """Where tensors must be for the backend: the current CUDA device under NCCL, else the CPU."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
    """Turn a failed collective (a rank that died or hung past the timeout) into a :class:`DistributedError`."""
    try:
        yield
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, PrunekitError) or not is_distributed():
            raise
        rank, world = rank_and_world()
        raise DistributedError(
            f"rank {rank} of {world}: another rank stopped or stopped answering ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the run stops here, before anything is written"
        ) from exc


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place, one collective per tensor in the given order."""
    if not is_distributed():
        return
    device = _comm_device()
    with collective_errors():
        for tensor in tensors:
            moved = tensor.to(device)
            torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM)
            if moved is not tensor:
                tensor.copy_(moved)


def broadcast_async(tensors: Sequence[torch.Tensor], src: int) -> Callable[[], None]:
    """Start replacing every rank's tensors by rank ``src``'s, and return the function that waits for it and
    writes them in place. Ranks may start several before finishing any (rank ``src`` keeps computing while the
    others receive); every rank must start them in the same order."""
    if not is_distributed():
        return lambda: None
    device = _comm_device()
    moved = [t.to(device, torch.uint8 if t.dtype == torch.bool else t.dtype) for t in tensors]
    with collective_errors():
        works = [torch.distributed.broadcast(m, src=src, async_op=True) for m in moved]

    def finish() -> None:
        with collective_errors():
            for work in works:
                work.wait()
        for tensor, received in zip(tensors, moved, strict=True):
            tensor.copy_(received.to(tensor.dtype))

    return finish


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a process group."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    with collective_errors():
        torch.distributed.all_gather_object(gathered, value)
    return gathered


def all_gather_rows(rows: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's rows (``(n_r, d)``, ``n_r`` may differ, ``None`` for none) stacked in rank order."""
    if not is_distributed():
        return rows
    parts = [p for p in all_gather_objects(None if rows is None else rows.detach().cpu()) if p is not None]
    if not parts:
        return None
    stacked = torch.cat(parts)
    return stacked if rows is None else stacked.to(rows.device)


def fingerprint(*parts: str | bytes) -> str:
    """A short hash of ``parts``, to compare what the ranks were started with."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def check_same_everywhere(value: str, what: str) -> None:
    """Refuse, on every rank, a run whose ranks hold different ``value`` (a fingerprint of ``what``)."""
    values = all_gather_objects(value)
    if len(set(values)) > 1:
        differ = [r for r, v in enumerate(values) if v != values[0]]
        raise DistributedError(
            f"the ranks were started with different {what} (ranks {differ} differ from rank 0): start every rank "
            "with the same command, model and files"
        )


def agree(error: BaseException | None) -> None:
    """Raise on every rank the first error any rank met (``None``: none); rank order decides which. A check that
    can only run on one rank (the output directory) thus stops all of them instead of leaving them waiting."""
    errors = all_gather_objects(None if error is None else (type(error).__name__, str(error)))
    first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if first is None:
        return
    if error is not None:
        raise error
    rank, (kind, message) = first
    raise DistributedError(f"rank {rank} stopped the run: {kind}: {message}")


def barrier() -> None:
    """Wait for every rank (under :func:`collective_errors`)."""
    if is_distributed():
        with collective_errors():
            torch.distributed.barrier()


def shard_rows(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of ``tensor``'s rows (sizes differ by at most one; earlier ranks
    take the extra). Refuses fewer rows than ranks: a rank without calibration windows has no statistics."""
    if tensor.shape[0] < world:
        raise ConfigError(
            f"{tensor.shape[0]} calibration windows cannot be shared by {world} ranks: give at least one window "
            "per rank (--nsamples), or start fewer ranks"
        )
    return torch.tensor_split(tensor, world)[rank]
