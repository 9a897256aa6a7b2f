"""Multitask data sets: generated scenes and captchas, the .npy dense layout, CelebA and Multi-Fashion on files the
tests write themselves (plus real Fashion-MNIST when Debian's package is installed)."""

import gzip
import struct
import sys
from pathlib import Path

import captcha.image
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from test_data import build, user_error

from mtl.data import IMAGENET_MEAN, IMAGENET_STD, captcha_text, dense_transforms, multi_fashion
from mtl.data import scenes as scenes_module
from mtl.data.mnist import read_idx
from mtl.data.scenes import KINDS, SEG_CLASSES

torch.set_num_threads(1)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalise(image):
    return image * STD + MEAN


# --- dense transforms -------------------------------------------------------------------------------------------


def dense_sample(h=6, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.nn.functional.normalize(torch.randn(3, h, w, generator=g), dim=0)
    normal[:, 0, 0] = 0
    return {
        "image": torch.rand(3, h, w, generator=g),
        "seg": torch.randint(-1, 5, (h, w), generator=g),
        "depth": torch.rand(1, h, w, generator=g) + 1,
        "normal": normal,
        "label": torch.tensor(3),
    }


SPECS = {
    "seg": {"type": "segmentation", "num_classes": 5},
    "depth": {"type": "depth"},
    "normal": {"type": "normals"},
    "label": {"type": "classification", "num_classes": 4},
}


def test_hflip_flips_every_dense_target_and_negates_normal_x():
    sample = dense_sample()
    flipped = dense_transforms.hflip(sample, SPECS)
    for key in ("image", "seg", "depth"):
        assert torch.equal(flipped[key], sample[key].flip(-1))
    assert torch.equal(flipped["normal"][0], -sample["normal"][0].flip(-1))
    assert torch.equal(flipped["normal"][1:], sample["normal"][1:].flip(-1))
    assert torch.equal(flipped["label"], sample["label"])


def test_targets_move_by_their_declared_type_not_their_key():
    sample = dense_sample()
    renamed = {"image": sample["image"], "mask": sample["seg"], "z": sample["depth"], "n": sample["normal"]}
    specs = {"mask": {"type": "segmentation", "num_classes": 5}, "z": {"type": "depth"}, "n": {"type": "normals"}}
    flipped = dense_transforms.hflip(renamed, specs)
    assert torch.equal(flipped["mask"], sample["seg"].flip(-1)) and torch.equal(flipped["z"], sample["depth"].flip(-1))
    assert torch.equal(flipped["n"][0], -sample["normal"][0].flip(-1))
    out = dense_transforms.resize(renamed, (3, 4), specs)
    assert out["mask"].shape == (3, 4) and out["mask"].dtype == torch.long and out["n"].shape == (3, 3, 4)


def test_resize_keeps_labels_and_unit_normals():
    sample = dense_sample()
    out = dense_transforms.resize(sample, (3, 4), SPECS)
    assert out["image"].shape == (3, 3, 4) and out["seg"].shape == (3, 4) and out["depth"].shape == (1, 3, 4)
    assert out["seg"].dtype == torch.long and set(out["seg"].unique().tolist()) <= set(sample["seg"].unique().tolist())
    assert set(out["depth"].flatten().tolist()) <= set(sample["depth"].flatten().tolist())  # nearest: no blending
    norms = out["normal"].norm(dim=0)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)
    up = dense_transforms.resize(sample, (12, 16), SPECS)
    assert up["normal"][:, :2, :2].abs().sum() == 0  # the invalid pixel stays invalid


@pytest.mark.parametrize("inverse", [False, True])
def test_random_scale_crop_rescales_depth(inverse):
    sample = dense_sample()
    specs = {**SPECS, "depth": {"type": "depth", "inverse": inverse}}
    out = dense_transforms.random_scale_crop(sample, specs, scales=(2.0,))
    assert out["image"].shape == sample["image"].shape and out["seg"].shape == sample["seg"].shape
    values = set((sample["depth"] * (2.0 if inverse else 0.5)).flatten().tolist())
    assert set(out["depth"].flatten().tolist()) <= values


# --- scenes -----------------------------------------------------------------------------------------------------

SCENE_OPTS = dict(size=32, train_size=24, val_size=8, max_objects=3)


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory):
    return build("scenes", root=str(tmp_path_factory.mktemp("scenes")), **SCENE_OPTS)


