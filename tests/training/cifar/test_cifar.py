"""CIFAR folders (a fake archive built here), augmentation on hand-made tensors, and the CIFAR models."""

import io
import tarfile
from pathlib import Path

import pytest
import torch
import torch.fx

from prunekit.core.errors import CalibrationError, ConfigError
from prunekit.training.cifar import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CifarFolder,
    augment,
    extract_cifar10,
    iterate_batches,
    list_images,
    load_cifar10,
    load_split,
    normalize,
    pad_crop,
    random_crop,
    random_hflip,
)
from prunekit.training.cifar import data as cifar  # the module whose decode_images load_split calls
from prunekit.training.cifar.models import CifarResNet, CifarVGG, resnet20, resnet32, resnet56, vgg11, vgg16

SHARED_ARCHIVE = Path(__file__).resolve().parents[4] / "shared" / "data" / "cifar10-jpg.tar.gz"
COLORS = {"dog": (200, 30, 30), "airplane": (20, 40, 220), "cat": (30, 180, 60)}  # written in this order


def _jpeg(color, shade):
    from PIL import Image

    img = Image.new("RGB", (32, 32), color)
    img.putpixel((shade, shade), (255, 255, 255))  # makes every file distinct
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tar, name, data=None, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
        tar.addfile(info)
    else:
        data = data or b""
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_archive(tmp_path):
    """train/<class>/000{0,1}.jpg and test/<class>/0000.jpg for three classes, as in the shared archive."""
    path = tmp_path / "fake-cifar.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 2), ("test", 1)):
            _add(tar, f"{split}/", kind=tarfile.DIRTYPE)
            for name, color in COLORS.items():
                _add(tar, f"{split}/{name}/", kind=tarfile.DIRTYPE)
                for i in range(count):
                    _add(tar, f"{split}/{name}/{i:04d}.jpg", _jpeg(color, i + (3 if split == "test" else 0)))
    return path


def _bad_archive(path, add):
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "train/a/0000.jpg", _jpeg((1, 2, 3), 0))
        _add(tar, "test/a/0000.jpg", _jpeg((1, 2, 3), 0))
        add(tar)
    return path


# ------------------------------------------------------------------------------------------------ extraction


