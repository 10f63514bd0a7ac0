"""Typed, strict configuration: one recipe behind the Python API, the CLI and YAML files.

Unknown keys are rejected everywhere (``extra="forbid"``), so a typo in a recipe fails loudly instead
of being ignored. Strings such as ``"2:4"`` are parsed once, here, into pattern objects.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, model_serializer, model_validator

from prunekit.core.config import StrictConfig
from prunekit.core.patterns import NM, Pattern, parse_pattern
from prunekit.io.compressed import SaveFormat
from prunekit.methods import MethodConfig, OneShotMethod, method_class, method_classes

log = logging.getLogger(__name__)


class PruneConfig(StrictConfig):
    """What to prune and how: the method (a registered :class:`~prunekit.methods.OneShotMethod`), the
    pattern, the targets and the calibration engine's settings.

    The section is a union discriminated by ``method``: beside the common keys below it takes the chosen
    method's own options (SparseGPT's ``dampening``, ``block_size``, ``hessian_dtype``), validated by that
    method's config class and kept in :attr:`options`; another method's option is an error that names its
    owner. In YAML and in ``model_dump`` the options sit flat beside the common keys.
    """

    method: str = Field("wanda", description="one-shot method (see prunekit.methods.method_names())")
    options: SerializeAsAny[MethodConfig] = Field(
        default_factory=MethodConfig, description="the method's own options (flat beside these keys in a recipe)"
    )
    sparsity: float | None = Field(
        None, description="fraction of weights to remove, in [0, 1); default 0.5; implied by an N:M pattern"
    )
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' such as '2:4'")
    scope: Literal["row", "layer"] | None = Field(
        None,
        description="unstructured comparison group: each output row or the whole layer; default: the "
        "method's own (row for wanda/magnitude/random, layer for sparsegpt, per column block)",
    )
    include: list[str] = Field(
        default_factory=list,
        description="regexes of layer names to prune (default: all decoder-block linears)",
    )
    exclude: list[str] = Field(default_factory=list, description="regexes of layer names to leave alone")
    layer_budget: Literal["uniform", "owl"] = Field(
        "uniform",
        description="per-block sparsity: uniform (the same everywhere) or owl (more kept where a block has more "
        "outlier Wanda scores, Yin et al. 2024; unstructured patterns; the mean stays exactly at sparsity)",
    )
    owl_outlier_multiple: float = Field(
        5.0, gt=0.0, description="OWL's M: a score above M times its block's mean score is an outlier"
    )
    owl_max_deviation: float = Field(
        0.08, gt=0.0, lt=0.5, description="OWL's lambda: outlier shares are scaled to [0, 2 lambda] before centring"
    )
    reconstruct: Literal["none", "block"] = Field(
        "none",
        description="block: once a block's masks are fixed, tune its kept weights by Adam so the block's output "
        "matches the dense block's on the calibration inputs (mask held exactly; never raises the block's error)",
    )
    reconstruct_steps: int = Field(100, ge=1, description="Adam steps of block reconstruction, one batch a step")
    reconstruct_lr: float = Field(1e-4, gt=0.0, description="Adam learning rate of block reconstruction")
    seed: int = Field(0, description="seed of the random method")
    batch_size: int = Field(
        1, gt=0, description="calibration windows per forward batch (all batches are in flight at once)"
    )
    device: str = Field("auto", description="compute device: auto, cpu, cuda, cuda:N")
    distributed: bool = Field(
        False,
        description="run as one rank of a torchrun job: calibration windows shared, statistics summed, layer "
        "solves spread over the ranks (each rank on cuda:LOCAL_RANK or the CPU); rank 0 evaluates and writes",
    )
    sample_tokens: int = Field(
        256, ge=0, description="calibration tokens per layer used to report reconstruction error (0: off)"
    )
    offload_activations: bool = Field(False, description="keep calibration activations on the CPU")
    propagation: Literal["auto", "sequential", "block", "dense"] = Field(
        "auto",
        description="inputs behind each layer's statistics: sequential (pruned model, 1 pass per block), "
        "block (dense within a block, pruned across blocks, 2 passes), dense (dense model, 1 pass); "
        "auto: dense for Wanda-like scores at unstructured patterns, sequential otherwise",
    )
    refit_steps: int | None = Field(
        None,
        ge=0,
        description="conjugate-gradient steps refitting the kept weights to the dense layer's output once the "
        "mask is chosen (prunekit.reconstruction; Boza 2024); default: the method's own (4 for sparsegpt, 0 for "
        "the others; with more than 0 they accumulate the Hessian too, and magnitude/random then need "
        "calibration data); 0 gives the paper's SparseGPT",
    )

    expert_min_tokens: int = Field(
        16,
        ge=0,
        description="MoE: an expert whose matrices receive fewer routed calibration tokens than this is not "
        "pruned from its statistics but as underused_experts says (and reported)",
    )
    underused_experts: Literal["magnitude", "dense"] = Field(
        "magnitude", description="MoE: what an expert with fewer than expert_min_tokens routed tokens gets"
    )
    routing_weighted: bool = Field(
        True,
        description="MoE: weigh each routed token in an expert's statistics by its routing weight (the expert's "
        "output is scaled by it, so the layer's output error weighs it so); false: every routed token counts once",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_options(cls, data: Any) -> Any:
        """Move the chosen method's own keys into ``options``, validated by its config class."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name = data.get("method", "wanda")
        known = {m.name: m for m in method_classes()}
        if name not in known:
            raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(known))}")
        config_class = known[name].config_class
        clashes = sorted(set(config_class.model_fields) & set(cls.model_fields))
        if clashes:
            raise ValueError(f"method {name!r} has options named like common keys ({', '.join(clashes)}): rename them")
        given = data.pop("options", None)
        own = {key: data.pop(key) for key in list(data) if key in config_class.model_fields}
        foreign = [key for key in data if key not in cls.model_fields]
        for key in foreign:
            owners = [m for m in known.values() if key in m.config_class.model_fields]
            if not owners:
                continue  # an unknown key: the strict model names it
            if all(data[key] == m.config_class.model_fields[key].default for m in owners):
                # recipes written before methods had options of their own list SparseGPT's defaults for every
                # method; a default value changes nothing, so it is dropped rather than refused
                log.warning("ignoring %s=%r: an option of %s, not of %s", key, data.pop(key), owners[0].name, name)
                continue
            raise ValueError(
                f"{key} is an option of method {' or '.join(sorted(m.name for m in owners))}, not of {name}"
            )
        if isinstance(given, config_class) and not own:
            data["options"] = given
        else:
            values = given.model_dump() if isinstance(given, MethodConfig) else dict(given or {})
            data["options"] = config_class(**{**values, **own})
        return data

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        options = data.pop("options", None) or {}
        return {**data, **options}

    @model_validator(mode="after")
    def _valid_pattern(self) -> PruneConfig:
        config_class = self.method_class().config_class
        if type(self.options) is not config_class:  # ``method`` was assigned after construction
            if self.options != type(self.options)():
                raise ValueError(
                    f"options {self.options!r} are not options of method {self.method}: build a new PruneConfig"
                )
            object.__setattr__(self, "options", config_class())
        self.method_class().check(self.options, self.parsed_pattern())
        if self.layer_budget == "owl" and isinstance(self.parsed_pattern(), NM):
            raise ValueError(
                f"layer_budget owl varies the sparsity per block, which an N:M pattern ({self.pattern}) fixes: use "
                "an unstructured pattern, or layer_budget uniform"
            )
        return self

    def method_class(self) -> type[OneShotMethod]:
        """The registered class of :attr:`method`."""
        return method_class(self.method)

    def build_method(self) -> OneShotMethod:
        """A fresh method object for one run (it may hold per-run state, such as a random generator)."""
        return self.method_class()(self.options, self.seed)

    def resolved_refit_steps(self) -> int:
        """Refit steps that run: ``refit_steps``, or the method's default (4 for SparseGPT, 0 otherwise)."""
        if self.refit_steps is not None:
            return self.refit_steps
        return self.method_class().default_refit_steps

    def needs_hessian(self) -> bool:
        """Whether the calibration pass accumulates ``X X^T`` per layer input (SparseGPT, or any refit)."""
        return self.method_class().needs_gram or self.resolved_refit_steps() > 0

    def needs_calibration(self) -> bool:
        """Whether the run needs calibration data: activation-based methods, and refits of any method."""
        return self.method_class().needs_activations or self.resolved_refit_steps() > 0

    def resolved_propagation(self) -> Literal["sequential", "block", "dense"]:
        """The propagation mode that runs: ``auto`` becomes ``dense`` for methods scored from activations
        alone (Wanda) at unstructured patterns and ``sequential`` otherwise (N:M patterns, SparseGPT's
        reconstruction, refits, weight-only methods). Over three calibration draws of SmolLM2-135M, dense statistics
        gave the lowest mean Wanda perplexity at 50% and sequential ones were 7% better than dense at 2:4
        (BENCHMARKS.md, "Calibration-seed sensitivity")."""
        if self.propagation != "auto":
            return self.propagation
        scored_from_activations = self.method_class().needs_activations and not self.needs_hessian()
        return "dense" if scored_from_activations and not isinstance(self.parsed_pattern(), NM) else "sequential"

    def parsed_pattern(self) -> Pattern:
        """The pattern as an object (:class:`~prunekit.core.patterns.Unstructured` or :class:`~prunekit.core.patterns.NM`)."""
        scope = self.scope or self.method_class().default_scope
        return parse_pattern(self.pattern, self.sparsity, scope)


