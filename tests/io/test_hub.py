"""``prunekit push`` / :func:`prunekit.io.hub.push_to_hub`, up to the network: the directory is checked (a
model with a card), the Hub is asked to create the repository and upload the folder with its README.md
(``HfApi`` methods replaced by recorders: this machine has no network), and every failure is a clear error:
no token, a refused token (401, 403), offline mode, an unreachable Hub (a real connection to a closed port)."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from models import save_tiny_checkpoint
from prunekit.cli import main
from prunekit.core.errors import ConfigError, ModelLoadError, OutputError
from prunekit.io.hub import push_to_hub
from prunekit.reporting.model_card import ModelCard, write_model_card

URL = "https://huggingface.co/org/tiny-pruned"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("hub") / "tiny")
    write_model_card(ModelCard("org/tiny", "wanda", "2:4", "Pruned."), folder)
    return folder


class Recorder:
    """Stands in for the Hub: records every ``HfApi`` call and what the uploaded folder held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploaded: list[str] = []
        recorder = self

        def create_repo(api: huggingface_hub.HfApi, repo_id: str, **kwargs: Any) -> str:
            recorder.calls.append(("create_repo", {"repo_id": repo_id, "token": api.token, **kwargs}))
            if fail is not None:
                raise fail
            return URL

        def create_branch(api: huggingface_hub.HfApi, repo_id: str, **kwargs: Any) -> None:
            recorder.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(api: huggingface_hub.HfApi, **kwargs: Any) -> None:
            recorder.calls.append(("upload_folder", kwargs))
            recorder.uploaded = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def test_push_creates_the_repository_and_uploads_the_folder_with_its_card(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = Recorder(monkeypatch)
    assert push_to_hub(model_dir, "org/tiny-pruned", private=True, token="hf_secret") == URL
    assert hub.calls == [
        (
            "create_repo",
            {
                "repo_id": "org/tiny-pruned",
                "token": "hf_secret",
                "private": True,
                "exist_ok": True,
                "repo_type": "model",
            },
        ),
        (
            "upload_folder",
            {
                "repo_id": "org/tiny-pruned",
                "folder_path": model_dir,
                "repo_type": "model",
                "revision": None,
                "commit_message": "Upload tiny (pruned with prunekit)",
            },
        ),
    ]
    assert "README.md" in hub.uploaded and "config.json" in hub.uploaded and "model.safetensors" in hub.uploaded


def test_the_command_pushes_to_a_branch_with_the_stored_token(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = Recorder(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    argv = ["push", str(model_dir), "--repo", "org/tiny-pruned", "--revision", "v1", "--message", "first"]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"pushed {model_dir} to {URL} (branch v1)\n"
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1]["private"] is False and hub.calls[0][1]["token"] is None  # HfApi finds the stored one
    assert hub.calls[1][1] == {"repo_id": "org/tiny-pruned", "branch": "v1", "exist_ok": True, "repo_type": "model"}
    assert hub.calls[2][1]["revision"] == "v1" and hub.calls[2][1]["commit_message"] == "first"


def test_no_token_is_refused_before_any_network_call(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Recorder(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match=r"not logged in to the Hugging Face Hub: run `hf auth login`, set HF_TOKEN"):
        push_to_hub(model_dir, "org/tiny-pruned")
    assert hub.calls == []
    assert main(["push", str(model_dir), "--repo", "org/tiny-pruned"]) == 2


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (401, ConfigError, r"refused the token as invalid or expired \(401\): run `hf auth login`"),
        (403, ConfigError, r"may not write to 'org/tiny-pruned' \(403 forbidden\): use a token with write access"),
        (400, OutputError, r"the Hub refused the upload to 'org/tiny-pruned' \(HTTP 400\): bad metadata"),
    ],
)
def test_a_refusal_by_the_hub_names_the_fix(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, status: int, error: type[Exception], message: str
) -> None:
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    Recorder(monkeypatch, fail=HfHubHTTPError("refused", response=response, server_message="bad metadata"))
    with pytest.raises(error, match=message):
        push_to_hub(model_dir, "org/tiny-pruned", token="hf_secret")


def test_offline_or_unreachable_is_an_output_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OutputError, match="cannot push to the Hub in offline mode: unset HF_HUB_OFFLINE"):
        push_to_hub(model_dir, "org/tiny-pruned", token="hf_secret")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    Recorder(monkeypatch, fail=ConnectionError("Name or service not known"))
    with pytest.raises(OutputError, match=r"could not reach the Hugging Face Hub to push 'org/tiny-pruned' \("):
        push_to_hub(model_dir, "org/tiny-pruned", token="hf_secret")


def test_a_closed_port_is_unreachable_through_the_real_client(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a local port nobody listens on: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(OutputError, match=r"could not reach the Hugging Face Hub.*check the network connection"):
        push_to_hub(model_dir, "org/tiny-pruned", token="hf_secret")


def test_the_directory_and_the_repository_id_are_checked_first(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = Recorder(monkeypatch)
    with pytest.raises(ModelLoadError, match="is not a directory"):
        push_to_hub(tmp_path / "missing", "org/x", token="t")
    with pytest.raises(ModelLoadError, match=r"has no config\.json, so it is not a model directory"):
        push_to_hub(tmp_path, "org/x", token="t")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="holds no weight files"):
        push_to_hub(tmp_path, "org/x", token="t")
    (tmp_path / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"has no README\.md model card: prunekit commands write one with the model"):
        push_to_hub(tmp_path, "org/x", token="t")
    with pytest.raises(ConfigError, match="is not a Hub repository id: use ORG/NAME"):
        push_to_hub(model_dir, "org/bad name", token="t")
    with pytest.raises(ConfigError, match="names no owner: use ORG/NAME"):
        push_to_hub(model_dir, "tiny", token="t")
    assert hub.calls == []


def test_a_card_with_a_local_base_model_is_pushed_with_a_warning(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "local"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    write_model_card(ModelCard(str(tmp_path / "my-model"), "wanda", "2:4", "Pruned."), folder)
    hub = Recorder(monkeypatch)
    assert push_to_hub(folder, "org/x", token="t") == URL
    assert "is a local path, not a Hub id" in caplog.text
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]


def test_prune_with_push_to_hub_uploads_the_written_output(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = Recorder(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    out = tmp_path / "out"
    argv = ["-q", "prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)]
    assert main([*argv, "--push-to-hub", "org/tiny-pruned"]) == 0
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[1][1]["folder_path"] == out and "README.md" in hub.uploaded and "config.json" in hub.uploaded


def test_push_to_hub_is_checked_before_the_pruning(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = Recorder(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "out"
    argv = ["-q", "prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.5"]
    assert main([*argv, "--out", str(out), "--push-to-hub", "org/tiny-pruned"]) == 2
    assert "not logged in" in capsys.readouterr().err and not out.exists() and hub.calls == []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    assert main([*argv, "--push-to-hub", "org/tiny-pruned"]) == 2  # nothing to upload without --out
    assert "pass --out DIR" in capsys.readouterr().err and hub.calls == []
    structured = ["-q", "structured", "--torchvision", "resnet18", "--out", str(out), "--push-to-hub", "org/x"]
    assert main(structured) == 2 and not out.exists()
    assert "uploads causal LMs" in capsys.readouterr().err
