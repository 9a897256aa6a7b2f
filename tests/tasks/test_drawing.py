"""Overlay cards of dense tasks: input, ground truth and prediction side by side, enlarged, with their key (class
legend, depth colour bar); checked pixel by pixel against colours computed by hand."""

import torch

from mtl.tasks.base import build_task
from mtl.tasks.drawing import _HEADER, _PAD, _VIRIDIS, TILE, colour_bar, palette, tile_size


def tile(card, row, col, h, w):
    """The (3, h, w) tile at ``row``, ``col`` of a card (uint8)."""
    y, x = _HEADER + row * (h + _PAD), _PAD + col * (w + _PAD)
    return card[:, y : y + h, x : x + w]


def as_uint8(picture):
    return (picture.clamp(0, 1) * 255).round().to(torch.uint8)


def same(a, b):
    """Equal colours, up to the last bit that turning [0, 1] floats into bytes may round either way."""
    return int((a.int() - b.int()).abs().max()) <= 1


def test_tiles_are_enlarged_by_a_whole_factor_to_the_readable_size():
    assert tile_size(16, 16) == (128, 128) and tile_size(24, 32) == (144, 192) and tile_size(200, 300) == (200, 300)
    assert TILE >= 128


def test_segmentation_card_truth_beside_prediction_with_a_legend_of_the_shown_classes():
    task = build_task("seg", type="segmentation", target="seg", num_classes=4, classes=["sky", "wall", "floor", "box"])
    image = torch.full((1, 3, 8, 8), 0.4)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 4:] = 2
    target[0, 0, 0] = -1  # ignored pixel
    logits = torch.zeros(1, 4, 8, 8)
    logits[0, 1] = 5.0  # predicts "wall" everywhere
    card = task.overlay(logits, target, image)
    h, w = tile_size(8, 8)
    colours = palette(4).float() / 255
    truth, pred = tile(card, 0, 1, h, w), tile(card, 0, 2, h, w)
    f = h // 8  # each pixel became an f x f block
    assert same(truth[:, f * 2, f * 2], as_uint8(0.5 * 0.4 + 0.5 * colours[0]))  # sky, blended 50%
    assert same(truth[:, f * 6, f * 2], as_uint8(0.5 * 0.4 + 0.5 * colours[2]))  # floor
    assert same(truth[:, 0, 0], as_uint8(torch.full((3,), 0.3 * 0.4)))  # ignored: the image darkened
    assert same(pred[:, f * 6, f * 2], as_uint8(0.5 * 0.4 + 0.5 * colours[1]))  # wall everywhere
    # the legend lists sky, wall, floor (shown), not box: three swatches in the card's right part
    legend = task.draw_key(logits, target)
    assert legend.height == 3 * 14 + 2
    for k, c in enumerate([0, 1, 2]):
        assert legend.getpixel((7, k * 14 + 7)) == tuple(palette(4)[c].tolist())
    assert card.shape[-1] == _PAD + 3 * (w + _PAD) + legend.width + _PAD


def test_depth_card_shares_one_colour_scale_with_its_colour_bar():
    task = build_task("depth", type="depth", target="depth")
    target = torch.tensor([[0.0, 2.0], [4.0, 6.0]]).view(1, 1, 2, 2)
    pred = torch.tensor([[9.0, 2.0], [4.0, 1.0]]).view(1, 1, 2, 2)
    card = task.overlay(pred, target, torch.rand(1, 3, 2, 2))
    h, w = tile_size(2, 2)
    truth, shown = tile(card, 0, 1, h, w), tile(card, 0, 2, h, w)
    f = h // 2
    lo, mid, hi = as_uint8(_VIRIDIS[0]), as_uint8(_VIRIDIS[2]), as_uint8(_VIRIDIS[4])
    assert same(truth[:, 0, 0], torch.zeros(3, dtype=torch.uint8))  # no ground truth: black
    assert same(truth[:, 0, f], lo) and same(truth[:, f, 0], mid) and same(truth[:, f, f], hi)
    assert same(shown[:, 0, f], lo) and same(shown[:, f, 0], mid)  # same values, same colours
    assert same(shown[:, 0, 0], hi) and same(shown[:, f, f], lo)  # beyond the range: the end colours
    bar = colour_bar(2.0, 6.0, label="depth")
    assert bar.getpixel((5, 22)) == tuple(hi.tolist())  # top: 6
    assert bar.getpixel((5, 22 + 2 * TILE - 1)) == tuple(lo.tolist())  # bottom: 2


def test_normals_truth_in_the_prediction_colours_invalid_black():
    task = build_task("normal", type="normals", target="normal")
    target = torch.zeros(3, 2, 2)
    target[:, 0, 1] = torch.tensor([0.0, 0.0, -2.0])  # not unit: drawn as its direction
    picture = task.draw_target(target, torch.rand(3, 2, 2))
    assert torch.allclose(picture[:, 0, 1], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.equal(picture[:, 0, 0], torch.zeros(3))
    assert torch.allclose(task.draw(target[None, :, :, :][0], torch.rand(3, 2, 2))[:, 0, 1], picture[:, 0, 1])