def test_scenes_items_and_metadata(scene_set):
    assert len(scene_set) == 24
    item = scene_set[0]
    assert set(item) == {"image", "seg", "depth", "normal", "label"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["seg"].shape == (32, 32) and item["seg"].dtype == torch.long
    assert item["depth"].shape == (1, 32, 32) and item["depth"].dtype == torch.float32
    assert item["normal"].shape == (3, 32, 32) and item["normal"].dtype == torch.float32
    assert item["label"].shape == () and item["label"].dtype == torch.long
    t = scene_set.targets
    assert t["seg"] == {"type": "segmentation", "num_classes": 6, "classes": list(SEG_CLASSES)}
    assert t["depth"] == {"type": "depth"} and t["normal"] == {"type": "normals"}
    assert t["label"] == {"type": "classification", "num_classes": 3, "classes": list(KINDS)}
    assert scene_set.classes == list(KINDS)
    image = unnormalise(item["image"])
    assert image.min() >= -1e-5 and image.max() <= 1 + 1e-5


def test_scenes_geometry_is_consistent(scene_set):
    seg = torch.stack([scene_set[i]["seg"] for i in range(len(scene_set))])
    depth = torch.stack([scene_set[i]["depth"][0] for i in range(len(scene_set))])
    normal = torch.stack([scene_set[i]["normal"] for i in range(len(scene_set))])
    labels = torch.stack([scene_set[i]["label"] for i in range(len(scene_set))])
    sky = seg == 0
    assert (depth[~sky] > 0).all() and (depth[sky] == 0).all()
    norms = normal.norm(dim=1)
    assert torch.allclose(norms[~sky], torch.ones(()), atol=1e-3) and (norms[sky] == 0).all()
    assert torch.allclose(normal.permute(0, 2, 3, 1)[seg == 2], torch.tensor([0.0, -1.0, 0.0]), atol=1e-3)
    assert (seg == 2).any() and (seg >= 3).any()
    # every visible surface faces the camera: normal . ray direction < 0
    rows, cols = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    focal = scenes_module._FOCAL * 32
    ray = torch.stack([(cols - 16) / focal, (rows - scenes_module._HORIZON * 32) / focal, torch.ones(32, 32)])
    assert ((normal * ray).sum(1)[~sky] < 0).all()
    for i in range(len(seg)):
        areas = torch.stack([(seg[i] == 3 + k).sum() for k in range(len(KINDS))])
        assert labels[i] == areas.argmax() and areas.sum() > 0


def test_scenes_deterministic_and_cached(tmp_path, scene_set):
    again = build("scenes", root=str(tmp_path / "a"), **SCENE_OPTS)
    for key in scene_set.tensors:
        assert torch.equal(again.tensors[key], scene_set.tensors[key])
    assert len(list((tmp_path / "a").glob("scenes-train-*.pt"))) == 1
    other = build("scenes", root=str(tmp_path / "a"), seed=1, **SCENE_OPTS)
    assert not torch.equal(other.tensors["images"], scene_set.tensors["images"])
    val = build("scenes", root=str(tmp_path / "a"), split="val", **SCENE_OPTS)
    assert len(val) == 8 and not torch.equal(val.tensors["images"][:8], scene_set.tensors["images"][:8])
    test = build("scenes", root=str(tmp_path / "a"), split="test", test_size=6, **SCENE_OPTS)
    assert len(test) == 6 and not torch.equal(test.tensors["images"], val.tensors["images"][:6])


def test_scenes_augment_flips_image_and_targets_together(tmp_path, scene_set):
    augmented = build("scenes", root=str(tmp_path), augment=True, **SCENE_OPTS)
    flips = 0
    torch.manual_seed(0)
    for i in range(8):
        plain, aug = scene_set[i], augmented[i]
        flipped = not torch.equal(aug["seg"], plain["seg"])
        flips += flipped
        expected = dense_transforms.hflip(plain, augmented.targets) if flipped else plain
        for key in ("image", "seg", "depth", "normal", "label"):
            assert torch.allclose(aug[key].float(), expected[key].float(), atol=1e-6), key
        if flipped:
            assert torch.equal(aug["normal"][0], -plain["normal"][0].flip(-1))
    assert 0 < flips < 8


def test_scenes_bad_options(tmp_path):
    user_error("size >= 16", build, "scenes", root=str(tmp_path), size=8)
    user_error("not a transform", build, "scenes", root=str(tmp_path), transform=lambda x: x)
    user_error("no split 'dev'", build, "scenes", root=str(tmp_path), split="dev")
    user_error("test_size >= 1", build, "scenes", root=str(tmp_path), split="test", test_size=0)


# --- captcha ----------------------------------------------------------------------------------------------------


def test_captcha_targets_decode_to_the_rendered_text(tmp_path, monkeypatch):
    rendered = []
    original = captcha.image.ImageCaptcha.generate_image

    def spy(self, chars, *args, **kwargs):
        rendered.append(chars)
        return original(self, chars, *args, **kwargs)

    monkeypatch.setattr(captcha.image.ImageCaptcha, "generate_image", spy)
    ds = build("captcha", root=str(tmp_path), train_size=6, val_size=3)
    assert len(ds) == 6 and rendered == [ds.text(i) for i in range(6)]
    item = ds[1]
    assert set(item) == {"image", "char0", "char1", "char2", "char3"}
    assert item["image"].shape == (3, 48, 128) and item["image"].dtype == torch.float32
    assert "".join(ds.classes[int(item[f"char{i}"])] for i in range(4)) == rendered[1]
    assert all(item[f"char{i}"].dtype == torch.long and item[f"char{i}"].shape == () for i in range(4))
    charset = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert ds.classes == list(charset)
    assert ds.targets == {
        f"char{i}": {"type": "classification", "num_classes": 36, "classes": list(charset)} for i in range(4)
    }


def test_captcha_deterministic_options_and_augment(tmp_path):
    opts = dict(train_size=4, val_size=3, length=5, charset="AB7", size=[30, 70])
    a = build("captcha", root=str(tmp_path / "a"), **opts)
    b = build("captcha", root=str(tmp_path / "b"), **opts)
    assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)
    assert a.images.shape == (4, 3, 30, 70) and a.images.dtype == torch.uint8
    assert set(a[0]) == {"image"} | {f"char{i}" for i in range(5)} and a.classes == ["A", "B", "7"]
    c = build("captcha", root=str(tmp_path / "a"), seed=1, **opts)
    assert not torch.equal(a.images, c.images)
    val = build("captcha", root=str(tmp_path / "a"), split="test", **opts)
    assert len(val) == 3
    aug = build("captcha", root=str(tmp_path / "a"), augment=True, **opts)
    assert aug[0]["image"].shape == (3, 30, 70)
    user_error("repeated", build, "captcha", root=str(tmp_path), charset="AA")


