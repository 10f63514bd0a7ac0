"""Pruning during training: schedules (Zhu & Gupta 2017), per-layer distributions (uniform, Global MP, ERK),
GraNet regrowth (Liu et al. 2021), a :class:`Sparsifier` that wires them to a model and optimizer, lottery tickets
with rewinding (Frankle & Carbin 2019; Frankle et al. 2020), DDP mask agreement and a Hugging Face callback;
the PQ Index and its adaptive rule SAP (Diao et al. 2023), distillation (Hinton et al. 2015), data pruning
(EL2N, Paul et al. 2021), CIFAR-10 data and models for experiments (the ``cifar`` subpackage), a plain training
loop for image classifiers (:func:`train`, :func:`evaluate`; ``loop``) and its report (``report``: JSON, Markdown,
PNG).

``prunekit.training.hf_callback.sparsifier_callback`` imports transformers only when called.
"""

from prunekit.training.data_pruning import el2n_scores, random_subset, select_by_score
from prunekit.training.distill import kd_loss
from prunekit.training.distributions import (
    erk_densities,
    global_magnitude_masks,
    layer_keep_counts,
    random_masks,
    uniform_sparsities,
)
from prunekit.training.hf_callback import sparsifier_callback
from prunekit.training.loop import DistillConfig, StepRecord, TrainConfig, TrainHistory, evaluate, train
from prunekit.training.lottery import (
    LotteryConfig,
    LotteryTicket,
    capture_rewind_point,
    imp_round,
    random_reinit,
    rewind,
    rounds_to_reach,
    scratch_init,
)
from prunekit.training.pqi import SAPConfig, model_pq_index, pq_index, sap_step
from prunekit.training.regrow import cosine_regrow_fraction, gradient_regrowth, magnitude_death, prune_and_regrow
from prunekit.training.report import TrainingReport
from prunekit.training.schedules import (
    CubicSchedule,
    LinearSchedule,
    OneShotSchedule,
    Schedule,
    is_update_step,
    sparsity_at,
)
from prunekit.training.selection import TargetSelectionError, select_parameters
from prunekit.training.sparse_config import SparsifierConfig
from prunekit.training.sparsifier import Sparsifier
from prunekit.training.sparsity_report import LayerSparsity, SparsityReport

__all__ = [
    "CubicSchedule",
    "DistillConfig",
    "LayerSparsity",
    "LinearSchedule",
    "LotteryConfig",
    "LotteryTicket",
    "OneShotSchedule",
    "SAPConfig",
    "Schedule",
    "Sparsifier",
    "SparsifierConfig",
    "SparsityReport",
    "StepRecord",
    "TargetSelectionError",
    "TrainConfig",
    "TrainHistory",
    "TrainingReport",
    "capture_rewind_point",
    "cosine_regrow_fraction",
    "el2n_scores",
    "erk_densities",
    "evaluate",
    "global_magnitude_masks",
    "gradient_regrowth",
    "imp_round",
    "is_update_step",
    "kd_loss",
    "layer_keep_counts",
    "magnitude_death",
    "model_pq_index",
    "pq_index",
    "prune_and_regrow",
    "random_masks",
    "random_reinit",
    "random_subset",
    "rewind",
    "rounds_to_reach",
    "sap_step",
    "scratch_init",
    "select_by_score",
    "select_parameters",
    "sparsifier_callback",
    "sparsity_at",
    "train",
    "uniform_sparsities",
]
