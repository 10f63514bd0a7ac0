"""CIFAR-10 for experiments: the JPEG archive (:mod:`.archive`), its folders, decoding and tensor cache
(:mod:`.data`), the standard augmentation with CIFAR-10's statistics (:mod:`.augment`) and the CIFAR ResNets and
VGGs (:mod:`.models`; He et al. 2016, Simonyan & Zisserman 2015). The generic training loop imports none of
this: pass :func:`~prunekit.training.cifar.augment.augment`-style transforms to it, or rely on its
configuration's defaults."""

from prunekit.training.cifar.archive import extract_cifar10
from prunekit.training.cifar.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    augment,
    iterate_batches,
    normalize,
    pad_crop,
    random_crop,
    random_hflip,
)
from prunekit.training.cifar.data import (
    CIFAR10_CLASSES,
    CifarFolder,
    ImageSet,
    decode_images,
    list_images,
    load_cifar10,
    load_split,
)

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
