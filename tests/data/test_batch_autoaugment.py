"""Batched auto-augment and random erasing: every op equals torchvision's on each image, the policies draw as
torchvision's classes define, AugMix mixes its chains, erasing boxes follow RandomErasing's rules."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

from mtl.core.errors import UserError
from mtl.data.batch_autoaugment import OPS, BatchAutoAugment, BatchRandomErasing, apply_ops, erase_boxes

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n, size=(10, 12), seed=0):
    """uint8 (n, 3, H, W): half noise, half smooth (wide histograms and narrow ones), one constant image."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8)
    coarse = torch.randint(40, 200, (n, 3, 3, 3), generator=g).float()
    smooth = F.interpolate(coarse, size=size, mode="bilinear").round().to(torch.uint8)
    out = torch.where(torch.arange(n).view(-1, 1, 1, 1) % 2 == 0, noise, smooth)
    out[-1] = 77
    return out


def torchvision_op(image, name, m, interpolation):
    """One image through torchvision's public functional op as its auto-augment classes call it (v2
    ``_apply_image_or_video_transform``: magnitude m signed, fill None)."""
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if name == "ShearX" else [0.0, math.degrees(math.atan(m))]
        return TF.affine(image, 0.0, [0, 0], 1.0, shear, interpolation=interpolation, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return TF.affine(image, 0.0, shift, 1.0, [0.0, 0.0], interpolation=interpolation)
    if name == "Rotate":
        return TF.rotate(image, m, interpolation=interpolation)
    colour = {
        "Brightness": TF.adjust_brightness,
        "Color": TF.adjust_saturation,
        "Contrast": TF.adjust_contrast,
        "Sharpness": TF.adjust_sharpness,
    }
    if name in colour:
        return colour[name](image, 1.0 + m)
    if name == "Posterize":
        return TF.posterize(image, int(m))
    if name == "Solarize":
        return TF.solarize(image, 255 * m)
    return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize}[name](image)


def every_op_and_magnitude(policy):
    """(op ids, signed magnitudes) covering every op of ``policy`` at every bin (randaugment: its default 9 and the
    ends) with both signs where signed."""
    aa = BatchAutoAugment(policy, size=(10, 12))
    ops, mags = [], []
    for i, name in enumerate(aa.names):
        for b in (0, 9, aa.bins - 1) if policy == "randaugment" else range(aa.bins):
            for sign in (1, -1) if aa.signed[i] else (1,):
                ops.append(OPS.index(name))
                mags.append(sign * float(aa.table[i, b]))
    return aa, torch.tensor(ops), torch.tensor(mags, dtype=torch.float64)


@pytest.mark.parametrize("policy", ["trivial", "randaugment", "augmix"])
def test_every_op_equals_torchvision_on_each_image_of_a_mixed_batch(policy):
    aa, op, magnitude = every_op_and_magnitude(policy)
    order = torch.randperm(len(op), generator=torch.Generator().manual_seed(1))  # ops mixed within the batch
    op, magnitude = op[order], magnitude[order]
    x = images(len(op))
    out = apply_ops(x, op, magnitude, aa.mode)
    for b in range(len(op)):
        name = OPS[int(op[b])]
        expected = torchvision_op(x[b], name, float(magnitude[b]), aa.mode)
        if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
            # the same sampling grid: at most a rare pixel may round the other way
            assert (out[b] != expected).float().mean() <= 0.01, (name, float(magnitude[b]))
        else:
            assert torch.equal(out[b], expected), (name, float(magnitude[b]))


def test_magnitude_tables_are_torchvisions():
    # TrivialAugmentWide, RandAugment (31 bins) and AugMix (10 bins) spaces as torchvision's classes define them
    for policy, cls in (("trivial", v2.TrivialAugmentWide), ("randaugment", v2.RandAugment), ("augmix", v2.AugMix)):
        aa = BatchAutoAugment(policy, size=(10, 12))
        space = cls._AUGMENTATION_SPACE
        assert set(aa.names) == set(space), policy
        for i, name in enumerate(aa.names):
            values = space[name][0](aa.bins, 10, 12)
            assert bool(aa.signed[i]) == (space[name][1] and values is not None), (policy, name)
            if values is not None:
                assert torch.equal(aa.table[i].float(), values.float()), (policy, name)


