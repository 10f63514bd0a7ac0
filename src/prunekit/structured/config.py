"""The configuration of a ``prunekit structured`` run: typed, strict, YAML-able (``prunekit structured --recipe``),
the same style as the one-shot recipe (:class:`prunekit.core.config.StrictConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from prunekit.core.config import StrictConfig
from prunekit.structured.importance import Criterion, criterion_names
from prunekit.structured.llm.search import WidthSearchSettings
from prunekit.structured.plan import Policy
from prunekit.structured.prune import BudgetTarget


class StructuredConfig(StrictConfig):
    """Settings of one ``prunekit structured`` run; every command-line flag is a key of the same name."""

    out: str | None = Field(None, description="new or empty output directory")
    ratio: float = Field(0.25, description="fraction to remove, in (0, 1)")
    target: BudgetTarget = Field("params", description="what ratio counts: params, macs, channels, latency")
    mode: Literal["width", "depth", "search"] = Field(
        "width", description="LMs: uniform channels/heads, whole layers, or per-layer widths searched (Týr)"
    )
    search: WidthSearchSettings = Field(
        default_factory=WidthSearchSettings, description="LMs, --mode search: how the search runs"
    )
    criterion: Criterion | None = Field(None, description="importance: l1, l2, bn_scale, taylor, activation...")
    model: str | None = Field(None, description="HF directory, .gguf file or hub id; empty: bundled SmolLM2")
    torchvision: str | None = Field(None, description="prune this torchvision classifier instead (e.g. resnet50)")
    weights: str | None = Field(None, description="torchvision weights name (downloaded by torchvision)")
    input_size: int = Field(224, gt=0, description="torchvision example image size")
    calib: str | None = Field(None, description="LMs: calibration text file")
    nsamples: int = Field(32, gt=0, description="LMs: calibration windows")
    seqlen: int = Field(512, gt=0, description="LMs: calibration window length")
    seed: int = 0
    ppl: str | None = Field(None, description="LMs: text file to report perplexity before and after on")
    ppl_windows: int | None = Field(40, gt=0, description="LMs: perplexity windows")
    ppl_seqlen: int = Field(2048, gt=0, description="LMs: perplexity window length")
    round_to: int = Field(1, gt=0, description="keep channel counts multiples of this (e.g. 8)")
    blocks: int = Field(0, description="torchvision: first remove this many residual blocks whole")
    keep_streams: bool = Field(False, description="torchvision: keep the residual streams whole")
    policy: Policy = Field("uniform", description="torchvision: uniform, global or latency (HALP)")
    prune_hidden: bool = Field(False, description="LMs, width: also shrink the hidden size")
    drop_attention: int = Field(0, description="LMs, width: first drop the attention of this many layers")
    reconstruct: bool = Field(True, description="LMs, width: least-squares refit of the consumers of pruned inputs")
    onnx: bool = Field(False, description="torchvision: also export model.onnx")
    overwrite: bool = Field(False, description="replace a non-empty out")
    push_to_hub: str | None = Field(
        None, description="Hub repository ORG/NAME to upload out to once written (causal LMs)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = Field(False, description="LMs: run model code from the hub")
    device: str = Field("auto", description="LMs: auto, cpu, cuda")

    @field_validator("criterion")
    @classmethod
    def _registered_criterion(cls, value: str | None) -> str | None:
        if value is not None and value not in criterion_names():
            raise ValueError(f"unknown criterion {value!r}: choose one of {', '.join(criterion_names())}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StructuredConfig:
        """The checks that span several keys, with the messages the command line has always given."""
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.blocks < 0:
            raise ValueError(f"--blocks must be >= 0, got {self.blocks}")
        if self.drop_attention < 0:
            raise ValueError(f"--drop-attention must be >= 0, got {self.drop_attention}")
        if self.drop_attention and (self.torchvision or self.mode != "width"):
            raise ValueError("--drop-attention is for language models in --mode width (depth removes whole layers)")
        if self.torchvision:
            return self
        if self.mode == "search" and (self.drop_attention or self.prune_hidden or self.target != "params"):
            raise ValueError(
                "--mode search chooses attention drops itself and prunes to a parameter target: drop "
                "--drop-attention, --prune-hidden and --target"
            )
        if self.blocks:
            raise ValueError(
                "--blocks is for --torchvision models; language models lose whole layers with --mode depth"
            )
        if self.keep_streams:
            raise ValueError(
                "--keep-streams is for --torchvision models; language models keep their hidden size unless "
                "--prune-hidden"
            )
        if self.policy != "uniform" or self.target == "latency":
            raise ValueError(
                "--policy and --target latency are for --torchvision models; language models are pruned uniformly "
                "per layer to a parameter target (--mode width or depth)"
            )
        return self
