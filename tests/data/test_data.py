"""Data sets, transforms and subsets: all on small files the tests write themselves (no network)."""

import gzip
import inspect
import os
import pickle
import struct
import urllib.error
import warnings
import zlib
from pathlib import Path

import captcha.image
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import mtl.data.captcha_chars as captcha_module
from mtl.core.errors import UserError
from mtl.data import DATASETS, IMAGENET_MEAN, IMAGENET_STD, build_transforms, subset_per_class
from mtl.data.tensor_dataset import TensorImageDataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def build(name, **kwargs):
    return DATASETS.get(name)(**kwargs)


def user_error(match, fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting a one-line UserError whose message matches ``match``; return the message."""
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def save_image(path: Path, array=None, mode="RGB", size=(20, 16), fmt=None, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        rng = np.random.default_rng(seed)
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path, format=fmt)
    return path


def make_layout(root: Path, counts: dict) -> Path:
    """``counts = {"train": {"ants": 3, ...}, "val": {...}}`` -> root/<split>/<class>/<i>.jpg|png."""
    for split, classes in counts.items():
        for name, n in classes.items():
            for i in range(n):
                save_image(root / split / name / f"{i}.{'jpg' if i % 2 else 'png'}", seed=i)
    return root


# --- folder ------------------------------------------------------------------------------------------------------


def test_folder_classes_lengths_and_items(tmp_path):
    root = make_layout(tmp_path, {"train": {"bees": 2, "ants": 3}, "val": {"ants": 1, "bees": 2}})
    (root / "train" / "ants" / "notes.txt").write_text("not an image")
    (root / "train" / "ants" / "._0.jpg").write_bytes(b"macOS sidecar")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    train = build("folder", split="train", root=str(root), transform=build_transforms(train=True, image_size=24))
    val = build("folder", split="val", root=str(root), transform=build_transforms(train=False, image_size=24))
    assert train.classes == val.classes == ["ants", "bees"]
    assert (len(train), len(val)) == (5, 3)
    assert train.labels.tolist() == [0, 0, 0, 1, 1] and val.labels.tolist() == [0, 1, 1]
    assert train.skipped == []
    item = train[4]
    assert set(item) == {"image", "label"}
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.long and item["label"].ndim == 0 and int(item["label"]) == 1
    assert val[0]["image"].shape == (3, 24, 24)


def test_folder_without_transform_gives_unnormalised_float(tmp_path):
    root = make_layout(tmp_path, {"train": {"a": 1}})
    image = build("folder", root=root)[0]["image"]
    assert image.shape == (3, 16, 20) and 0 <= image.min() and image.max() <= 1


def test_folder_skips_corrupt_files_with_one_warning(tmp_path):
    root = make_layout(tmp_path, {"train": {"a": 3, "b": 2}})
    save_image(tmp_path / "whole.jpg", size=(64, 64))
    data = (tmp_path / "whole.jpg").read_bytes()
    (root / "train" / "a" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "train" / "a" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build("folder", root=root)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 3 of 8" in message and "truncated.jpg" in message and "\n" not in message
    assert len(ds) == 5
    assert sorted(Path(p).name for p in ds.skipped) == ["empty.png", "random.jpg", "truncated.jpg"]
    assert all(ds[i]["image"].shape[0] == 3 for i in range(len(ds)))


def test_folder_without_verify_keeps_every_file(tmp_path):
    root = make_layout(tmp_path, {"train": {"a": 2}})
    (root / "train" / "a" / "random.jpg").write_bytes(b"garbage")
    assert len(build("folder", root=root, verify=False)) == 3


def test_folder_all_corrupt_is_a_user_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "x.jpg").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipped 2"):
        user_error("none of the 2 images", build, "folder", root=tmp_path)


def test_folder_class_with_only_corrupt_images_is_a_user_error(tmp_path):
    root = make_layout(tmp_path, {"train": {"a": 2}})
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipped 1"):
        user_error(r"train/b hold no readable images", build, "folder", root=root)


def test_folder_load_time_failure_warns_once_and_substitutes(tmp_path):
    root = make_layout(tmp_path, {"train": {"a": 2, "b": 2}})
    ds = build("folder", root=root)
    Path(ds.samples[1][0]).write_bytes(b"broken after the scan")
    with pytest.warns(UserWarning, match="could not read image"):
        item = ds[1]
    assert item["image"].shape[0] == 3 and int(item["label"]) == ds.samples[2][1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[1]


def write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot save one)."""
    h, w, _ = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_folder_loads_every_image_mode_as_rgb(tmp_path):
    d = tmp_path / "train" / "a"
    save_image(d / "grey.png", mode="L")
    save_image(d / "rgba.png", mode="RGBA")
    save_image(d / "la.png", mode="LA")
    save_image(d / "cmyk.jpg", mode="CMYK")
    save_image(d / "bilevel.png", mode="1")
    save_image(d / "palette.gif", mode="P", fmt="GIF")  # not an IMG_EXTENSION: ignored
    palette = Image.new("P", (20, 16))
    palette.info["transparency"] = 0
    palette.save(d / "palette.png")
    Image.fromarray(np.full((16, 20), 32768, dtype=np.uint16)).save(d / "grey16.png")
    write_png16(d / "rgb16.png", np.full((16, 20, 3), 65535, dtype=np.uint16))
    ds = build("folder", root=tmp_path)
    assert ds.skipped == [] and len(ds) == 8
    from mtl.data.image_files import load_rgb

    for path, _ in ds.samples:
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (20, 16), path
        assert ds[ds.samples.index((path, 0))]["image"].shape == (3, 16, 20)
    assert np.asarray(load_rgb(str(d / "grey16.png"))).mean() == pytest.approx(128, abs=1)
    assert np.asarray(load_rgb(str(d / "rgb16.png"))).min() == 255


def test_folder_layout_errors_name_the_problem(tmp_path):
    user_error("needs data.root", build, "folder", root=None)
    user_error("does not exist", build, "folder", root=tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    user_error("no class folders in", build, "folder", root=tmp_path)
    (tmp_path / "train" / "ants").mkdir()
    message = user_error("hold no images", build, "folder", root=tmp_path)
    assert str(tmp_path / "train" / "ants") in message
    make_layout(tmp_path, {"train": {"ants": 2, "bees": 2}})
    message = user_error("split folder .*val does not exist", build, "folder", split="val", root=tmp_path)
    assert "found: train" in message
    make_layout(tmp_path, {"val": {"ants": 1, "wasps": 1}})
    message = user_error("differ", build, "folder", split="val", root=tmp_path)
    assert "in train but not in val: bees" in message and "in val but not in train: wasps" in message


def test_folder_val_without_train_is_a_user_error(tmp_path):
    make_layout(tmp_path, {"val": {"a": 1}})
    user_error(r"split folder .*train does not exist \(found: val\)", build, "folder", split="val", root=tmp_path)


def test_folder_val_fraction_splits_each_class_at_random(tmp_path):
    make_layout(tmp_path, {".": {"cats": 10, "dogs": 5}})
    train = build("folder", split="train", root=tmp_path, val_fraction=0.2, split_seed=1)
    val = build("folder", split="val", root=tmp_path, val_fraction=0.2, split_seed=1)
    assert train.classes == val.classes == ["cats", "dogs"]
    assert torch.bincount(train.labels).tolist() == [8, 4] and torch.bincount(val.labels).tolist() == [2, 1]
    paths = [p for p, _ in train.samples + val.samples]
    assert len(set(paths)) == 15
    again = build("folder", split="val", root=tmp_path, val_fraction=0.2, split_seed=1)
    other = build("folder", split="val", root=tmp_path, val_fraction=0.2, split_seed=2)
    assert again.samples == val.samples and other.samples != val.samples
    user_error("no split 'test'", build, "folder", split="test", root=tmp_path, val_fraction=0.2)
    user_error(r"in \[0, 1\)", build, "folder", root=tmp_path, val_fraction=1.0)
    make_layout(tmp_path, {".": {"birds": 1}})
    user_error("birds has only one image", build, "folder", root=tmp_path, val_fraction=0.2)


# --- transforms ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_transforms_output_size_for_pil_and_uint8_tensors(train):
    t = build_transforms(train=train, image_size=24, resize_size=28)
    inputs = [
        Image.new("RGB", (50, 40), (10, 20, 30)),
        Image.new("L", (50, 40), 100),
        torch.zeros(1, 28, 28, dtype=torch.uint8),
        torch.zeros(3, 33, 29, dtype=torch.uint8),
    ]
    for x in inputs:
        out = t(x)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_eval_transform_normalises_and_no_augment_matches_eval():
    mean_rgb = tuple(round(m * 255) for m in IMAGENET_MEAN)
    out = build_transforms(train=False, image_size=8, resize_size=8)(Image.new("RGB", (10, 10), mean_rgb))
    assert out.abs().max() < 0.02
    x = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    plain = build_transforms(train=True, augment=False, image_size=16, resize_size=20)
    assert torch.equal(plain(x), build_transforms(train=False, image_size=16, resize_size=20)(x))
    assert len(IMAGENET_STD) == 3


def test_random_crop_augmentation_and_unknown_names():
    pad_crop = build_transforms(train=True, augment="random_crop", image_size=32, resize_size=32, crop_padding=4)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    outs = [pad_crop(white) for _ in range(10)]
    assert all(o.shape == (3, 32, 32) for o in outs) and any(o.min() < o.max() for o in outs)  # padding shows
    small = build_transforms(train=True, augment="random_crop", image_size=40, resize_size=32)
    assert small(Image.new("RGB", (9, 9))).shape == (3, 40, 40)
    assert torch.equal(
        build_transforms(train=True, augment="none")(Image.new("RGB", (300, 260))),
        build_transforms(train=False)(Image.new("RGB", (300, 260))),
    )
    user_error("unknown augmentation 'flip'", build_transforms, train=True, augment="flip")


# --- subsets -------------------------------------------------------------------------------------------------------


def tensor_dataset(counts=(10, 7, 12)):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1).expand(-1, 4, 4).contiguous()
    return TensorImageDataset(images, labels, [f"c{c}" for c in range(len(counts))])


def test_subset_per_class_is_balanced_deterministic_and_keeps_classes():
    ds = tensor_dataset()
    a, b, c = (subset_per_class(ds, 5, seed) for seed in (0, 0, 1))
    assert a.indices == b.indices and a.indices != c.indices
    assert a.classes == ds.classes and len(a) == 15
    assert torch.bincount(a.labels).tolist() == [5, 5, 5]
    assert [int(a[i]["label"]) for i in range(len(a))] == a.labels.tolist()
    assert torch.bincount(subset_per_class(a, 2, 0).labels).tolist() == [2, 2, 2]


def test_subset_per_class_errors_and_fallback_without_labels():
    message = user_error("labels_per_class=8 but 1 class", subset_per_class, tensor_dataset(), 8, 0)
    assert "'c1' has 7" in message
    user_error("at least 1", subset_per_class, tensor_dataset(), 0, 0)

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 2, 2), "label": torch.tensor(i % 2)}

    sub = subset_per_class(Plain(), 2, 0)
    assert sub.classes == ["0", "1"] and torch.bincount(sub.labels).tolist() == [2, 2]


