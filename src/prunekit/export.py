"""Writing outputs safely: check the destination first, write into a temporary sibling, then rename.

The result is an ordinary ``save_pretrained`` directory (with the tokenizer) that plain
``transformers.AutoModelForCausalLM.from_pretrained`` loads; prunekit is not needed to use it. With
``save_format`` other than ``dense`` the sparse layers are stored compressed (see :mod:`prunekit.checkpoints`);
:func:`prunekit.models.loading.load_model` reads those back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.checkpoints import DENSE, plan_compression, save_compressed
from prunekit.errors import OutputError


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty directory (unless ``overwrite``) or an unwritable parent, before any work."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} exists and is a file: choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output directory {str(out)!r} exists and is not empty: choose another or pass --overwrite")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"cannot create {str(out)!r}: {str(parent)!r} is a file, not a directory: choose another output path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write under {str(parent)!r} (permission denied): choose a writable location")
    return out


def write_atomically(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path``; nothing is left behind on failure."""
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_pretrained(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
    save_format: str = DENSE,
) -> Path:
    """Save a model (safetensors) and its tokenizer atomically; ``extra(dir)`` may add files (a report).

    ``save_format``: ``dense`` (plain), ``compressed`` (the best sparse format for the weights),
    ``sparse-bitmask`` or ``sparse-24`` / ``sparse-24-bitmask``; see :func:`prunekit.checkpoints.plan_compression`.
    The format is chosen (and a mismatch refused) before anything is written.
    """
    check_output_dir(path, overwrite)
    plan = plan_compression(model, save_format)

    def write(tmp: Path) -> None:
        if plan.format == DENSE:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_compressed(model, tmp, plan)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    return write_atomically(path, write, overwrite)
