"""Recovering a pruned causal LM by distillation from its dense original (Minitron's recovery step, Muralidharan
et al. 2024, Sec. 3: logit distillation; Hinton et al. 2015 for the loss).

The student trains on random windows of a text with the loss of :func:`prunekit.training.distill.kd_loss` per
token: ``alpha T^2 KL(p_teacher^T || p_student^T) + (1 - alpha) CE(next token)``. Teacher logits are
computed on the fly for each batch (no cache: memory stays one batch of logits). The student keeps its
structure (its shapes do not change) and, for sparse models, its zeros: every weight of two or more
dimensions in the decoder blocks (fused 3-D experts too) that is at least 1% zero keeps exactly those zeros
after each step. A few windows at the end of the
text are set apart, and the mean per-token ``KL(p_teacher || p_student)`` (``T = 1``) on them is measured
before and after. Deterministic given the seed; resumable: every ``checkpoint_every`` steps the student,
the optimizer and the step are written to a checkpoint folder, and a run given that folder continues
from it, ending with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

from prunekit.core.config import StrictConfig
from prunekit.core.devices import resolve_device
from prunekit.core.errors import CalibrationError, ConfigError
from prunekit.io.atomic import write_atomically
from prunekit.models.blocks import find_decoder_blocks
from prunekit.training.distill import freeze_teacher, kd_loss, soft_target_kl

log = logging.getLogger(__name__)

#: A 2-D block weight with at least this fraction of exact zeros is sparse: its zeros are kept.
SPARSE_FRACTION = 0.01
CHECKPOINT_STATE, CHECKPOINT_OPTIMIZER, CHECKPOINT_INFO = "student.safetensors", "optimizer.pt", "progress.json"


class LMDistillConfig(StrictConfig):
    """How to distill: the token budget, the windows, the optimizer and the loss."""

    tokens: int = Field(2_000_000, gt=0, description="training tokens (steps = tokens / (batch_size x seqlen))")
    seqlen: int = Field(512, gt=1, description="tokens per training window")
    batch_size: int = Field(4, gt=0, description="windows per step")
    lr: float = Field(5e-5, gt=0, description="AdamW peak learning rate (linear warm-up, cosine to 10%)")
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming up")
    temperature: float = Field(1.0, gt=0, description="distillation temperature T")
    alpha: float = Field(1.0, ge=0, le=1, description="weight of the KL term; 1 - alpha goes to next-token loss")
    heldout_windows: int = Field(8, ge=1, description="windows at the end of the text set apart for the KL")
    checkpoint_every: int = Field(100, gt=0, description="steps between resumable checkpoints")
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")

    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.seqlen))


@dataclass
class LMDistillResult:
    """What the distillation did: steps, tokens, the held-out KL before and after, the loss per step."""

    steps: int
    tokens: int
    kl_before: float
    kl_after: float
    seconds: float
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)


def learning_rate(step: int, steps: int, config: LMDistillConfig) -> float:
    """Linear warm-up over ``warmup x steps``, then cosine decay to 10% of the peak."""
    warm = max(1, round(config.warmup * steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of the decoder blocks' 2-D weights that are at least :data:`SPARSE_FRACTION` zero."""
    blocks_name, _ = find_decoder_blocks(model)
    masks = {}
    for name, param in model.named_parameters():
        if name.startswith(blocks_name + ".") and param.dim() >= 2:
            zeros = param == 0
            if float(zeros.float().mean()) >= SPARSE_FRACTION:
                masks[name] = ~zeros
    return masks


def heldout_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, device: torch.device) -> float:
    """Mean per-token ``KL(p_teacher || p_student)`` at ``T = 1`` on ``windows`` ``(n, seqlen)``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            ids = row[None].to(device)
            kl = soft_target_kl(student(input_ids=ids).logits.float(), teacher(input_ids=ids).logits.float(), 1.0)
            total += float(kl.sum())
            count += kl.numel()
    return total / max(1, count)


def split_windows(tokens: torch.Tensor, config: LMDistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training stream and the held-out windows (the last ``heldout_windows`` non-overlapping ones)."""
    held = config.heldout_windows * config.seqlen
    if tokens.dim() != 1 or tokens.numel() < held + 2 * config.seqlen:
        raise CalibrationError(
            f"distillation needs at least {held + 2 * config.seqlen} tokens of text ({config.heldout_windows} "
            f"held-out windows and two training windows of {config.seqlen}), got {tokens.numel()}: give a longer "
            "text or lower --seqlen"
        )
    return tokens[:-held], tokens[-held:].reshape(config.heldout_windows, config.seqlen)