# --- captcha_chars and shapes --------------------------------------------------------------------------------------

CAPTCHA = dict(charset="A7x", per_class=4, val_per_class=2, size=24)


def test_captcha_chars_is_deterministic_per_seed(tmp_path):
    a = build("captcha_chars", root=tmp_path / "a", **CAPTCHA)
    b = build("captcha_chars", root=tmp_path / "b", **CAPTCHA)
    c = build("captcha_chars", root=tmp_path / "c", seed=1, **CAPTCHA)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (12, 3, 24, 24) and a.images.dtype == torch.uint8
    assert a.classes == ["A", "7", "x"] and a.labels.tolist() == [0, 1, 2] * 4
    assert captcha.image.secrets.__name__ == "secrets"
    item = a[0]
    assert item["image"].shape == (3, 24, 24) and item["label"].dtype == torch.long
    assert build_transforms(train=True, image_size=16)(a.images[0]).shape == (3, 16, 16)


def test_captcha_chars_train_and_val_are_disjoint(tmp_path):
    train = build("captcha_chars", split="train", root=tmp_path, **CAPTCHA)
    val = build("captcha_chars", split="val", root=tmp_path, **CAPTCHA)
    assert len(val) == 6 and val.classes == train.classes
    train_images = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in train_images for x in val.images)
    assert torch.equal(build("captcha_chars", split="test", root=tmp_path, **CAPTCHA).images, val.images)


