"""The training configurations are strict pydantic configs (YAML round trips, unknown keys refused) and the
training reports satisfy prunekit.reporting.Report."""

import json

import pytest
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.reporting import write_report
from prunekit.training import (
    CubicSchedule,
    DistillConfig,
    LotteryConfig,
    SAPConfig,
    Sparsifier,
    SparsifierConfig,
    TrainConfig,
)
from prunekit.training.cifar.augment import CIFAR10_MEAN, CIFAR10_STD
from prunekit.training.report import TrainingReport


def test_the_loop_defaults_are_cifar10_statistics():
    assert TrainConfig().mean == CIFAR10_MEAN and TrainConfig().std == CIFAR10_STD


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(epochs=2, batch_size=16, threads=1),
        DistillConfig(0.5, 2.0),
        SAPConfig(scope="row", p=1, q=2),
        LotteryConfig(rate=0.3, exclude=(r"^3\.",), module_types=(nn.Linear,)),
        SparsifierConfig(
            schedule=CubicSchedule(final_sparsity=0.5, start_step=0, end_step=4, frequency=2),
            granularity="2:4",
            include="h",
            module_types=(nn.Linear, nn.Conv2d),
        ),
    ],
)
def test_configs_round_trip_through_yaml(config, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(config.to_yaml())
    again = type(config).from_yaml(path)
    assert again == config
    if isinstance(config, SparsifierConfig):
        assert again.describe() == config.describe()


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ConfigError, match="batchsize: unknown key"):
        TrainConfig(batchsize=3)
    with pytest.raises(ConfigError, match="whole number"):
        TrainConfig(batch_size=2.5)


def test_reports_satisfy_the_report_protocol(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sparsifier = Sparsifier(
        model, SparsifierConfig(schedule=CubicSchedule(final_sparsity=0.5, start_step=0, end_step=2, frequency=1))
    )
    sparsifier.step()
    out = write_report(sparsifier.sparsity_report(), tmp_path / "sparsity")
    assert json.loads((out / "report.json").read_text()) == sparsifier.sparsity_report().to_dict()
    assert "| 0.weight |" in (out / "report.md").read_text()
    report = TrainingReport(title="t", experiments={"dense": {"accuracy": 0.5, "history": []}})
    out = write_report(report, tmp_path / "training")
    assert json.loads((out / "report.json").read_text()) == {
        "title": "t",
        "budget": {},
        "experiments": {"dense": {"accuracy": 0.5, "history": []}},
        "floors": [],
    }
