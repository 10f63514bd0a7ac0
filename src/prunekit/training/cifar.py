"""CIFAR-10 from the shared JPEG folders, without torchvision: extraction, a Dataset, a tensor cache, the
standard augmentation as tensor functions, and a fast in-memory batch iterator for CPU training.

The data ships as ``cifar10-jpg.tar.gz`` in ImageFolder layout: ``train/<class>/NNNN.jpg`` (5,000 per class)
and ``test/<class>/NNNN.jpg`` (1,000 per class), 32x32 RGB (Krizhevsky 2009; JPEG-recompressed, so accuracy
runs a little below figures on the original release). Class indices follow the sorted folder names, which for
CIFAR-10 is the canonical label order (airplane=0 ... truck=9); images within a class follow sorted file
names.

Decoding 50,000 JPEGs takes a while on two cores, so :func:`load_split` can decode a split once into a
``uint8`` tensor ``(N, 3, H, W)`` saved with safetensors under a cache directory (keyed by the file list, sizes
and modification times) and reuse it. The standard augmentation of He et al. 2016 (Sec. 4.2: pad 4, random
32x32 crop, horizontal flip) and the per-channel normalisation are batch tensor functions that draw from an
explicit ``torch.Generator``, so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from prunekit.core.errors import CalibrationError, ConfigError

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
# Per-channel mean and standard deviation of the CIFAR-10 training pixels (in [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

SPLITS = ("train", "test")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_FORMAT = "prunekit-imagefolder-v1"

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CifarFolder",
    "ImageSet",
    "augment",
    "decode_images",
    "extract_cifar10",
    "iterate_batches",
    "list_images",
    "load_cifar10",
    "load_split",
    "normalize",
    "pad_crop",
    "random_crop",
    "random_hflip",
]


# ----------------------------------------------------------------------------------------------- extraction


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


# ---------------------------------------------------------------------------------------------- the folders


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


# --------------------------------------------------------------------------------------------- augmentation


def pad_crop(images: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad ``images`` ``(N, C, H, W)`` by ``padding`` on every side and cut an ``H x W`` window from
    each at ``offsets`` ``(N, 2)`` = (row, column) in the padded image, each in ``[0, 2 * padding]``.

    Offset ``(padding, padding)`` returns the image unchanged; ``(0, 0)`` shifts it down and right.
    """
    n, _, h, w = images.shape
    if offsets.shape != (n, 2):
        raise ValueError(f"offsets must be (N, 2) = ({n}, 2), got {tuple(offsets.shape)}")
    if padding == 0:
        return images.clone()
    offsets = offsets.to(images.device, torch.long)
    if bool(((offsets < 0) | (offsets > 2 * padding)).any()):
        raise ValueError(f"offsets must lie in [0, {2 * padding}]")
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    window = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (N, H, W, C)
    return window.permute(0, 3, 1, 2).contiguous()


def random_crop(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random ``H x W`` crop of each zero-padded image (He et al. 2016, Sec. 4.2: pad 4, crop 32).

    Offsets are drawn as ``torch.randint(0, 2 * padding + 1, (N, 2), generator=generator)`` on the CPU.
    """
    offsets = torch.randint(0, 2 * padding + 1, (images.shape[0], 2), generator=generator)
    return pad_crop(images, offsets, padding)


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p`` (drawn as ``torch.rand(N, generator=generator) < p``)."""
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel for ``uint8`` images (float images are taken to be in [0, 1]);
    returns float32 ``(N, C, H, W)``."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return (x - m) / s


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR training augmentation on a ``uint8`` batch: random crop (pad ``padding``), then
    horizontal flip, then normalisation (He et al. 2016, Sec. 4.2). Returns float32."""
    return normalize(random_hflip(random_crop(images, generator, padding), generator))


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    train_augment: bool = False,
    drop_last: bool = False,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(float32 normalised images, labels)`` from an in-memory ``uint8`` tensor, for CPU training.

    One epoch: a permutation from ``generator`` (when ``shuffle``), then per batch the crop and flip draws
    (when ``train_augment``), so the same generator state gives the same epoch. Call again for the next epoch.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if (shuffle or train_augment) and generator is None:
        raise ConfigError("shuffling and augmentation draw from a torch.Generator: pass generator=")
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and idx.numel() < batch_size:
            break
        x = images[idx.to(images.device)]
        if train_augment:
            assert generator is not None
            x = random_hflip(random_crop(x, generator), generator)
        yield normalize(x, mean, std), labels[idx.to(labels.device)]