def test_captcha_chars_second_build_reads_the_cache(tmp_path, monkeypatch):
    first = build("captcha_chars", root=tmp_path, **CAPTCHA)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("captcha_chars-train-") and files[0].endswith(".pt")

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(captcha_module, "render_chars", no_rendering)
    assert torch.equal(build("captcha_chars", root=tmp_path, **CAPTCHA).images, first.images)
    with pytest.raises(AssertionError, match="rendered again"):
        build("captcha_chars", root=tmp_path, **{**CAPTCHA, "size": 20})


def test_captcha_chars_bad_options(tmp_path):
    user_error("no repeated characters", build, "captcha_chars", root=tmp_path, charset="AA")
    user_error("per_class", build, "captcha_chars", root=tmp_path, per_class=0)
    user_error("no split 'dev'", build, "captcha_chars", split="dev", root=tmp_path)


def test_shapes_is_deterministic_and_cached(tmp_path):
    a = build("shapes", root=tmp_path / "a", per_class=3, size=16)
    b = build("shapes", root=tmp_path / "b", per_class=3, size=16)
    val = build("shapes", split="val", root=tmp_path / "a", per_class=3, val_per_class=2, size=16)
    assert torch.equal(a.images, b.images) and a.images.shape == (3 * len(a.classes), 3, 16, 16)
    assert len(val) == 2 * len(a.classes) and "circle" in a.classes
    assert len(os.listdir(tmp_path / "a")) == 2