class ModelConfig(StrictConfig):
    """Which model to load."""

    source: str | None = Field(None, description="HF directory, .gguf file, hub id; empty: bundled SmolLM2")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    lazy: bool = Field(
        False,
        description="models larger than memory: read, prune and write one decoder block at a time "
        "(a local safetensors directory; needs output.dir; no perplexity in the same run)",
    )


class CalibrationConfig(StrictConfig):
    """Where calibration windows come from."""

    path: str | None = Field(None, description="a text file (e.g. a validation split)")
    dataset: str | None = Field(None, description="a Hugging Face dataset name, instead of path")
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    nsamples: int = Field(128, description="number of windows")
    seqlen: int = Field(2048, description="tokens per window")
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationConfig:
        if self.path and self.dataset:
            raise ValueError("give calibration path or dataset, not both")
        return self


class EvalConfig(StrictConfig):
    """Perplexity evaluation (non-overlapping windows of a text file)."""

    ppl: str | None = Field(None, description="text file to report perplexity on")
    seqlen: int = Field(2048, gt=0)
    max_windows: int | None = Field(None, gt=0, description="use only the first N windows")
    before: bool = Field(True, description="also measure the dense model before pruning")
    device: str = Field("auto", description="where to run the evaluation: auto, cpu, cuda (whole model)")


class OutputConfig(StrictConfig):
    """Where the pruned checkpoint and the report go."""

    dir: str | None = None
    overwrite: bool = False
    report_dir: str | None = Field(None, description="default: <dir>/prunekit-report")
    push_to_hub: str | None = Field(
        None, description="Hub repository ORG/NAME to upload the output directory to once written (needs dir)"
    )
    save_format: SaveFormat = Field(
        "dense",
        description="dense (plain save_pretrained), compressed (sparse layers in compressed-tensors' "
        "sparse-24-bitmask when 2:4, else sparse-bitmask), or one of those by name (sparse-24 = sparse-24-bitmask)",
    )


class Recipe(StrictConfig):
    """A whole run: model, pruning, calibration, evaluation, output."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