def test_captcha_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "captcha", None)
    monkeypatch.setitem(sys.modules, "captcha.image", None)
    user_error("pip install captcha", captcha_text._captcha)


# --- nyuv2 / cityscapes (.npy layout) ---------------------------------------------------------------------------


def write_npy_layout(root: Path, labels=("label",), normals=True, counts=(3, 2), h=6, w=8) -> Path:
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), counts):
        for i in range(n):
            folder = root / split
            arrays = {
                "image": rng.random((h, w, 3)),
                "depth": np.where(rng.random((h, w, 1)) < 0.2, 0.0, rng.random((h, w, 1)) * 5 + 0.5),
            }
            for label in labels:
                arrays[label] = rng.integers(-1, 7, (h, w)).astype(np.float32)
            if normals:
                n_ = rng.normal(size=(h, w, 3))
                arrays["normal"] = (n_ / np.linalg.norm(n_, axis=-1, keepdims=True)).astype(np.float32)
            for kind, array in arrays.items():
                (folder / kind).mkdir(parents=True, exist_ok=True)
                np.save(folder / kind / f"{i}.npy", array)
    return root


def test_nyuv2_items_match_the_files(tmp_path):
    root = write_npy_layout(tmp_path / "nyu")
    ds = build("nyuv2", root=str(root))
    assert len(ds) == 3 and len(build("nyuv2", root=str(root), split="test")) == 2
    item = ds[2]
    assert set(item) == {"image", "seg", "depth", "normal"}
    image = np.load(root / "train/image/2.npy")
    assert torch.allclose(unnormalise(item["image"]), torch.from_numpy(image).permute(2, 0, 1).float(), atol=1e-5)
    seg = np.load(root / "train/label/2.npy")
    assert item["seg"].dtype == torch.long and torch.equal(item["seg"], torch.from_numpy(seg).long())
    assert (item["seg"] == -1).any()
    assert item["depth"].shape == (1, 6, 8) and torch.allclose(
        item["depth"][0], torch.from_numpy(np.load(root / "train/depth/2.npy")[..., 0]).float()
    )
    assert item["normal"].shape == (3, 6, 8)
    assert ds.targets["seg"]["num_classes"] == 13 and len(ds.targets["seg"]["classes"]) == 13
    assert ds.targets["depth"] == {"type": "depth"} and ds.targets["normal"] == {"type": "normals"}