# --- fashion_mnist / mnist -----------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(folder: Path, gz: bool, n=(5, 3)) -> dict:
    arrays = {}
    for prefix, count in zip(("train", "t10k"), n):
        images = np.random.default_rng(count).integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count) % 10
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_reads_idx_files(tmp_path, gz, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_mnist(folder, gz)
    train = build("fashion_mnist", split="train", root=str(tmp_path))
    eval_transform = build_transforms(train=False, image_size=20)
    test = build("fashion_mnist", split="val", root=str(tmp_path), transform=eval_transform)
    assert (len(train), len(test)) == (5, 3) and len(train.classes) == 10
    assert np.array_equal(train.images.numpy(), arrays["train"][0])
    assert train.labels.tolist() == arrays["train"][1].tolist()
    expected = torch.from_numpy(arrays["train"][0][2]).float().div(255).expand(3, 28, 28)
    assert torch.allclose(train[2]["image"], expected)
    assert test[0]["image"].shape == (3, 20, 20)


def test_mnist_reads_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    ds = build("mnist", split="test", root=tmp_path)
    assert len(ds) == 3 and ds.classes[0].startswith("0")


def test_idx_files_missing_or_broken(tmp_path, monkeypatch):
    message = user_error("Fashion-MNIST files not found", build, "fashion_mnist", root=tmp_path)
    assert "train-images-idx3-ubyte[.gz]" in message and "apt-get install dataset-fashion-mnist" in message
    user_error("MNIST files not found: expected t10k-images", build, "mnist", split="test", root=tmp_path)

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    user_error("could not download Fashion-MNIST", build, "fashion_mnist", root=tmp_path, download=True)
    write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + b"\0" * 8)
    user_error("truncated", build, "fashion_mnist", split="test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"PK\3\4 not idx")
    user_error("not an IDX file", build, "fashion_mnist", split="test", root=tmp_path)
    user_error("no split 'dev'", build, "fashion_mnist", split="dev", root=tmp_path)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`")
def test_fashion_mnist_debian_files():
    train, test = build("fashion_mnist", split="train"), build("fashion_mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert len(train.classes) == 10 and train.images.shape == (60000, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10


# --- cifar ---------------------------------------------------------------------------------------------------------


def test_cifar_missing_and_offline_are_user_errors(tmp_path, monkeypatch):
    message = user_error("cifar10 not found", build, "cifar10", root=tmp_path)
    assert "download=true" in message and "cifar-10-batches-py" in message
    user_error("cifar100 not found", build, "cifar100", split="val", root=tmp_path)

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    message = user_error("could not download cifar10", build, "cifar10", root=tmp_path, download=True)
    assert "no network" in message


def test_cifar_loads_extracted_batches(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train, test = build("cifar10", root=tmp_path), build("cifar10", split="test", root=tmp_path)
    assert (len(train), len(test)) == (10, 2) and train.classes == names
    assert train.images.shape == (10, 3, 32, 32) and train.labels.tolist()[:2] == [1, 9]
    assert train[0]["image"].shape == (3, 32, 32)


# --- registry ------------------------------------------------------------------------------------------------------


def test_registry_builders_take_keyword_options_with_defaults():
    expected = {"folder", "fashion_mnist", "mnist", "cifar10", "cifar100", "captcha_chars", "shapes"}
    assert expected <= set(DATASETS.names())
    for name in DATASETS.names():
        params = inspect.signature(DATASETS.get(name)).parameters
        assert {"split", "root", "transform"} <= set(params), name
        for p in params.values():
            assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty, (name, p)
    user_error("Did you mean cifar10", DATASETS.get, "cifar01")


def test_a_long_generation_says_so_and_a_quick_or_cached_one_is_silent(tmp_path, capsys, monkeypatch):
    from mtl.data import cache

    build("shapes", root=tmp_path / "quick", per_class=3, size=16)  # well under ANNOUNCE_AFTER_S
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cache, "ANNOUNCE_AFTER_S", 0.0)  # every generation counts as long
    build("shapes", root=tmp_path, per_class=3, size=16)
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 2
        and err[0].startswith("generating shapes-train-")
        and f"later runs read it from {tmp_path}" in err[0]
    )
    assert err[1].startswith("generated shapes-train-") and err[1].endswith(" s")
    build("shapes", root=tmp_path, per_class=3, size=16)  # from the cache: nothing to wait for
    assert capsys.readouterr().err == ""
