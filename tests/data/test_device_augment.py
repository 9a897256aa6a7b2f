"""Batch augmentation by affine sampling: pixel conventions, torchvision equivalence, statistics, dense targets."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from mtl.core.errors import UserError
from mtl.data.device_augment import BatchAugment, box_theta, warp, warp_depth, warp_labels, warp_normals
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output = x / 255: no normalisation to undo


def random_image(*shape, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def smooth_image(height, width) -> torch.Tensor:
    """uint8 (3, H, W) of low-frequency waves defined relative to the image size (resolution-independent)."""
    y = (torch.arange(height, dtype=torch.float64)[:, None] + 0.5) / height
    x = (torch.arange(width, dtype=torch.float64)[None] + 0.5) / width
    channels = [
        0.5 + 0.25 * torch.sin(2 * math.pi * (1.5 * x + 0.3 * c)) + 0.2 * torch.cos(2 * math.pi * y + c)
        for c in range(3)
    ]
    return (torch.stack(channels) * 255).round().clamp(0, 255).to(torch.uint8)


def theta_of(boxes, sizes, flip=False) -> torch.Tensor:
    boxes = torch.tensor(boxes, dtype=torch.float64)
    sizes = torch.tensor(sizes).expand(len(boxes), 2)
    return box_theta(boxes, sizes, torch.full((len(boxes),), flip))


def unnormalize(out, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return out * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


# --- pixel conventions --------------------------------------------------------------------------------------------


def test_whole_image_box_reproduces_the_input():
    x = random_image(2, 3, 24, 24)
    theta = theta_of([[0, 0, 24, 24]] * 2, [24, 24])
    out = BatchAugment(train=False, image_size=24, **RAW)(x, theta=theta)
    assert out.shape == (2, 3, 24, 24) and out.dtype == torch.float32
    assert (out - x / 255).abs().max() < 1e-4
    # Eval with image_size == resize_size == the image side is the same identity.
    assert (BatchAugment(train=False, image_size=24, resize_size=24, **RAW)(x) - x / 255).abs().max() < 1e-4
    rect = random_image(2, 3, 20, 30, seed=1)
    same = warp(rect, theta_of([[0, 0, 20, 30]] * 2, [20, 30]), (20, 30))
    assert (same - rect.float()).abs().max() < 1e-3


def test_box_at_its_own_size_is_an_integer_slice_and_zero_outside():
    x = random_image(1, 3, 20, 30)
    inside = warp(x, theta_of([[3, 5, 10, 12]], [20, 30]), (10, 12))
    assert (inside - x[..., 3:13, 5:17].float()).abs().max() < 1e-3
    overhang = warp(x, theta_of([[-2, 24, 10, 12]], [20, 30]), (10, 12))  # 2 rows above, 6 columns right
    assert (overhang[..., :2, :] == 0).all() and (overhang[..., :, 6:] == 0).all()
    assert (overhang[..., 2:, :6] - x[..., 0:8, 24:30].float()).abs().max() < 1e-3


def test_upscaling_does_not_darken_the_image_edges():
    # torchvision resizes with the edge pixels clamped, so an upscaled constant image stays constant.
    constant = torch.full((2, 3, 10, 12), 200, dtype=torch.uint8)
    theta = theta_of([[0, 0, 10, 12], [4, 6, 6, 6]], [10, 12])
    out = BatchAugment(train=False, image_size=32, **RAW)(constant, theta=theta)
    assert (out - 200 / 255).abs().max() < 1e-5


def test_flip_mirrors_the_unflipped_crop():
    x = random_image(2, 3, 20, 30)
    boxes = [[3.0, 5.0, 12.0, 17.0], [0.5, 2.25, 19.0, 11.0]]
    plain = warp(x, theta_of(boxes, [20, 30], flip=False), 16)
    flipped = warp(x, theta_of(boxes, [20, 30], flip=True), 16)
    assert (flipped - torch.flip(plain, dims=[-1])).abs().max() < 1e-3
    assert (flipped - plain).abs().max() > 10  # the flip is not a no-op on random content


@pytest.mark.parametrize("box", [(0, 0, 60, 80), (5, 7, 33, 41), (12, 3, 20, 19), (50, 70, 10, 10), (1, 60, 9, 20)])
def test_box_matches_torchvision_resized_crop(box):
    x = random_image(3, 60, 80, seed=2).float() / 255
    expected = TF.resized_crop(x, *box, size=[16, 16], antialias=False)
    out = warp(x[None], theta_of([box], [60, 80]), 16)[0]
    # torchvision clamps samples to the crop, we read the neighbours outside it: only the rim may differ on upscaling.
    rim = 1 if min(box[2:]) < 16 else 0
    inner = (slice(None), slice(rim, 16 - rim), slice(rim, 16 - rim))
    assert (out - expected)[inner].abs().max() < 1e-4


# --- eval path ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, image_size, resize_size",
    [
        ((3, 50, 70), 32, 36),
        ((3, 64, 48), 32, 36),
        ((3, 50, 55), 32, 36),  # resized width 39: an odd margin of 7, rounded to 4 on the left
        ((3, 31, 45), 24, 20),  # crop larger than the resized height: zero padding
        ((3, 45, 31), 24, 21),  # odd padding of 3: the smaller half first
        ((3, 36, 36), 32, 36),
    ],
)
def test_eval_matches_torchvision_resize_center_crop(shape, image_size, resize_size):
    x = random_image(*shape, seed=3)
    resized = TF.resize(x.float() / 255, [resize_size], antialias=False)
    expected = TF.normalize(TF.center_crop(resized, [image_size]), list(IMAGENET_MEAN), list(IMAGENET_STD))
    aug = BatchAugment(train=False, image_size=image_size, resize_size=resize_size)
    out = aug(x[None])[0]
    error = (unnormalize(out) - unnormalize(expected)).abs()
    assert error.max() < 1e-4
    boxes, flip = aug.boxes(torch.tensor([shape[1:]]))
    assert not flip.any()
    shifted = aug(x[None], theta=box_theta(boxes + torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([shape[1:]]), flip))
    assert (unnormalize(shifted[0]) - unnormalize(expected)).abs().mean() > 100 * error.mean() + 0.05


def test_stored_resized_image_gives_the_geometry_of_the_original():
    original = smooth_image(60, 90)
    stored = F.interpolate(original[None].float(), size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    stored = stored.round().clamp(0, 255).to(torch.uint8)
    sizes = torch.tensor([[60, 90]])
    aug = BatchAugment(train=False, image_size=32, resize_size=40, **RAW)
    reference = aug(original[None])
    error = (aug(stored, sizes=sizes) - reference).abs().mean()
    assert error < 0.005
    assert (aug(stored) - reference).abs().mean() > 5 * error + 0.02  # its own 64x64 size: the wrong box
    train = BatchAugment(train=True, image_size=32, **RAW)
    theta = train.theta(sizes.expand(8, 2), torch.Generator().manual_seed(0))
    assert (
        train(stored.expand(8, -1, -1, -1), theta=theta) - train(original[None].expand(8, -1, -1, -1), theta=theta)
    ).abs().mean() < 0.005


# --- random resized crop ------------------------------------------------------------------------------------------


def test_random_resized_crop_box_statistics_match_torchvision():
    aug = BatchAugment(train=True, augment="random_resized_crop", image_size=32)
    sizes = torch.tensor([[100, 120]]).expand(2000, 2)
    boxes, flip = aug.boxes(sizes, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert boxes.shape == (2000, 4) and flip.shape == (2000,) and flip.dtype == torch.bool
    assert (boxes == boxes.round()).all() and (h > 0).all() and (w > 0).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 100).all() and (left + w <= 120).all()
    area = h * w / (100 * 120)
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert (w / h).min() >= 0.75 * 0.93 and (w / h).max() <= 4 / 3 / 0.93
    assert 0.4 < flip.float().mean() < 0.6
    # Position uniform over the free range: the mean relative offset is about one half.
    free_y, free_x = h < 100, w < 120
    assert 0.45 < (top[free_y] / (100 - h[free_y])).mean() < 0.55
    assert 0.45 < (left[free_x] / (120 - w[free_x])).mean() < 0.55
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = torch.tensor(
            [
                T.RandomResizedCrop.get_params(torch.empty(3, 100, 120), [0.08, 1.0], [3 / 4, 4 / 3])
                for _ in range(2000)
            ],
            dtype=torch.float64,
        )
    ref_area = reference[:, 2] * reference[:, 3] / (100 * 120)
    assert abs(area.mean() - ref_area.mean()) < 0.03
    assert abs(torch.log(w / h).mean() - torch.log(reference[:, 3] / reference[:, 2]).mean()) < 0.03


def test_random_resized_crop_is_reproducible_per_generator():
    aug = BatchAugment(train=True, image_size=32)
    sizes = torch.tensor([[100, 120], [40, 30]]).repeat(50, 1)
    first = aug.boxes(sizes, torch.Generator().manual_seed(7))
    again = aug.boxes(sizes, torch.Generator().manual_seed(7))
    other = aug.boxes(sizes, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    theta = aug.theta(sizes, torch.Generator().manual_seed(7))
    assert theta.shape == (100, 2, 3) and theta.dtype == torch.float32 and theta.device.type == "cpu"
    assert torch.equal(theta[:, 0, 0] < 0, first[1])


# No attempt fits (extreme aspect, or an area larger than the image), so torchvision's deterministic fallback
# applies: the ratio clamped into range for 10x200 and 200x10, the whole image for 30x32.
@pytest.mark.parametrize("size, scale", [((10, 200), (0.08, 1.0)), ((200, 10), (0.08, 1.0)), ((30, 32), (1.5, 2.0))])
def test_random_resized_crop_fallback_is_torchvision_central_crop(size, scale):
    aug = BatchAugment(train=True, image_size=32)
    aug.scale = scale
    boxes, _ = aug.boxes(torch.tensor([size]).expand(50, 2), torch.Generator().manual_seed(0))
    expected = T.RandomResizedCrop.get_params(torch.empty(3, *size), list(scale), [3 / 4, 4 / 3])
    assert (boxes == torch.tensor(expected, dtype=torch.float64)).all()


# --- random crop --------------------------------------------------------------------------------------------------


def test_random_crop_boxes_padding_and_zeros_outside():
    batch = 64
    aug = BatchAugment(train=True, augment="random_crop", image_size=32, resize_size=40, crop_padding=4, **RAW)
    sizes = torch.tensor([[80, 120]]).expand(batch, 2)  # resized to 40 x 60: scale 2
    theta = aug.theta(sizes, torch.Generator().manual_seed(1))
    boxes, flip = aug.boxes(sizes, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.unbind(1)
    assert (h == 64).all() and (w == 64).all() and (top % 2 == 0).all() and (left % 2 == 0).all()
    assert top.min() >= -8 and top.max() <= 24 and left.min() >= -8 and left.max() <= 64
    assert ((top < 0) | (left < 0) | (top + h > 80) | (left + w > 120)).any()
    assert 0 < flip.sum() < batch

    constant = aug(torch.full((batch, 3, 80, 120), 200, dtype=torch.uint8), theta=theta)
    centres = 2 * torch.arange(32, dtype=torch.float64) + 1  # output pixel centres in original pixels
    rows = (top[:, None] + centres >= 0) & (top[:, None] + centres < 80)
    cols = (left[:, None] + centres >= 0) & (left[:, None] + centres < 120)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    expected = (rows[:, :, None] & cols[:, None, :]).float() * 200 / 255
    assert (constant - expected[:, None]).abs().max() < 1e-5

    # Against torchvision: resize, zero-pad, crop at the same offsets, flip.
    x = random_image(3, 80, 120, seed=4)
    out = aug(x[None].expand(batch, -1, -1, -1), theta=theta)
    padded = F.pad(TF.resize(x.float() / 255, [40], antialias=False), (4, 4, 4, 4))
    for i in range(batch):
        t, lft = int(top[i]) // 2 + 4, int(left[i]) // 2 + 4
        expected = padded[:, t : t + 32, lft : lft + 32]
        expected = expected.flip(-1) if flip[i] else expected
        assert (out[i] - expected).abs().max() < 1e-4


def test_random_crop_pads_if_needed():
    aug = BatchAugment(train=True, augment="random_crop", image_size=24, resize_size=20)
    boxes, _ = aug.boxes(torch.tensor([[30, 30]]).expand(300, 2), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (h == 36).all() and (w == 36).all()  # 24 resized pixels at scale 1.5
    assert set(top.tolist()) == {-6.0, -4.5, -3.0, -1.5, 0.0} and set(left.tolist()) == set(top.tolist())


# --- dense targets ------------------------------------------------------------------------------------------------


def dense_batch(batch=8, height=24, width=32, classes=4):
    generator = torch.Generator().manual_seed(5)
    coarse = torch.randint(0, classes, (batch, 1, height // 4, width // 4), generator=generator).float()
    seg = F.interpolate(coarse, size=(height, width), mode="nearest")[:, 0].long()
    seg[:, :3, :5] = -1
    return seg


def test_labels_align_with_the_image_and_ignore_outside():
    seg = dense_batch()
    aug = BatchAugment(train=True, image_size=16)
    theta = aug.theta(torch.tensor([[24, 32]]).expand(8, 2), torch.Generator().manual_seed(3))
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()
    one_hot = F.one_hot(seg.clamp(min=0), 4).permute(0, 3, 1, 2).float() * (seg >= 0)[:, None]
    image = warp(one_hot, theta, 16, mode="nearest")
    labels = warp_labels(seg, theta, 16)
    assert labels.shape == (8, 16, 16) and labels.dtype == torch.long
    known = labels >= 0
    assert torch.equal(image.argmax(1)[known], labels[known]) and (image.amax(1)[known] == 1).all()
    assert (image.amax(1)[~known] == 0).all()

    shifted = warp_labels(seg, theta_of([[-4, -6, 24, 32]] * 8, [24, 32]), (24, 32), ignore_index=255)
    assert (shifted[:, :4] == 255).all() and (shifted[:, :, :6] == 255).all()
    assert torch.equal(shifted[:, 4:, 6:], seg[:, :20, :26])  # ignored input pixels keep their -1


def test_depth_stays_nearest_and_invalid_stays_zero():
    seg = dense_batch()
    depth = (seg.float() + 2.5)[:, None] * (seg >= 1)[:, None]  # values {0, 3.5, 4.5, 5.5}; 0 = invalid
    theta = BatchAugment(train=True, image_size=16).theta(
        torch.tensor([[24, 32]]).expand(8, 2), torch.Generator().manual_seed(3)
    )
    out = warp_depth(depth, theta, 16)
    assert out.shape == (8, 1, 16, 16)
    assert set(out.unique().tolist()) <= set(depth.unique().tolist())
    assert torch.equal(out == 0, warp(depth == 0, theta, 16, mode="nearest") > 0.5)
    outside = warp_depth(depth, theta_of([[-4, -6, 24, 32]] * 8, [24, 32]), (24, 32))
    assert (outside[..., :4, :] == 0).all() and torch.equal(outside[..., 4:, 6:], depth[..., :20, :26])


def test_normals_are_unit_and_flip_negates_x():
    generator = torch.Generator().manual_seed(6)
    normal = F.normalize(torch.randn(4, 3, 6, 8, generator=generator), dim=1)
    normal = F.interpolate(normal, size=(24, 32), mode="nearest")
    normal[:, :, :4, :4] = 0  # invalid
    boxes = [[2.0, 3.0, 15.0, 20.0]] * 4
    plain = warp_normals(normal, theta_of(boxes, [24, 32], flip=False), 16)
    flipped = warp_normals(normal, theta_of(boxes, [24, 32], flip=True), 16)
    norm = plain.norm(dim=1)
    valid = warp(normal.abs().sum(1, keepdim=True) > 0, theta_of(boxes, [24, 32]), 16, mode="nearest")[:, 0] > 0.5
    assert (norm[valid] - 1).abs().max() < 1e-5 and (norm[~valid] == 0).all() and (~valid).any()
    mirrored = torch.flip(plain, dims=[-1]) * torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    assert (flipped - mirrored).abs().max() < 1e-5

    constant = torch.tensor([0.6, 0.0, 0.8]).view(1, 3, 1, 1).expand(2, 3, 24, 32)
    theta = torch.cat([theta_of(boxes[:1], [24, 32], flip=False), theta_of(boxes[:1], [24, 32], flip=True)])
    out = warp_normals(constant, theta, 16)
    assert torch.allclose(out[0, 0], torch.full((16, 16), 0.6))
    assert torch.allclose(out[1, 0], torch.full((16, 16), -0.6))
    assert torch.allclose(out[:, 2], torch.full((2, 16, 16), 0.8))


# --- channels and errors ------------------------------------------------------------------------------------------


def test_grey_input_becomes_three_equal_channels():
    grey = random_image(2, 1, 20, 24)
    aug = BatchAugment(train=True, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = aug(grey, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    rgb = aug(grey.expand(-1, 3, -1, -1), generator=torch.Generator().manual_seed(0))
    assert (out - rgb).abs().max() < 1e-5


def test_bad_arguments_raise_user_error():
    with pytest.raises(UserError, match="random_resized_crop, random_crop, none") as info:
        BatchAugment(train=True, augment="mixup")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="image_size"):
        BatchAugment(train=False, image_size=0)
    with pytest.raises(UserError, match="crop_padding"):
        BatchAugment(train=True, augment="random_crop", crop_padding=-1)
    with pytest.raises(UserError, match="1 or 3"):
        BatchAugment(train=False)(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(UserError, match="sizes"):
        BatchAugment(train=False).boxes(torch.tensor([10, 20]))
