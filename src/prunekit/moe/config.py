"""The configuration of whole-expert pruning (``prunekit experts``, :func:`prunekit.moe.prune_experts`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from prunekit.core.config import StrictConfig
from prunekit.moe.criteria import criterion_names


class ExpertPruneConfig(StrictConfig):
    """Which experts to remove from every MoE layer and how to choose them."""

    remove: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of each layer's experts to remove, in [0, 1)")
    criterion: str = Field("reap", description="frequency, reap, stun or reconstruct (see prunekit.moe.criteria)")
    merge: bool = Field(
        False,
        description="fold each removed expert into its nearest kept one (router direction), weighted by routing "
        "mass, instead of dropping it",
    )
    coactivation_weight: float = Field(
        0.0, ge=0.0, description="stun: weight of co-activation in the distance (0: router rows alone, as STUN's code)"
    )
    exhaustive_limit: int = Field(
        5000, ge=1, description="reconstruct: search every kept subset when there are at most this many, else greedily"
    )
    sample_tokens: int = Field(
        2048, gt=0, description="calibration tokens per layer kept to measure output errors (and for reconstruct)"
    )
    batch_size: int = Field(1, gt=0, description="calibration windows per forward batch")
    device: str = Field("auto", description="compute device: auto, cpu, cuda, cuda:N")
    propagation: Literal["sequential", "dense"] = Field(
        "sequential",
        description="inputs each layer is scored on: sequential (earlier layers' experts already removed) or "
        "dense (the unpruned model's)",
    )

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value: str) -> str:
        if value not in criterion_names():
            raise ValueError(f"unknown expert criterion {value!r}: choose one of {', '.join(criterion_names())}")
        return value
