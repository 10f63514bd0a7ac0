"""Extracting the CIFAR-10 JPEG archive safely and atomically (:func:`extract_cifar10`).

The data ships as ``cifar10-jpg.tar.gz`` in ImageFolder layout: ``train/<class>/NNNN.jpg`` (5,000 per class)
and ``test/<class>/NNNN.jpg`` (1,000 per class), 32x32 RGB (Krizhevsky 2009).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import uuid
from pathlib import Path, PurePosixPath

from prunekit.core.errors import CalibrationError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")

__all__ = ["SPLITS", "extract_cifar10"]


def _is_extracted(root: Path) -> bool:
    return all((root / split).is_dir() for split in SPLITS)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or name.is_absolute() or ".." in name.parts:
        raise CalibrationError(f"archive {str(archive)!r} has an unsafe path {member.name!r}: refusing to extract it")
    if not (member.isfile() or member.isdir()):
        raise CalibrationError(
            f"archive {str(archive)!r} has {member.name!r}, which is not a plain file or folder (a link or a "
            "device): refusing to extract it"
        )


def extract_cifar10(archive: str | Path, dest: str | Path) -> Path:
    """Extract the CIFAR-10 JPEG archive into ``dest`` (which then holds ``train/`` and ``test/``); return it.

    Safe: every member is checked first (no absolute paths, no ``..``, only plain files and folders; Python's
    ``"data"`` extraction filter on top). Atomic: extraction goes to a temporary sibling folder that is renamed
    to ``dest`` only once complete, so a failure leaves nothing behind. An existing extraction at ``dest`` is
    reused without reading the archive.
    """
    archive, dest = Path(archive).expanduser(), Path(dest).expanduser()
    if _is_extracted(dest):
        log.info("reusing the CIFAR extraction at %s", dest)
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CalibrationError(
            f"{str(dest)!r} exists but is not a CIFAR extraction (no train/ and test/ folders): remove it or pick "
            "another destination"
        )
    if not archive.is_file():
        raise CalibrationError(
            f"CIFAR archive {str(archive)!r} not found: pass the path of cifar10-jpg.tar.gz (../shared/data/)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, archive)
                log.info("extracting %d entries of %s", len(members), archive)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: the stdlib's own checks too
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - older Pythons; the members were checked above
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CalibrationError(f"cannot read the archive {str(archive)!r}: {exc}") from exc
        if not _is_extracted(tmp):
            raise CalibrationError(
                f"archive {str(archive)!r} does not have the layout train/<class>/*.jpg and test/<class>/*.jpg"
            )
        if dest.is_dir():
            dest.rmdir()  # empty (checked above)
        try:
            tmp.rename(dest)
        except OSError:
            if not _is_extracted(dest):  # not a concurrent extraction that won the race
                raise
            log.info("another process extracted %s first; using it", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