def hoeffding(n, events, delta=1e-6):
    """Half-width of a simultaneous (1 - delta) band for ``events`` frequencies estimated from n draws."""
    return math.sqrt(math.log(2 * events / delta) / (2 * n))


def test_trivial_draws_one_uniform_op_and_uniform_bin_per_image():
    aa = BatchAutoAugment("trivial", size=(32, 32))
    n = 20_000
    d = aa.draw(n, torch.Generator().manual_seed(0))
    assert d["aa_op"].shape == (n, 1)
    ids = aa.ids.tolist()
    freq = torch.tensor([(d["aa_op"] == i).float().mean() for i in ids])
    assert (freq - 1 / len(ids)).abs().max() < hoeffding(n, len(ids))
    # bins: the magnitude's position in the op's table is uniform over the 31 bins (Rotate: distinct values)
    rotate = d["aa_op"][:, 0] == OPS.index("Rotate")
    table = aa.table[aa.names.index("Rotate")]
    bins = (d["aa_magnitude"][rotate, 0].abs()[:, None] == table[None]).float().argmax(1)
    counts = torch.bincount(bins, minlength=31).float() / rotate.sum()
    assert (counts - 1 / 31).abs().max() < hoeffding(int(rotate.sum()), 31)
    # signs: negative half of the time for signed ops, never for unsigned ones
    negative = d["aa_magnitude"][rotate, 0] < 0
    assert abs(negative.float().mean() - 0.5) < hoeffding(int(rotate.sum()), 1) and negative.any()
    assert (d["aa_magnitude"][d["aa_op"][:, 0] == OPS.index("Solarize")] >= 0).all()


def test_randaugment_draws_num_ops_uniform_ops_at_the_fixed_magnitude():
    aa = BatchAutoAugment("randaugment", {"num_ops": 3, "magnitude": 15}, size=(32, 32))
    n = 10_000
    d = aa.draw(n, torch.Generator().manual_seed(1))
    assert d["aa_op"].shape == (n, 3)
    freq = torch.tensor([(d["aa_op"] == i).float().mean() for i in aa.ids.tolist()])
    assert (freq - 1 / 14).abs().max() < hoeffding(3 * n, 14)
    for i, op in enumerate(aa.ids.tolist()):
        chosen = d["aa_magnitude"][d["aa_op"] == op].abs()
        assert (chosen == aa.table[i, 15]).all(), OPS[op]


def test_augmix_draws_chains_of_1_to_3_ops_within_severity_and_dirichlet_weights():
    aa = BatchAutoAugment("augmix", {"severity": 2}, size=(30, 30))
    n = 10_000
    d = aa.draw(n, torch.Generator().manual_seed(2))
    op = d["aa_op"].view(n, 3, 3)
    length = (op >= 0).sum(-1)
    assert ((op >= 0) == (torch.arange(3) < length[..., None])).all()  # a chain's ops come first
    freq = torch.bincount(length.flatten() - 1, minlength=3).float() / length.numel()
    assert (freq - 1 / 3).abs().max() < hoeffding(length.numel(), 3)
    assert OPS.index("Identity") not in op.unique().tolist() and len(aa.names) == 13
    # severity 2: magnitudes from the first two of the 10 bins only
    for i, name in enumerate(aa.names):
        chosen = d["aa_magnitude"].view(n, 3, 3)[op == OPS.index(name)].abs()
        assert torch.isin(chosen, aa.table[i, :2]).all(), name
    w = d["aa_weights"]
    assert torch.allclose(w.sum(1), torch.ones(n), atol=1e-5) and (w >= 0).all()
    # alpha 1: m ~ Beta(1, 1) = uniform, so E m = 1/2 and E m^2 = 1/3; the chains share the rest equally
    band = hoeffding(n, 3)
    assert abs(w[:, 0].mean() - 1 / 2) < band and abs((w[:, 0] ** 2).mean() - 1 / 3) < band
    assert (w[:, 1:].mean(0) - 1 / 6).abs().max() < band
    assert BatchAutoAugment("augmix", {"all_ops": False}, size=(30, 30)).names[-1] == "Equalize"