def _batch(stream: torch.Tensor, step: int, config: LMDistillConfig) -> torch.Tensor:
    """The windows of step ``step``: random starts from a generator seeded by (seed, step), so a resumed run
    draws exactly what an uninterrupted one would."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - config.seqlen, (config.batch_size,), generator=generator)
    return torch.stack([stream[s : s + config.seqlen] for s in starts.tolist()])


#: Settings a resumed run may change: they do not alter the result.
RESUMABLE_CHANGES = ("checkpoint_every", "device")


def _settings(config: LMDistillConfig) -> dict[str, object]:
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in RESUMABLE_CHANGES}


def _save_checkpoint(
    folder: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: LMDistillConfig,
    losses: list[float],
    kl_before: float,
) -> None:
    def write(tmp: Path) -> None:
        save_model(student, str(tmp / CHECKPOINT_STATE))  # tied tensors once
        torch.save(optimizer.state_dict(), tmp / CHECKPOINT_OPTIMIZER)
        info = {"step": step, "config": _settings(config), "losses": losses, "kl_before": kl_before}
        (tmp / CHECKPOINT_INFO).write_text(json.dumps(info))

    write_atomically(folder, write, overwrite=True)


def _load_checkpoint(
    folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer, config: LMDistillConfig
) -> tuple[int, list[float], float]:
    info = json.loads((folder / CHECKPOINT_INFO).read_text())
    if info["config"] != _settings(config):
        raise ConfigError(
            f"the checkpoint in {str(folder)!r} was written with other settings ({info['config']}): resume with the "
            "same settings, or start over without --resume"
        )
    try:
        load_model(student, str(folder / CHECKPOINT_STATE), strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"the checkpoint in {str(folder)!r} does not hold this student's weights: {exc}") from None
    optimizer.load_state_dict(torch.load(folder / CHECKPOINT_OPTIMIZER, weights_only=True))
    return int(info["step"]), list(info["losses"]), float(info["kl_before"])


def distill_lm(
    student: nn.Module,
    teacher: nn.Module,
    tokens: torch.Tensor,
    config: LMDistillConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> LMDistillResult:
    """Distill ``teacher`` into ``student`` (in place) on the 1-D token stream ``tokens``; see the module
    docstring. With ``checkpoint_dir``, progress is saved there every ``checkpoint_every`` steps, and with
    ``resume`` a run continues from the checkpoint found there."""
    config = config or LMDistillConfig()
    device = resolve_device(config.device)
    stream, heldout = split_windows(tokens, config)
    teacher = freeze_teacher(teacher.to(device))
    student.to(device)
    vocab_s, vocab_t = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vocab_s != vocab_t:
        raise ConfigError(f"student and teacher have different vocabularies ({vocab_s} vs {vocab_t} tokens)")
    masks = {name: mask.to(device) for name, mask in sparse_masks(student).items()}
    if masks:
        log.info("keeping the zeros of %d sparse weights", len(masks))
    params = dict(student.named_parameters())
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    steps = config.steps()
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, losses = 0, []
    if resume:
        if folder is None or not (folder / CHECKPOINT_INFO).is_file():
            raise ConfigError(f"--resume: no checkpoint in {str(folder)!r} to continue from")
        start, losses, kl_before = _load_checkpoint(folder, student, optimizer, config)
        log.info("resuming at step %d of %d", start, steps)
    else:
        student.eval()
        kl_before = heldout_kl(student, teacher, heldout, device)
    started = time.perf_counter()
    student.train()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout draws from a seed per step, and the caller's RNG is kept
        for step in tqdm(
            range(start, steps), desc="distilling", unit="step", disable=not progress, initial=start, total=steps
        ):
            torch.manual_seed(config.seed * 1_000_003 + step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, config)
            ids = _batch(stream, step, config).to(device)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits[:, :-1].float()
            logits = student(input_ids=ids).logits[:, :-1].float()
            vocab = logits.shape[-1]
            loss = kd_loss(
                logits.reshape(-1, vocab),
                teacher_logits.reshape(-1, vocab),
                ids[:, 1:].reshape(-1),
                alpha=config.alpha,
                temperature=config.temperature,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    params[name].mul_(mask)
            losses.append(loss.item())
            if folder is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
                _save_checkpoint(folder, student, optimizer, step + 1, config, losses, kl_before)
    student.eval()
    kl_after = heldout_kl(student, teacher, heldout, device)
    log.info("held-out KL to the teacher: %.4f -> %.4f", kl_before, kl_after)
    return LMDistillResult(
        steps=steps,
        tokens=steps * config.batch_size * config.seqlen,
        kl_before=kl_before,
        kl_after=kl_after,
        seconds=time.perf_counter() - started,
        resumed_from=start,
        losses=losses,
    )


__all__ = ["LMDistillConfig", "LMDistillResult", "distill_lm", "heldout_kl", "learning_rate", "sparse_masks"]
