"""CIFAR-10 from the shared JPEG folders, without torchvision: the folder listing, decoding, a Dataset and a
tensor cache (extraction is :mod:`~prunekit.training.cifar.archive`, augmentation
:mod:`~prunekit.training.cifar.augment`).

The data ships as ``cifar10-jpg.tar.gz`` in ImageFolder layout: ``train/<class>/NNNN.jpg`` (5,000 per class)
and ``test/<class>/NNNN.jpg`` (1,000 per class), 32x32 RGB (Krizhevsky 2009; JPEG-recompressed, so accuracy
runs a little below figures on the original release). Class indices follow the sorted folder names, which for
CIFAR-10 is the canonical label order (airplane=0 ... truck=9); images within a class follow sorted file
names.

Decoding 50,000 JPEGs takes a while on two cores, so :func:`load_split` can decode a split once into a
``uint8`` tensor ``(N, 3, H, W)`` saved with safetensors under a cache directory (keyed by the file list, sizes
and modification times) and reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from prunekit.core.errors import CalibrationError
from prunekit.training.cifar.archive import extract_cifar10

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_FORMAT = "prunekit-imagefolder-v1"

__all__ = [
    "CIFAR10_CLASSES",
    "CifarFolder",
    "ImageSet",
    "decode_images",
    "list_images",
    "load_cifar10",
    "load_split",
]


def list_images(
    root: str | Path, split: str, classes: Sequence[str] | None = None
) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """The image files of ``root/split/<class>/`` with their labels and the class names.

    Classes are the sorted sub-folder names, or ``classes`` in the given order (then the folders must be
    exactly those). Images are sorted by class, then by file name. Missing folders, a split without class
    folders, or a class folder without images raise :class:`~prunekit.core.errors.CalibrationError`.
    """
    root = Path(root).expanduser()
    base = root / split
    if not root.is_dir():
        raise CalibrationError(
            f"image folder {str(root)!r} not found: extract the archive first (extract_cifar10(archive, dest))"
        )
    if not base.is_dir():
        raise CalibrationError(f"{str(base)!r} not found: expected the layout {root}/{split}/<class>/*.jpg")
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise CalibrationError(f"{str(base)!r} has no class folders: expected {base}/<class>/*.jpg")
    if classes is None:
        names = tuple(found)
    else:
        names = tuple(classes)
        if sorted(names) != found:
            missing, extra = sorted(set(names) - set(found)), sorted(set(found) - set(names))
            raise CalibrationError(
                f"{str(base)!r}: class folders differ from the expected ones (missing {missing}, unexpected {extra})"
            )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(p for p in (base / name).iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise CalibrationError(f"class folder {str(base / name)!r} has no images (*.jpg)")
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, labels, names


def _decode(path: Path) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except OSError as exc:
        raise CalibrationError(f"cannot decode the image {str(path)!r}: {exc}") from exc
    w, h = rgb.size
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def decode_images(paths: Sequence[Path], *, progress: bool = False) -> torch.Tensor:
    """Decode image files (PIL, converted to RGB) into one ``uint8`` tensor ``(N, 3, H, W)``.

    All images must have the same size (a :class:`~prunekit.core.errors.CalibrationError` names the first that
    does not).
    """
    from tqdm.auto import tqdm

    if not paths:
        raise CalibrationError("no images to decode")
    first = _decode(paths[0])
    out = torch.empty((len(paths), *first.shape), dtype=torch.uint8)
    out[0] = first
    for i, path in enumerate(tqdm(paths[1:], desc="decoding images", unit="img", disable=not progress), start=1):
        img = _decode(path)
        if img.shape != first.shape:
            raise CalibrationError(
                f"image {str(path)!r} is {tuple(img.shape[1:])} but {str(paths[0])!r} is {tuple(first.shape[1:])}: "
                "all images of a split must have the same size"
            )
        out[i] = img
    return out


@dataclass(frozen=True)
class ImageSet:
    """A decoded split: ``images`` ``uint8 (N, 3, H, W)``, ``labels`` ``int64 (N,)``, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _listing_key(root: Path, paths: Sequence[Path], labels: Sequence[int], classes: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps(list(classes)).encode())
    for path, label in zip(paths, labels, strict=True):
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_split(
    root: str | Path,
    split: str,
    *,
    classes: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ImageSet:
    """Decode every image of ``root/split`` into memory (see :func:`list_images` for the layout and order).

    With ``cache_dir``, the decoded tensors are saved there once as safetensors (written to a temporary file
    and renamed) and read back on later calls while the folder's file list, sizes and modification times are
    unchanged; the cache is bit-identical to decoding.
    """
    root = Path(root).expanduser()
    paths, labels, names = list_images(root, split, classes)
    if cache_dir is None:
        images = decode_images(paths, progress=progress)
        return ImageSet(images, torch.tensor(labels, dtype=torch.int64), names)

    from safetensors import safe_open
    from safetensors.torch import save_file

    key = _listing_key(root, paths, labels, names)
    cache = Path(cache_dir).expanduser() / f"{split}-{key[:20]}.safetensors"
    if cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") == key and meta.get("format") == _CACHE_FORMAT:
                log.info("reading decoded %s images from %s", split, cache)
                return ImageSet(f.get_tensor("images"), f.get_tensor("labels"), tuple(json.loads(meta["classes"])))
        log.warning("ignoring the stale cache %s", cache)
    log.info("decoding %d %s images once into %s", len(paths), split, cache)
    images = decode_images(paths, progress=progress)
    label_t = torch.tensor(labels, dtype=torch.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        meta = {"format": _CACHE_FORMAT, "key": key, "classes": json.dumps(list(names)), "split": split}
        save_file({"images": images.contiguous(), "labels": label_t}, str(tmp), metadata=meta)
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return ImageSet(images, label_t, names)


def load_cifar10(
    archive: str | Path,
    root: str | Path,
    *,
    cache_dir: str | Path | None = None,
    classes: Sequence[str] | None = CIFAR10_CLASSES,
    progress: bool = True,
) -> tuple[ImageSet, ImageSet]:
    """Extract ``archive`` into ``root`` once (:func:`extract_cifar10`) and decode both splits
    (:func:`load_split`, cached under ``cache_dir`` when given): returns ``(train, test)``.

    ``classes`` fixes the label order and checks the folders (the ten CIFAR-10 classes by default).
    """
    root = extract_cifar10(archive, root)
    train = load_split(root, "train", classes=classes, cache_dir=cache_dir, progress=progress)
    test = load_split(root, "test", classes=train.classes, cache_dir=cache_dir, progress=progress)
    return train, test


class CifarFolder(Dataset):
    """A ``torch.utils.data.Dataset`` over ``root/split/<class>/*.jpg`` read with PIL (no torchvision).

    Items are ``(image, label)`` with ``image`` a ``uint8`` tensor ``(3, H, W)``, passed through ``transform``
    when one is given. By default each item is decoded from its file; with ``cache_dir`` (or ``preload=True``)
    the whole split is decoded once (:func:`load_split`) and items come from the tensor. For CPU training,
    :func:`iterate_batches` over ``dataset.images`` is faster than a ``DataLoader``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        classes: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
        preload: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.root, self.split, self.transform = Path(root).expanduser(), split, transform
        self.paths, labels, self.classes = list_images(self.root, split, classes)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.images: torch.Tensor | None = None
        if cache_dir is not None or preload:
            data = load_split(self.root, split, classes=self.classes, cache_dir=cache_dir)
            self.images, self.labels = data.images, data.labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index] if self.images is not None else _decode(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