def test_nyuv2_size_and_augment(tmp_path):
    root = write_npy_layout(tmp_path / "nyu")
    item = build("nyuv2", root=str(root), size=[3, 4])[0]
    assert item["image"].shape == (3, 3, 4) and item["seg"].shape == (3, 4)
    assert item["depth"].shape == (1, 3, 4) and item["normal"].shape == (3, 3, 4)
    assert set(item["seg"].unique().tolist()) <= set(range(-1, 7))
    norms = item["normal"].norm(dim=0)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)
    torch.manual_seed(0)
    aug = build("nyuv2", root=str(root), augment=True)
    for i in range(3):
        out = aug[i]
        assert out["image"].shape == (3, 6, 8) and out["seg"].shape == (6, 8) and out["normal"].shape == (3, 6, 8)


def test_npy_layout_errors(tmp_path):
    root = write_npy_layout(tmp_path / "nyu")
    (root / "train/depth/1.npy").unlink()
    user_error(r"has 3 \.npy files but .*depth has 2", build, "nyuv2", root=str(root))
    for f in (root / "train/normal").iterdir():
        f.unlink()
    (root / "train/normal").rmdir()
    user_error("normal is missing", build, "nyuv2", root=str(root))
    user_error("does not exist", build, "nyuv2", root=str(tmp_path / "nowhere"))
    user_error("needs data.root", build, "nyuv2")
    user_error("size must be", build, "nyuv2", root=str(root), split="val", size=[4])


def test_cityscapes_label_folders(tmp_path):
    root = write_npy_layout(tmp_path / "cs", labels=("label_7", "label_19"), normals=False)
    ds = build("cityscapes", root=str(root))
    assert set(ds[0]) == {"image", "seg", "depth"} and set(ds.targets) == {"seg", "depth"}
    assert ds.targets["seg"]["num_classes"] == 7 and ds.classes[0] == "flat"
    assert torch.equal(ds[0]["seg"], torch.from_numpy(np.load(root / "train/label_7/0.npy")).long())
    ds19 = build("cityscapes", root=str(root), label_dir="label_19", split="val")
    assert ds19.targets["seg"]["num_classes"] == 19 and len(ds19) == 2
    assert torch.equal(ds19[1]["seg"], torch.from_numpy(np.load(root / "val/label_19/1.npy")).long())
    user_error("label is missing", build, "cityscapes", root=str(root), label_dir="label")
    user_error("label_dir must be one of", build, "cityscapes", root=str(root), label_dir="label_3")


# --- celeba -----------------------------------------------------------------------------------------------------

ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def write_celeba(root: Path, n=6, partitions=(0, 0, 0, 1, 1, 2)) -> np.ndarray:
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / "img_align_celeba" / name)
    attrs = rng.choice([-1, 1], (n, len(ATTRS)))
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, attrs)]
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(ATTRS) + " \n" + "\n".join(rows) + "\n")
    (folder / "list_eval_partition.txt").write_text("".join(f"{a} {p}\n" for a, p in zip(names, partitions)))
    (folder / "identity_CelebA.txt").write_text("".join(f"{a} {i + 10}\n" for i, a in enumerate(names)))
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{a} 95 71 226 313\n" for a in names)
    )
    landmarks = (
        "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    )
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{landmarks}\n" + "".join(f"{a} 69 109 106 113 77 142 73 152 108 154\n" for a in names)
    )
    return (attrs + 1) // 2


def test_celeba_one_binary_task_per_attribute(tmp_path):
    attrs = write_celeba(tmp_path)
    ds = build("celeba", root=str(tmp_path))
    assert len(ds) == 3
    item = ds[2]
    assert set(item) == {"image"} | set(ATTRS)
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert all(item[a].dtype == torch.long and item[a].shape == () for a in ATTRS)
    assert [int(item[a]) for a in ATTRS] == attrs[2].tolist()
    assert ds.targets["Smiling"] == {"type": "binary", "num_classes": 2, "classes": ["not Smiling", "Smiling"]}
    assert len(build("celeba", root=str(tmp_path), split="val")) == 2
    test = build("celeba", root=str(tmp_path), split="test", image_size=32)
    assert len(test) == 1 and test[0]["image"].shape == (3, 32, 32)
    assert [int(test[0][a]) for a in ATTRS] == attrs[5].tolist()