def test_extract_load_shapes_labels_and_class_order(fake_archive, tmp_path):
    dest = extract_cifar10(fake_archive, tmp_path / "cifar")
    assert dest == tmp_path / "cifar" and (dest / "train").is_dir() and (dest / "test").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cifar")]  # no temporary folder left
    train = CifarFolder(dest, "train")
    assert train.classes == ("airplane", "cat", "dog")  # sorted folder names, not archive order
    assert len(train) == 6
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [p.relative_to(dest).as_posix() for p in train.paths[:2]] == [
        "train/airplane/0000.jpg",
        "train/airplane/0001.jpg",
    ]
    image, label = train[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == 2
    # JPEG is lossy: the dog's red is there up to a few levels.
    center = image[:, 16, 16].int()
    assert (center - torch.tensor(COLORS["dog"])).abs().max() <= 6
    assert len(CifarFolder(dest, "test", classes=("airplane", "cat", "dog"))) == 3


def test_an_existing_extraction_is_reused_without_the_archive(fake_archive, tmp_path):
    dest = extract_cifar10(fake_archive, tmp_path / "cifar")
    fake_archive.unlink()
    assert extract_cifar10(fake_archive, dest) == dest


@pytest.mark.parametrize(
    ("name", "add"),
    [
        ("dotdot", lambda tar: _add(tar, "../evil.txt", b"x")),
        ("nested-dotdot", lambda tar: _add(tar, "train/../../evil.txt", b"x")),
        ("absolute", lambda tar: _add(tar, "/tmp/evil.txt", b"x")),
        ("symlink", lambda tar: _add(tar, "train/a/link.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd")),
    ],
)
def test_unsafe_archives_are_refused_and_leave_nothing(tmp_path, name, add):
    archive = _bad_archive(tmp_path / f"{name}.tar.gz", add)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CalibrationError, match="refusing"):
        extract_cifar10(archive, work / "cifar")
    assert list(work.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_missing_archive_wrong_layout_and_occupied_destination(tmp_path, fake_archive):
    with pytest.raises(CalibrationError, match="not found"):
        extract_cifar10(tmp_path / "nope.tar.gz", tmp_path / "out")
    no_test = tmp_path / "no-test.tar.gz"
    with tarfile.open(no_test, "w:gz") as tar:
        _add(tar, "train/a/0000.jpg", _jpeg((1, 2, 3), 0))
    with pytest.raises(CalibrationError, match="layout"):
        extract_cifar10(no_test, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "something").write_text("x")
    with pytest.raises(CalibrationError, match="not a CIFAR extraction"):
        extract_cifar10(fake_archive, occupied)


def test_folder_layout_errors(tmp_path, fake_archive):
    with pytest.raises(CalibrationError, match="not found"):
        list_images(tmp_path / "missing", "train")
    dest = extract_cifar10(fake_archive, tmp_path / "cifar")
    with pytest.raises(CalibrationError, match="valid"):
        list_images(dest, "valid")
    with pytest.raises(CalibrationError, match="differ"):
        list_images(dest, "train", classes=CIFAR10_CLASSES)
    (dest / "train" / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        list_images(dest, "train")


# ------------------------------------------------------------------------------------------------------ cache


def test_cache_round_trips_bit_exactly_and_is_reused(fake_archive, tmp_path, monkeypatch):
    dest = extract_cifar10(fake_archive, tmp_path / "cifar")
    decoded = load_split(dest, "train", progress=False)
    first = load_split(dest, "train", cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("train-*.safetensors"))) == 1
    assert first.images.shape == (6, 3, 32, 32) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, decoded.images) and torch.equal(first.labels, decoded.labels)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cifar, "decode_images", no_decoding)
    again = load_split(dest, "train", cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(again.images, decoded.images) and torch.equal(again.labels, decoded.labels)
    assert again.classes == ("airplane", "cat", "dog")
    folder = CifarFolder(dest, "train", cache_dir=tmp_path / "cache")  # from the tensor
    assert folder.images is not None
    assert torch.equal(folder[3][0], decoded.images[3]) and folder[3][1] == 1


def test_load_cifar10_extracts_once_and_decodes_both_splits(fake_archive, tmp_path):
    train, test = load_cifar10(fake_archive, tmp_path / "cifar", cache_dir=tmp_path / "cache", classes=None)
    assert (len(train), len(test)) == (6, 3) and train.classes == test.classes == ("airplane", "cat", "dog")
    assert test.labels.tolist() == [0, 1, 2]
    with pytest.raises(CalibrationError, match="differ"):  # the default checks for the ten CIFAR-10 classes
        load_cifar10(fake_archive, tmp_path / "cifar")


def test_per_file_items_equal_the_decoded_tensor(fake_archive, tmp_path):
    dest = extract_cifar10(fake_archive, tmp_path / "cifar")
    lazy, eager = CifarFolder(dest, "test"), CifarFolder(dest, "test", preload=True)
    for i in range(len(lazy)):
        assert torch.equal(lazy[i][0], eager[i][0]) and lazy[i][1] == eager[i][1] == i


# ------------------------------------------------------------------------------------------------ augmentation


def test_pad_crop_on_a_hand_made_tensor():
    x = (torch.arange(16) + 1).view(1, 1, 4, 4)  # 1..16, so the zero padding shows
    assert torch.equal(pad_crop(x, torch.tensor([[1, 1]]), 1), x)  # centred: unchanged
    assert pad_crop(x, torch.tensor([[0, 0]]), 1)[0, 0].tolist() == [
        [0, 0, 0, 0],
        [0, 1, 2, 3],
        [0, 5, 6, 7],
        [0, 9, 10, 11],
    ]
    assert pad_crop(x, torch.tensor([[2, 2]]), 1)[0, 0].tolist() == [
        [6, 7, 8, 0],
        [10, 11, 12, 0],
        [14, 15, 16, 0],
        [0, 0, 0, 0],
    ]
    assert pad_crop(x, torch.tensor([[0, 2]]), 1)[0, 0].tolist() == [
        [0, 0, 0, 0],
        [2, 3, 4, 0],
        [6, 7, 8, 0],
        [10, 11, 12, 0],
    ]
    # Two images, two channels: each image gets its own offset, channels move together.
    two = torch.stack([torch.cat([x[0], x[0] + 100]), torch.cat([x[0], x[0] + 100])])
    out = pad_crop(two, torch.tensor([[1, 1], [2, 2]]), 1)
    assert torch.equal(out[0], two[0])
    assert out[1, 1, 0].tolist() == [106, 107, 108, 0]


def test_flip_and_normalize_by_hand():
    x = torch.tensor([[[[1, 2, 3]]]], dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert random_hflip(x, g, p=1.0)[0, 0, 0].tolist() == [3, 2, 1]
    assert random_hflip(x, g, p=0.0)[0, 0, 0].tolist() == [1, 2, 3]
    pixels = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = normalize(pixels)
    for c in range(3):
        assert out[0, c, 0].tolist() == pytest.approx(
            [(0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c], (1 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]], rel=1e-6
        )


def test_augmentation_is_reproducible_and_is_crop_then_flip_then_normalize():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    a = augment(images, torch.Generator().manual_seed(11))
    b = augment(images, torch.Generator().manual_seed(11))
    assert a.dtype == torch.float32 and a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, augment(images, torch.Generator().manual_seed(12)))
    # Replay the draws: crop offsets (N, 2) in [0, 8], then one flip draw per image.
    g = torch.Generator().manual_seed(11)
    offsets = torch.randint(0, 9, (5, 2), generator=g)
    flips = torch.rand(5, generator=g) < 0.5
    expected = pad_crop(images, offsets, 4)
    expected = torch.where(flips[:, None, None, None], expected.flip(-1), expected)
    assert torch.equal(a, normalize(expected))
    assert torch.equal(random_crop(images, torch.Generator().manual_seed(11)), pad_crop(images, offsets, 4))


def test_batch_iterator_covers_every_example_once_and_is_seeded():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    labels = torch.arange(6)
    batches = list(iterate_batches(images, labels, 4, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [4, 2]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(6))
    for x, y in batches:  # images still match their labels after shuffling
        assert torch.equal(x, normalize(images[y]))
    again = list(iterate_batches(images, labels, 4, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(batches, again, strict=True))
    assert [len(y) for _, y in iterate_batches(images, labels, 4, shuffle=False, drop_last=True)] == [4]
    ordered = list(iterate_batches(images, labels, 6, shuffle=False))
    assert ordered[0][1].tolist() == list(range(6))
    aug1 = [
        x for x, _ in iterate_batches(images, labels, 3, generator=torch.Generator().manual_seed(5), train_augment=True)
    ]
    aug2 = [
        x for x, _ in iterate_batches(images, labels, 3, generator=torch.Generator().manual_seed(5), train_augment=True)
    ]
    assert all(torch.equal(u, v) for u, v in zip(aug1, aug2, strict=True))
    with pytest.raises(ConfigError, match="Generator"):
        next(iterate_batches(images, labels, 2))


# ---------------------------------------------------------------------------------------------------- models


def test_resnet20_parameter_count_by_hand():
    conv = lambda cin, cout, k=3: cin * cout * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    stem = conv(3, 16) + bn(16)  # 432 + 32
    stage1 = 6 * (conv(16, 16) + bn(16))  # three blocks of two convs
    stage2 = conv(16, 32) + 5 * conv(32, 32) + 6 * bn(32)
    stage3 = conv(32, 64) + 5 * conv(64, 64) + 6 * bn(64)
    fc = 64 * 10 + 10
    option_a = stem + stage1 + stage2 + stage3 + fc
    option_b = option_a + conv(16, 32, 1) + bn(32) + conv(32, 64, 1) + bn(64)  # two 1x1 projections
    assert option_a == 269_722 and option_b == 272_474  # "0.27M" (He et al. 2016, Table 6)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(resnet20()) == option_b
    assert count(resnet20(shortcut="A")) == option_a
    assert count(resnet32(shortcut="A")) == 464_154 and count(resnet56(shortcut="A")) == 853_018  # 0.46M, 0.85M


def test_vgg_parameter_counts_by_hand():
    conv = lambda cin, cout: cin * cout * 9  # noqa: E731
    plan11 = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    plan16 = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
    plan16 += [(256, 512)] + [(512, 512)] * 5
    for model, plan in ((vgg11(), plan11), (vgg16(), plan16)):
        expected = sum(conv(i, o) + 2 * o for i, o in plan) + 512 * 10 + 10
        assert sum(p.numel() for p in model.parameters()) == expected
    assert expected == 14_724_042


@pytest.mark.parametrize(
    "build",
    [
        resnet20,
        lambda: resnet20(shortcut="A"),
        lambda: resnet32(width=8),
        lambda: vgg11(width=16),
        lambda: vgg16(width=8),
    ],
)
def test_models_give_n_by_classes_and_trace(build):
    model = build().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (2, 10)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), out)


def test_model_options():
    assert resnet20(num_classes=100)(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    assert resnet20(width=8).fc.in_features == 32
    with pytest.raises(ConfigError):
        CifarResNet(21)
    with pytest.raises(ConfigError):
        CifarVGG(13)


# ------------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason="the shared CIFAR archive is not present")
def test_the_shared_archive(tmp_path):
    dest = extract_cifar10(SHARED_ARCHIVE, tmp_path / "cifar10")
    paths, _, classes = list_images(dest, "train")
    assert classes == CIFAR10_CLASSES and len(paths) == 50_000
    test = load_split(dest, "test", classes=CIFAR10_CLASSES, cache_dir=tmp_path / "cache", progress=False)
    assert test.images.shape == (10_000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    again = load_split(dest, "test", classes=CIFAR10_CLASSES, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(again.images, test.images)
