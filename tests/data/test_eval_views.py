"""Evaluation sees the same pixels whichever pipeline runs: the batched pipeline's evaluation views equal
torchvision's Resize + CenterCrop of the original file (or tensor image), and ``mtl eval`` agrees with
``mtl predict`` image by image on a folder of real JPEGs of mixed sizes."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import tiny_config
from PIL import Image, ImageOps
from test_data_multitask import build, write_celeba

import mtl.data.decoded as decoded
from mtl.build.data import build_data
from mtl.cli import main
from mtl.config.load import build_config
from mtl.data.batches import DeviceBatches, image_store
from mtl.data.decoded import decode_images, decoded_key
from mtl.data.device_augment import BatchAugment
from mtl.data.subset import LabelledSubset
from mtl.data.tensor_dataset import TensorImageDataset
from mtl.data.transforms import build_transforms
from mtl.workflows.evaluate import _split_loader
from mtl.workflows.predict import open_run
from mtl.workflows.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
SIZES = [(61, 40), (45, 70), (100, 33), (37, 37), (81, 52), (50, 90)]  # (width, height): mixed sizes and aspects
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """``root/{train,val}/<text>/*.jpg``: captchas rendered at mixed sizes, saved as JPEG; one val image stored
    sideways with an EXIF orientation (6: shown rotated), one grey."""
    captcha = pytest.importorskip("captcha.image", reason="the captcha package renders the test's real JPEGs")
    root = tmp_path_factory.mktemp("jpegs")
    for split, n in (("train", 6), ("val", 4)):
        for c, text in enumerate(("ab", "xy", "mn")):
            folder = root / split / text
            folder.mkdir(parents=True)
            for i in range(n):
                width, height = SIZES[(3 * i + c + len(split)) % len(SIZES)]
                image = captcha.ImageCaptcha(width=width, height=height).generate_image(text).convert("RGB")
                if split == "val" and (c, i) == (0, 0):
                    exif = Image.Exif()
                    exif[0x0112] = 6
                    image.transpose(Image.Transpose.ROTATE_90).save(folder / f"{i}.jpg", quality=90, exif=exif)
                elif split == "val" and (c, i) == (1, 1):
                    image.convert("L").save(folder / f"{i}.jpg", quality=90)
                else:
                    image.save(folder / f"{i}.jpg", quality=90)
    return root


def reference(path, image_size: int, resize_size: int) -> torch.Tensor:
    """torchvision's Resize + CenterCrop of the original file, upright and RGB: uint8 (3, S, S)."""
    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    resized = TF.resize(TF.pil_to_tensor(rgb), [resize_size], antialias=True)
    return TF.center_crop(resized, [image_size, image_size])


def normalised64(pixels: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std in float64, for uint8 (..., 3, S, S)."""
    mean = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float64)[:, None, None]
    return (pixels.double() / 255 - mean) / std


def jpegs(root: Path, split: str = "val") -> list:
    return sorted(str(p) for p in (root / split).rglob("*.jpg"))


@pytest.mark.parametrize("image_size, resize_size", [(28, 32), (28, 24)])  # 24: CenterCrop pads with zeros
def test_decoded_views_are_torchvisions_resize_and_center_crop_of_each_file(jpeg_folder, image_size, resize_size):
    paths = jpegs(jpeg_folder)
    views = decode_images(paths, image_size, view_resize=resize_size, progress=False, threads=2)
    assert views.images.shape == (len(paths), 3, image_size, image_size) and views.view_resize == resize_size
    for row, path in zip(views.images, paths):
        assert torch.equal(row, reference(path, image_size, resize_size)), path
    upright = [ImageOps.exif_transpose(Image.open(p)).size[::-1] for p in paths]
    assert views.sizes.tolist() == [list(hw) for hw in upright]


def test_memory_mapped_views_are_the_same_reused_and_keyed_apart(jpeg_folder, tmp_path, monkeypatch):
    paths = jpegs(jpeg_folder)
    in_memory = decode_images(paths, 28, view_resize=32, progress=False)
    calls = []
    real = decoded._decode_view
    monkeypatch.setattr(decoded, "_decode_view", lambda *a: calls.append(a) or real(*a))
    kw = dict(cache_dir=tmp_path, budget_bytes=1000, progress=False, view_resize=32)
    first = decode_images(paths, 28, **kw)
    again = decode_images(paths, 28, **kw)
    assert Path(first.location).name.startswith("view-28px-r32-") and first.location == again.location
    assert len(calls) == len(paths), "the memory-mapped views were decoded again instead of reused"
    assert torch.equal(first.images, in_memory.images) and torch.equal(again.images, in_memory.images)
    squares = decode_images(paths, 28, cache_dir=tmp_path, budget_bytes=1000, progress=False)
    assert squares.location != first.location and not torch.equal(squares.images, first.images)
    keys = {decoded_key(paths, 28), decoded_key(paths, 28, 32), decoded_key(paths, 28, 33)}
    assert len(keys) == 3


def cfg_of(root, tmp_path, **overrides):
    sizes = {"data.image_size": 28, "data.resize_size": 32, "data.mean": list(MEAN), "data.std": list(STD)}
    return build_config(tiny_config(root, tmp_path / "runs", **{**sizes, **overrides}), {})


@pytest.mark.parametrize("splits", [{}, {"data.val_split": 0.25, "data.test_split": "val"}])
def test_batched_evaluation_sees_the_per_item_pixels_on_jpegs(jpeg_folder, tmp_path, splits):
    """Every evaluated split (a folder split, one carved from the training split, a test split): the stored uint8
    rows are the reference's pixels of each item's file, and the normalised batches equal the per-item path's."""
    _, datasets, batched, _, info = build_data(cfg_of(jpeg_folder, tmp_path, **splits), CPU)
    _, _, items, _, _ = build_data(cfg_of(jpeg_folder, tmp_path, **splits, **{"data.pipeline": "items"}), CPU)
    assert info["pipeline"].startswith("batched on cpu")
    assert batched["train"].store.view is None  # training keeps the cache_size squares and the device crops
    evaluated = [s for s in batched if s != "train"]
    assert evaluated == (["val"] if not splits else ["val", "test"])
    for split in evaluated:
        store, ds = batched[split].store, datasets[split]
        assert store.view == (28, 32) and store.nbytes == len(ds) * 3 * 28 * 28  # only this split's items
        base, rows = ds, list(range(len(ds)))
        while hasattr(base, "dataset"):
            rows, base = [base.indices[r] for r in rows], base.dataset
        for i, r in enumerate(rows):
            assert torch.equal(store.images[store.indices[i]], reference(base.samples[r][0], 28, 32))
        got = [b for b in batched[split]]
        want = [b for b in items[split]]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a["targets"]["label"], b["targets"]["label"])
            assert torch.allclose(a["image"], b["image"], rtol=0, atol=1e-6)
        pixels = torch.stack([store.images[store.indices[i]] for i in range(len(ds))])
        images = torch.cat([b["image"] for b in got])
        assert torch.allclose(images.double(), normalised64(pixels), rtol=0, atol=1e-6)


@pytest.mark.parametrize("budget", [1 << 30, 0])  # 0: the views are made per batch (with a warning)
def test_tensor_images_evaluate_on_the_per_item_pixels(budget):
    """Grey 28 x 28 tensor images (Fashion-MNIST's shape) upscaled to 40 + crop 36, through a subset: batches of
    views equal the per-item transform's tensors, and each view equals torchvision's resize of the original."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.arange(30) % 3
    transform = build_transforms(train=False, image_size=36, resize_size=40, mean=MEAN, std=STD)
    base = TensorImageDataset(images, labels, ["a", "b", "c"], transform)
    picked = [29, 3, 17, 4, 0, 11, 12]
    subset = LabelledSubset(base, picked, labels[picked], ["a", "b", "c"])
    kw = dict(cache_size=40, cache_dir=None, budget_bytes=budget, progress=False, view=(36, 40))
    if budget:
        store = image_store(subset, **kw)
        assert store.per_batch is None and store.nbytes == len(picked) * 36 * 36
    else:
        with pytest.warns(UserWarning, match="made per batch"):
            store = image_store(subset, **kw)
        assert store.per_batch is not None and store.images.shape == (30, 1, 28, 28)  # nothing new is stored
    augment = BatchAugment(train=False, augment="none", image_size=36, resize_size=40, mean=MEAN, std=STD)
    loader = DeviceBatches(store, augment, batch_size=3, shuffle=False, device=CPU)
    got = torch.cat([b["image"] for b in loader])
    want = torch.stack([subset[i]["image"] for i in range(len(picked))])
    assert got.shape == (len(picked), 3, 36, 36)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    for out, i in zip(got, picked):
        pixels = TF.center_crop(TF.resize(images[i][None], [40], antialias=True), [36, 36]).expand(3, -1, -1)
        assert torch.allclose(out.double(), normalised64(pixels), rtol=0, atol=1e-6)
    assert torch.cat([b["targets"]["label"] for b in loader]).tolist() == labels[picked].tolist()


def test_celeba_without_augmentation_gathers_the_per_item_tensors(tmp_path):
    write_celeba(tmp_path)
    ds = build("celeba", root=str(tmp_path), image_size=24)
    ds.prepare(progress=False)
    assert ds.nbytes == len(ds) * 3 * 24 * 24  # the views, not 32 x 32 squares
    rows = torch.tensor([2, 0, 1])
    batch = ds.gather(rows, CPU)
    items = torch.stack([ds[i]["image"] for i in rows.tolist()])
    assert torch.allclose(batch["image"], items, rtol=0, atol=1e-6)
    flipped = ds.gather(rows, CPU, {"flip": torch.tensor([True, False, True])})
    assert torch.equal(flipped["image"][0], batch["image"][0].flip(-1))
    assert torch.equal(flipped["image"][1], batch["image"][1])


def test_eval_and_predict_agree_image_by_image_on_real_jpegs(jpeg_folder, tmp_path, capsys):
    """A run trained on the default (batched) pipeline: ``mtl eval``'s accuracy and confusion matrix are
    ``mtl predict``'s counts on the same files, and every image gets the same class (probabilities within 1e-4)."""
    cfg = cfg_of(jpeg_folder, tmp_path, **{"train.epochs": 1, "train.log_images": 0})
    summary = run(cfg, quiet=True)
    run_dir = Path(summary["run_dir"])
    assert summary["pipeline"].startswith("batched")
    assert main(["eval", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    assert main(["predict", str(run_dir), str(jpeg_folder / "val"), "--out", str(tmp_path / "pred")]) == 0
    capsys.readouterr()
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        predicted = {row["path"]: row for row in csv.DictReader(f)}
    classes = metrics["confusion"]["label"]["classes"]
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for path, row in predicted.items():
        confusion[classes.index(Path(path).parent.name), classes.index(row["label_top1"])] += 1
    assert len(predicted) == metrics["size"] == 12
    assert confusion.tolist() == metrics["confusion"]["label"]["matrix"]
    assert metrics["acc"] == pytest.approx(np.trace(confusion) / len(predicted), abs=1e-9)

    loaded = open_run(run_dir)
    _, loader = _split_loader(loaded.cfg, "val", CPU)
    with torch.no_grad():
        probs = torch.cat([loaded.model(b["image"])["label"].softmax(1) for b in loader])
    base = loader.dataset
    for path, p in zip((path for path, _ in base.samples), probs):
        row = predicted[path]
        assert classes[int(p.argmax())] == row["label_top1"], path
        assert float(p.max()) == pytest.approx(float(row["label_p1"]), abs=1e-4)


def test_a_tensor_data_set_evaluates_on_the_per_item_pixels_through_build_data(tmp_path):
    """``shapes`` (a tensor data set, 20 px upscaled): a validation set carved from its training split and its test
    split give the per-item path's tensors on the batched pipeline."""
    data = {"data.name": "shapes", "data.options": {"per_class": 4, "val_per_class": 2, "size": 20}}
    splits = {"data.val_split": 0.25, "data.test_split": "val", "data.resize_size": 30}
    _, _, batched, _, info = build_data(cfg_of(tmp_path, tmp_path, **data, **splits), CPU)
    _, _, items, _, _ = build_data(cfg_of(tmp_path, tmp_path, **data, **splits, **{"data.pipeline": "items"}), CPU)
    assert info["pipeline"].startswith("batched on cpu") and batched["train"].store.view is None
    for split in ("val", "test"):
        assert batched[split].store.view == (28, 30)
        got, want = torch.cat([b["image"] for b in batched[split]]), torch.cat([b["image"] for b in items[split]])
        assert got.shape == want.shape == (len(batched[split].store), 3, 28, 28)
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
