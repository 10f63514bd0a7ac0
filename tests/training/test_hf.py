"""The Hugging Face Trainer callback: a tiny Trainer run ends at the scheduled sparsity and logs it; resuming from a
Trainer checkpoint restores the masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.training import CubicSchedule, Sparsifier, SparsifierConfig, sparsifier_callback

transformers = pytest.importorskip("transformers")


class TinyRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.fc2(torch.relu(self.fc1(x))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def dataset(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return [{"x": x[i], "labels": x[i].sum()} for i in range(n)]


# 0 -> 0.75 on steps 0, 2, 4; fc1 keeps 128 - 96 = 32, fc2 16 - 12 = 4: exactly 36 of 144 weights at the end.
CONFIG = SparsifierConfig(schedule=CubicSchedule(final_sparsity=0.75, start_step=0, end_step=4, frequency=2))


def trainer_for(model: nn.Module, sparsifier: Sparsifier, out: Path, max_steps: int, save_steps: int | None = None):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=dataset(), callbacks=[sparsifier_callback(sparsifier)]
    )


def test_trainer_run_ends_at_the_scheduled_sparsity_and_logs_it(tmp_path: Path):
    model = TinyRegressor()
    sparsifier = Sparsifier(model, CONFIG)
    trainer = trainer_for(model, sparsifier, tmp_path, max_steps=6)
    trainer.train()
    report = sparsifier.sparsity_report()
    assert sparsifier.step_count == 6
    assert report.sparsity == 0.75 and report.kept == 36
    keep = sparsifier.masks["fc1.weight"].keep
    assert torch.all(model.fc1.weight[~keep] == 0)
    moments = trainer.optimizer.state[model.fc1.weight]  # the Trainer's AdamW, attached at on_train_begin
    assert torch.all(moments["exp_avg"][~keep] == 0) and torch.all(moments["exp_avg_sq"][~keep] == 0)
    assert moments["exp_avg"][keep].abs().sum() > 0
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["sparsity_target"] for entry in logged] == [0.0, pytest.approx(0.65625), 0.65625, 0.75, 0.75, 0.75]
    assert logged[-1]["sparsity"] == 0.75


def test_resuming_a_trainer_checkpoint_restores_the_masks(tmp_path: Path):
    model = TinyRegressor()
    sparsifier = Sparsifier(model, CONFIG)
    trainer_for(model, sparsifier, tmp_path, max_steps=6, save_steps=3).train()
    assert (tmp_path / "checkpoint-3" / "sparsifier.pt").is_file()

    fresh = TinyRegressor()
    fresh_sparsifier = Sparsifier(fresh, CONFIG)
    trainer = trainer_for(fresh, fresh_sparsifier, tmp_path, max_steps=6)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert fresh_sparsifier.step_count == 6
    for name, mask in sparsifier.masks.items():
        assert torch.equal(mask.keep, fresh_sparsifier.masks[name].keep), name
