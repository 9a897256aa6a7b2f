"""``data.flip: false``: no training image is ever mirrored, in the batched pipeline (against torchvision's crop of each
image, without the flip), in the per-item one, for self-augmenting data sets and through the config; the crops and the
random stream stay those of a run with flips."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from conftest import make_folder, tiny_config
from test_data import build

from mtl.build.data import build_data
from mtl.config.load import build_config
from mtl.data.device_augment import BatchAugment
from mtl.data.transforms import build_transforms

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output = x / 255


def lopsided_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 (3, H, W): random pixels plus a left-to-right ramp, so no crop of it looks like its mirror."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 96, (3, height, width), generator=generator)
    ramp = torch.linspace(0, 159, width).round().long().expand(3, height, width)
    return (noise + ramp).to(torch.uint8)


def test_batched_random_crop_without_flip_is_torchvisions_crop_of_every_image():
    batch = 48
    x = lopsided_image(80, 120)
    kw = dict(train=True, augment="random_crop", image_size=32, resize_size=40, crop_padding=4, **RAW)
    plain, flipping = BatchAugment(flip=False, **kw), BatchAugment(**kw)
    sizes = torch.tensor([[80, 120]]).expand(batch, 2)
    g_plain, g_flip = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    boxes, flip = plain.boxes(sizes, g_plain)
    same_boxes, drawn = flipping.boxes(sizes, g_flip)
    assert torch.equal(boxes, same_boxes) and not flip.any() and 0 < drawn.sum() < batch
    assert torch.equal(torch.rand(4, generator=g_plain), torch.rand(4, generator=g_flip))  # the same stream after

    out = plain(x[None].expand(batch, -1, -1, -1), theta=plain.theta(sizes, torch.Generator().manual_seed(3)))
    padded = F.pad(TF.resize(x.float() / 255, [40], antialias=False), (4, 4, 4, 4))  # resize, pad 4, crop 32
    for i, (top, left, _, _) in enumerate(boxes.tolist()):
        t, lft = int(top) // 2 + 4, int(left) // 2 + 4  # original pixels at scale 2 -> padded resized pixels
        expected = padded[:, t : t + 32, lft : lft + 32]
        assert (out[i] - expected).abs().max() < 1e-4
        assert (out[i] - expected.flip(-1)).abs().max() > 0.1  # a mirror would be told apart


def test_batched_random_resized_crop_without_flip_matches_torchvisions_resized_crop():
    batch = 16
    x = lopsided_image(60, 90, seed=1)
    aug = BatchAugment(train=True, image_size=24, flip=False, **RAW)
    sizes = torch.tensor([[60, 90]]).expand(batch, 2)
    theta = aug.theta(sizes, torch.Generator().manual_seed(5))
    boxes, flip = aug.boxes(sizes, torch.Generator().manual_seed(5))
    assert not flip.any() and (theta[:, 0, 0] > 0).all()
    out = aug(x[None].expand(batch, -1, -1, -1), theta=theta)
    for i, box in enumerate(boxes.long().tolist()):
        expected = TF.resized_crop(x.float() / 255, *box, size=[24, 24], antialias=False)
        rim = 1 if min(box[2:]) < 24 else 0  # torchvision clamps samples to the crop on upscaling (see that test)
        inner = (slice(None), slice(rim, 24 - rim), slice(rim, 24 - rim))
        assert (out[i] - expected)[inner].abs().max() < 1e-4


@pytest.mark.parametrize("augment", ["random_crop", "random_resized_crop"])
def test_per_item_pipeline_without_flip_is_the_crop_alone_and_keeps_the_stream(augment):
    image = lopsided_image(40, 52, seed=2)
    kw = dict(train=True, image_size=24, resize_size=28, crop_padding=2, augment=augment, **RAW)
    no_flip, with_flip = build_transforms(flip=False, **kw), build_transforms(**kw)
    if augment == "random_crop":
        crop = [v2.Resize(28, antialias=True), v2.RandomCrop(24, padding=2, pad_if_needed=True)]
    else:
        crop = [v2.RandomResizedCrop(24, antialias=True)]
    reference = v2.Compose([v2.ToImage(), *crop, v2.ToDtype(torch.float32, scale=True)])
    mirrored = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = no_flip(image)
        after = torch.rand(3)
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        flipped = with_flip(image)
        assert torch.equal(torch.rand(3), after)  # the flip's number is drawn either way
        assert torch.allclose(out, expected, atol=1e-6)
        mirrored += not torch.allclose(flipped, expected, atol=1e-6)
    assert 0 < mirrored < 12  # with flips some of the same crops are mirrored


def test_scenes_without_flip_never_mirror_and_draw_the_same(tmp_path):
    opts = dict(root=str(tmp_path), size=16, train_size=6, val_size=1, test_size=1, max_objects=1)
    plain = build("scenes", **opts)
    no_flip = build("scenes", augment=True, flip=False, **opts)
    g, g_flip = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert not no_flip.draw(64, g)["flip"].any()
    assert build("scenes", augment=True, **opts).draw(64, g_flip)["flip"].any()
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=g_flip))
    torch.manual_seed(0)
    for i in range(len(plain)):
        item, expected = no_flip[i], plain[i]
        for key in ("image", "seg", "depth", "normal"):
            assert torch.equal(item[key], expected[key]), key


def test_data_flip_false_reaches_both_pipelines(tmp_path):
    root = make_folder(tmp_path / "colors", per_class=(4, 2))
    for pipeline in ("batched", "items"):
        raw = tiny_config(root, tmp_path / "runs", **{"data.pipeline": pipeline, "data.flip": False})
        raw["data"]["augment"] = "random_crop"
        cfg = build_config(raw, {})
        _, _, loaders, _, _ = build_data(cfg, torch.device("cpu"))
        train = loaders["train"]
        if pipeline == "batched":
            sizes = torch.tensor([[32, 32]]).expand(64, 2)
            assert not train.augment.boxes(sizes, torch.Generator().manual_seed(0))[1].any()
        else:
            flips = [t for t in train.dataset.transform.transforms if isinstance(t, v2.RandomHorizontalFlip)]
            assert [t.p for t in flips] == [0.0]
