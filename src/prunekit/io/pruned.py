"""Save a structurally pruned model and rebuild it from the original constructor, without pickle.

A pruned model no longer matches its class's constructor: ``resnet18()`` builds 64-channel convs, the
checkpoint holds 32. Saving therefore writes two files:

- ``model.safetensors``: the weights and buffers (:func:`safetensors.torch.save_model`, tied tensors once);
- ``prunekit_structure.json``: the shape of every parameter and buffer, the size attributes of every
  module (``in_features``, ``out_channels``, ``groups``, ``num_heads``... any public attribute that is an
  integer or a tuple of integers, which is where module code keeps its sizes), the modules that are
  ``nn.Identity`` (blocks removed by depth pruning, :mod:`~prunekit.structured.depth`) and those that are a
  :class:`~prunekit.models.dropped_attention.DroppedAttention` (attention drop);
- ``config.json`` for a transformers model (its ``config.save_pretrained``), so that
  :func:`prunekit.load_model` can rebuild it from the directory alone.

:func:`load_pruned` takes a freshly constructed, *unpruned* model (``torchvision.models.resnet18()``),
applies the saved attributes and shapes to it, and loads the weights with ``strict`` checking. Nothing is
unpickled and no code is run from the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from prunekit.core.errors import ModelLoadError
from prunekit.io.atomic import write_atomically
from prunekit.models.dropped_attention import DroppedAttention, refuse_save_pretrained, save_pretrained_refusal

STRUCTURE_FILE = "prunekit_structure.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _size_like(value: Any) -> bool:
    if type(value) is int:
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(type(v) is int for v in value)


def structure_of(model: nn.Module) -> dict[str, Any]:
    """Shapes of all parameters and buffers, and the integer attributes of all modules."""
    tensors = {name: list(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    attributes = {}
    for name, module in model.named_modules():
        sizes = {
            k: list(v) if isinstance(v, (tuple, list)) else v
            for k, v in vars(module).items()
            if not k.startswith("_") and _size_like(v)
        }
        if sizes:
            attributes[name] = sizes
    identities = [name for name, module in model.named_modules() if name and isinstance(module, nn.Identity)]
    dropped = [name for name, module in model.named_modules() if isinstance(module, DroppedAttention)]
    return {
        "format": FORMAT_VERSION,
        "class": type(model).__qualname__,
        "tensors": tensors,
        "attributes": attributes,
        "identities": identities,
        "dropped_attention": dropped,
        "save_pretrained_refused": save_pretrained_refusal(model),
    }


def write_pruned(model: nn.Module, folder: Path) -> None:
    """Write ``model``'s weights, structure and (for a transformers model) config into the existing
    ``folder``, as they are; :func:`save_pruned` is the atomic way, for a folder of its own."""
    save_model(model, str(folder / WEIGHTS_FILE))
    (folder / STRUCTURE_FILE).write_text(json.dumps(structure_of(model), indent=1))
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(folder)


def save_pruned(model: nn.Module, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``model``'s weights and structure into ``directory`` (new or empty unless ``overwrite``),
    atomically: into a temporary sibling that is then renamed."""
    return write_atomically(directory, lambda tmp: write_pruned(model, tmp), overwrite)


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent: nn.Module | None = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if parent is None or not isinstance(getattr(parent, attr, None), nn.Module):
        raise ModelLoadError(f"the checkpoint removed a module {name!r} that the given model lacks")
    setattr(parent, attr, replacement)


def load_pruned(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Turn ``model`` (freshly built by the original constructor) into the saved pruned model, in place,
    and return it."""
    folder = Path(directory)
    structure_path = folder / STRUCTURE_FILE
    if not structure_path.is_file():
        raise ModelLoadError(f"{folder} has no {STRUCTURE_FILE}: it was not written by prunekit.save_pruned")
    structure = json.loads(structure_path.read_text())
    if structure.get("format") != FORMAT_VERSION:
        raise ModelLoadError(f"{structure_path} has format {structure.get('format')}, expected {FORMAT_VERSION}")
    if structure.get("class") != type(model).__qualname__:
        raise ModelLoadError(
            f"the checkpoint was saved from a {structure.get('class')}, not a {type(model).__qualname__}: build the "
            "model with the constructor it was pruned from"
        )
    # removed modules first: their tensors and attributes go with them
    for name in structure.get("identities", []):
        _replace(model, name, nn.Identity())
    for name in structure.get("dropped_attention", []):
        _replace(model, name, DroppedAttention(structure["attributes"][name]["hidden_size"]))
    if structure.get("save_pretrained_refused"):
        refuse_save_pretrained(model, structure["save_pretrained_refused"])
    elif structure.get("dropped_attention"):  # saved before the reason was recorded
        refuse_save_pretrained(model)
    modules = dict(model.named_modules())
    for name, sizes in structure["attributes"].items():
        module = modules.get(name)
        if module is None:
            raise ModelLoadError(f"the checkpoint has a module {name!r} that the given model lacks")
        for key, value in sizes.items():
            current = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(current, tuple) else value)
    current = model.state_dict(keep_vars=True)
    missing = set(structure["tensors"]) ^ set(current)
    if missing:
        raise ModelLoadError(f"the checkpoint and the model disagree on tensors: {sorted(missing)[:5]}")
    resized: dict[int, torch.Tensor] = {}
    for name, shape in structure["tensors"].items():
        tensor = current[name]
        if list(tensor.shape) == shape:
            continue
        module_name, _, attr = name.rpartition(".")
        owner = modules[module_name]
        if id(tensor) not in resized:
            empty = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            resized[id(tensor)] = (
                nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
            )
        if attr in owner._parameters:
            owner._parameters[attr] = resized[id(tensor)]
        else:
            owner._buffers[attr] = resized[id(tensor)]
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    return model