def test_augmix_mixes_the_original_and_its_chains_with_the_drawn_weights():
    aa = BatchAutoAugment("augmix", {"chain_depth": 2, "mixture_width": 2}, size=(10, 12))
    x = images(6)
    d = aa.draw(6, torch.Generator().manual_seed(3))
    out = aa(x, d)
    op, mag = d["aa_op"].view(6, 2, 2), d["aa_magnitude"].view(6, 2, 2)
    for b in range(6):
        mix = d["aa_weights"][b, 0] * x[b]  # float32, added in torchvision's order, truncated
        for i in range(2):
            chain = x[b]
            for k in range(2):
                chain = torchvision_op(chain, OPS[int(op[b, i, k])], float(mag[b, i, k]), "bilinear")
            mix = mix + d["aa_weights"][b, 1 + i] * chain
        assert torch.equal(out[b], mix.to(torch.uint8)), b


def test_random_erasing_boxes_follow_torchvisions_rules():
    size, n, p = (24, 32), 20_000, 0.5
    boxes = BatchRandomErasing(p, size).draw(n, torch.Generator().manual_seed(4))["erase"]
    top, left, h, w = boxes.double().unbind(1)
    erased = h > 0
    assert abs(erased.double().mean() - p) < hoeffding(n, 1)
    assert ((top >= 0) & (left >= 0) & (top + h <= 24) & (left + w <= 32) & (h < 24) & (w < 32)).all()
    area = (h * w / (24 * 32))[erased]
    # rounded sides: area within the scale range up to the rounding of both sides
    assert area.min() > 0.02 * 0.8 and area.max() < 0.33 * 1.25
    aspect = (h / w)[erased]
    assert aspect.min() > 0.3 * 0.7 and aspect.max() < 3.3 / 0.7
    # the same distribution as torchvision's own RandomErasing.make_params (a second, independent sample)
    torch.manual_seed(5)
    reference = v2.RandomErasing(p=1.0, value=0)
    params = [reference.make_params([torch.zeros(3, *size)]) for _ in range(1000)]
    ref_area = torch.tensor([q["h"] * q["w"] / (24 * 32) for q in params if q["v"] is not None], dtype=torch.float64)
    ref_top = torch.tensor([q["i"] / (24 - q["h"]) for q in params if q["v"] is not None and q["h"] < 24])
    assert abs(area.mean() - ref_area.mean()) < 0.015 and abs(area.std() - ref_area.std()) < 0.015
    ours_top = (top / (24 - h))[erased]
    assert abs(ours_top.mean() - ref_top.double().mean()) < 0.04


def test_erase_boxes_equals_torchvision_erase_per_image():
    x = torch.randn(4, 3, 9, 11, generator=torch.Generator().manual_seed(6))
    boxes = torch.tensor([[0, 0, 3, 4], [5, 6, 4, 5], [2, 3, 0, 0], [1, 10, 8, 1]])
    out = erase_boxes(x, boxes)
    for b, (i, j, h, w) in enumerate(boxes.tolist()):
        expected = TF.erase(x[b], i, j, h, w, torch.tensor(0.0)) if h and w else x[b]
        assert torch.equal(out[b], expected)


def test_bad_policies_and_options_raise_user_error():
    with pytest.raises(UserError, match="one of trivial, randaugment, augmix"):
        BatchAutoAugment("autoaugment")
    with pytest.raises(UserError, match="unknown option data.auto_augment_options.severity for trivial"):
        BatchAutoAugment("trivial", {"severity": 3})
    with pytest.raises(UserError, match="magnitude must be an integer from 0 to num_magnitude_bins - 1 = 30"):
        BatchAutoAugment("randaugment", {"magnitude": 31})
    with pytest.raises(UserError, match="all_ops must be a bool"):
        BatchAutoAugment("augmix", {"all_ops": 1})
    with pytest.raises(UserError, match="probability"):
        BatchRandomErasing(1.5, (8, 8))