def test_celeba_multilabel_and_errors(tmp_path):
    attrs = write_celeba(tmp_path)
    ds = build(
        "celeba", root=str(tmp_path), split="valid", as_tasks=False, attributes=["Smiling", "Male"], augment=True
    )
    item = ds[0]
    assert set(item) == {"image", "attrs"} and item["attrs"].dtype == torch.float32
    assert item["attrs"].tolist() == [attrs[3, ATTRS.index("Smiling")], attrs[3, ATTRS.index("Male")]]
    assert ds.targets == {"attrs": {"type": "multilabel", "num_classes": 2, "classes": ["Smiling", "Male"]}}
    user_error("unknown CelebA attribute.*Smiley", build, "celeba", root=str(tmp_path), attributes=["Smiley"])
    msg = user_error("CelebA not found", build, "celeba", root=str(tmp_path / "none"))
    assert "img_align_celeba" in msg and "list_eval_partition.txt" in msg
    (tmp_path / "celeba" / "identity_CelebA.txt").unlink()
    assert "missing identity_CelebA.txt" in user_error("not found", build, "celeba", root=str(tmp_path))


# --- multi_fashion ----------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion"
    root.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


def placements(canvas: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> list:
    """Offset pairs (left, right) whose max-overlay reproduces ``canvas`` (36x36 uint8)."""
    found = []
    for ly in range(0, 4):
        for lx in range(0, 4):
            for ry in range(5, 9):
                for rx in range(5, 9):
                    image = torch.zeros(36, 36, dtype=torch.uint8)
                    image[ly : ly + 28, lx : lx + 28] = left
                    image[ry : ry + 28, rx : rx + 28] = torch.maximum(image[ry : ry + 28, rx : rx + 28], right)
                    if torch.equal(image, canvas):
                        found.append(((ly, lx), (ry, rx)))
    return found


def test_multi_fashion_pairs_follow_the_construction(fake_fashion, tmp_path):
    ds = build("multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path / "cache"), train_size=20)
    assert len(ds) == 20
    item = ds[3]
    assert set(item) == {"image", "left", "right"}
    assert item["image"].shape == (3, 36, 36) and item["image"].dtype == torch.float32
    assert item["left"].dtype == torch.long and item["left"].shape == ()
    grey = unnormalise(item["image"])
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[0], grey[2], atol=1e-5)
    classes = list(torchvision.datasets.FashionMNIST.classes)
    assert ds.classes == classes
    assert ds.targets == {
        k: {"type": "classification", "num_classes": 10, "classes": classes} for k in ("left", "right")
    }
    images, labels = (
        read_idx(fake_fashion / "train-images-idx3-ubyte.gz"),
        read_idx(fake_fashion / "train-labels-idx1-ubyte.gz"),
    )
    cached = next((tmp_path / "cache").glob("multi_fashion-train-*.pt"))
    tensors = torch.load(cached, weights_only=True)["tensors"]
    val = build("multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path / "cache"), split="val", val_size=20)
    val_tensors = torch.load(next((tmp_path / "cache").glob("multi_fashion-val-*.pt")), weights_only=True)["tensors"]
    held = set(val_tensors["left_index"].tolist()) | set(val_tensors["right_index"].tolist())
    train_items = set(tensors["left_index"].tolist()) | set(tensors["right_index"].tolist())
    assert len(val) == 20 and not held & train_items  # val pairs only from held-out training items
    assert len(set(val_tensors["left_index"].tolist())) == round(0.1 * len(labels))  # 10 % held out, each used
    kept = sorted(set(range(len(labels))) - set(val_tensors["left_index"].tolist()))
    assert tensors["left_index"].tolist() == [kept[i % len(kept)] for i in range(20)]  # item i of the kept items
    assert torch.equal(ds.left, labels[tensors["left_index"]].long()) and torch.equal(
        ds.right, labels[tensors["right_index"]].long()
    )
    for i in range(0, 20, 4):
        assert placements(ds.images[i, 0], images[tensors["left_index"][i]], images[tensors["right_index"][i]])
    assert torch.allclose(unnormalise(item["image"])[0], ds.images[3, 0].float() / 255, atol=1e-5)


def test_multi_fashion_deterministic_cached_and_sizes(fake_fashion, tmp_path, monkeypatch):
    a = build("multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path / "a"), train_size=50)
    b = build("multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path / "b"), train_size=50)
    assert len(a) == 50 and torch.equal(a.images, b.images) and torch.equal(a.right, b.right)
    c = build("multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path / "a"), train_size=50, seed=1)
    assert not torch.equal(a.images, c.images)
    test = build("multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path / "a"), split="test", test_size=7)
    assert len(test) == 7
    monkeypatch.setattr(multi_fashion, "build_pairs", lambda *a, **k: pytest.fail("cache not used"))
    again = build("multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path / "a"), train_size=50)
    assert torch.equal(again.images, a.images)
    aug = build("multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path / "a"), train_size=50, augment=True)
    assert aug[0]["image"].shape == (3, 36, 36)
    for bad in ({"val_fraction": 1.0}, {"val_fraction": 0}, {"test_size": 0, "split": "test"}):
        user_error(
            "multi_fashion needs", build, "multi_fashion", root=str(fake_fashion), cache_dir=str(tmp_path), **bad
        )


def test_multi_fashion_missing_files(tmp_path):
    msg = user_error(
        "Fashion-MNIST files for multi_fashion not found",
        build,
        "multi_fashion",
        root=str(tmp_path),
        cache_dir=str(tmp_path / "c"),
    )
    assert "train-images-idx3-ubyte" in msg


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist in /usr/share/datasets"
)
def test_multi_fashion_real_data(tmp_path):
    ds = build("multi_fashion", split="test", test_size=500, cache_dir=str(tmp_path))
    assert len(ds) == 500 and ds[0]["image"].shape == (3, 36, 36)
    images = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    tensors = torch.load(next(tmp_path.glob("multi_fashion-test-*.pt")), weights_only=True)["tensors"]
    assert torch.equal(ds.left, labels[:500].long()) and torch.equal(ds.right, labels[tensors["right_index"]].long())
    for i in range(3):
        assert placements(ds.images[i, 0], images[tensors["left_index"][i]], images[tensors["right_index"][i]])


def test_celeba_whole_batches_match_items_and_train(tmp_path):
    """Decoded once and cropped on the device, batches equal the per-item path up to resampling; flips mirror
    the image exactly; attributes are the same; a config trains on this pipeline."""
    attrs = write_celeba(tmp_path)
    yy, xx = np.mgrid[0:218, 0:178]
    for i, path in enumerate(sorted((tmp_path / "celeba" / "img_align_celeba").iterdir())):  # smooth faces
        smooth = np.stack([xx * 255 / 177, yy * 255 / 217, np.full_like(xx, 40 * i)], axis=-1).astype(np.uint8)
        Image.fromarray(smooth).save(path, quality=95)
    ds = build("celeba", root=str(tmp_path))
    rows = torch.tensor([2, 0])
    batch = ds.gather(rows, torch.device("cpu"))
    items = [ds[i] for i in rows.tolist()]
    assert batch["image"].shape == (2, 3, 64, 64)
    diff = (batch["image"] - torch.stack([it["image"] for it in items])).abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.1  # normalised units; a different resampler
    for name in ATTRS:
        assert batch[name].tolist() == [int(it[name]) for it in items]
    assert batch["Smiling"].tolist() == [attrs[2, ATTRS.index("Smiling")], attrs[0, ATTRS.index("Smiling")]]
    flipped = ds.gather(rows, torch.device("cpu"), {"flip": torch.tensor([True, False])})
    assert torch.allclose(flipped["image"][0], batch["image"][0].flip(-1), atol=1e-5)
    assert torch.equal(flipped["image"][1], batch["image"][1])

    from mtl.build.data import build_data
    from mtl.config.load import build_config
    from mtl.workflows.train import run

    raw = {
        "name": "celeba_tiny",
        "out_dir": str(tmp_path / "runs"),
        "data": {
            "name": "celeba",
            "root": str(tmp_path),
            "options": {"attributes": ["Smiling", "Male"], "image_size": 32},
            "batch_size": 2,
            "augment": "random_crop",
        },
        "model": {"encoder": "small_cnn", "encoder_options": {"widths": [8, 8, 16, 16]}},
        "tasks": {"Smiling": {}, "Male": {}},
        "train": {"epochs": 2, "progress": False, "log_images": 0},
    }
    cfg = build_config(raw, {})
    _, _, loaders, _, info = build_data(cfg, torch.device("cpu"))
    assert info["pipeline"] == "batched on cpu (images decoded once: uint8 0 MiB in memory)"  # 6 x 3 x 43 x 43 bytes
    assert loaders["train"].augment and loaders["train"].dataset.nbytes == 3 * 3 * 43 * 43
    summary = run(cfg, quiet=True)
    assert summary["pipeline"].startswith("batched") and summary["train_size"] == 3
