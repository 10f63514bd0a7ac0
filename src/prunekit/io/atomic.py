"""Atomic output: check the destination first, write into a temporary sibling, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from prunekit.core.errors import OutputError


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


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path`` (``os.replace``:
    atomic on POSIX). The file gets the mode of the one it replaces (``0o644`` for a new one). On failure the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.is_file() else 0o644  # mkstemp's 0o600 is for secrets
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
