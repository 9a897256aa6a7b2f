"""Drawing primitives of dense predictions: distinct class colours, a depth colormap, and the cards that show
input, ground truth and prediction side by side with their key (class legend, colour bar). Drawn with PIL:
matplotlib is not a dependency."""

from __future__ import annotations

import colorsys
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.v2.functional import to_image, to_pil_image

# viridis at 0, 1/4, 1/2, 3/4, 1: the depth colormap (dark = near, yellow = far)
_VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]) / 255.0


def palette(n: int) -> Tensor:
    """(n, 3) uint8 distinct colours: hues a golden ratio apart, alternating in brightness."""
    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95 if i % 2 == 0 else 0.7) for i in range(n)]
    return (torch.tensor(colours).reshape(n, 3) * 255).round().to(torch.uint8)


def colormap(values: Tensor) -> Tensor:
    """(H, W) values -> (3, H, W) viridis colours in [0, 1], scaled from the map's minimum to its maximum."""
    v = values.float()
    lo, hi = v.min(), v.max()
    v = (v - lo) / (hi - lo).clamp(min=1e-12) * (len(_VIRIDIS) - 1)
    i = v.floor().long().clamp(0, len(_VIRIDIS) - 2)
    frac = (v - i).unsqueeze(0)
    return _VIRIDIS[i].permute(2, 0, 1) * (1 - frac) + _VIRIDIS[i + 1].permute(2, 0, 1) * frac


# --------------------------------------------------------------------------- overlay cards (TensorBoard)

TILE = 128  # the smallest side of a tile in an overlay card: readable at TensorBoard's default card size
COLUMNS = ("input", "ground truth", "prediction")
_PAD, _HEADER = 4, 14
_TEXT, _BACKGROUND = (20, 20, 20), (255, 255, 255)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def colormap_between(values: Tensor, lo: float, hi: float) -> Tensor:
    """(H, W) values -> (3, H, W) viridis colours in [0, 1] on the fixed scale ``lo`` (dark) .. ``hi`` (yellow), so
    that several maps (a prediction and its ground truth) share one colour bar."""
    v = ((values.float() - lo) / max(hi - lo, 1e-12)).clamp(0, 1) * (len(_VIRIDIS) - 1)
    i = v.floor().long().clamp(0, len(_VIRIDIS) - 2)
    frac = (v - i).unsqueeze(0)
    return _VIRIDIS[i].permute(2, 0, 1) * (1 - frac) + _VIRIDIS[i + 1].permute(2, 0, 1) * frac


def _tile(picture: Tensor, size: Tuple[int, int]) -> Image.Image:
    """A (3, H, W) picture in [0, 1] as a PIL image of ``size`` (h, w), nearest-neighbour (no blended labels)."""
    x = picture.detach().float().cpu().clamp(0, 1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=size, mode="nearest")[0]
    return to_pil_image(x)


def tile_size(height: int, width: int, side: int = TILE) -> Tuple[int, int]:
    """(h, w) enlarged by a whole factor until the smaller side is at least ``side`` (never shrunk)."""
    factor = max(1, math.ceil(side / max(min(height, width), 1)))
    return height * factor, width * factor


def card(
    rows: Sequence[Sequence[Tensor]], columns: Sequence[str] = COLUMNS, key: Optional[Image.Image] = None
) -> Tensor:
    """One uint8 (3, H, W) picture: a header of column titles, one row of (3, h, w) pictures in [0, 1] per image,
    each enlarged to at least ``TILE`` pixels (the first picture's shape sets the row's), and ``key`` (a legend or
    a colour bar) to the right."""
    h, w = tile_size(*rows[0][0].shape[-2:])
    n_cols = max(len(r) for r in rows)
    body_w = _PAD + n_cols * (w + _PAD)
    body_h = _HEADER + len(rows) * (h + _PAD) + _PAD
    key_w = key.width + _PAD if key is not None else 0
    out = Image.new("RGB", (body_w + key_w, max(body_h, _HEADER + (key.height if key is not None else 0))), _BACKGROUND)
    draw = ImageDraw.Draw(out)
    font = _font()
    for j, title in enumerate(columns[:n_cols]):
        draw.text((_PAD + j * (w + _PAD), 1), title, fill=_TEXT, font=font)
    for i, row in enumerate(rows):
        for j, picture in enumerate(row):
            out.paste(_tile(picture, (h, w)), (_PAD + j * (w + _PAD), _HEADER + i * (h + _PAD)))
    if key is not None:
        out.paste(key, (body_w, _HEADER))
    return to_image(out)


def class_legend(names: Sequence[str], colours: Tensor, height: int = 4 * TILE) -> Image.Image:
    """Swatches of ``colours`` ((n, 3) uint8) with their class ``names``, in columns of at most ``height`` pixels."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = 14
    per_col = max(1, height // line)
    n_cols = max(1, math.ceil(len(names) / per_col))
    col_w = 18 + int(max((probe.textlength(s, font=font) for s in names), default=0)) + 8
    img = Image.new("RGB", (n_cols * col_w, min(len(names), per_col) * line + 2), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    for k, (name, colour) in enumerate(zip(names, colours.tolist())):
        x, y = (k // per_col) * col_w, (k % per_col) * line + 1
        draw.rectangle([x + 2, y + 1, x + 13, y + 12], fill=tuple(colour), outline=_TEXT)
        draw.text((x + 17, y + 1), name, fill=_TEXT, font=font)
    return img


def colour_bar(lo: float, hi: float, height: int = 2 * TILE, label: str = "") -> Image.Image:
    """A vertical viridis bar from ``lo`` (bottom, dark) to ``hi`` (top, yellow) with five labelled ticks: the key of
    ``colormap_between(values, lo, hi)``."""
    font = _font()
    bar_w, top = 14, 22 if label else 8
    ramp = torch.linspace(hi, lo, height).unsqueeze(1).expand(height, bar_w)
    ticks = [lo + (hi - lo) * k / 4 for k in range(5)]
    text = [f"{t:.3g}" for t in ticks]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = bar_w + 8 + int(max(probe.textlength(s, font=font) for s in text)) + 4
    width = max(width, int(probe.textlength(label, font=font)) + 4)
    img = Image.new("RGB", (width, height + top + 8), _BACKGROUND)
    img.paste(to_pil_image(colormap_between(ramp, lo, hi)), (2, top))
    draw = ImageDraw.Draw(img)
    if label:
        draw.text((2, 1), label, fill=_TEXT, font=font)
    for k, s in enumerate(text):
        y = top + round((height - 1) * (1 - k / 4))
        draw.line([(2 + bar_w, y), (2 + bar_w + 4, y)], fill=_TEXT)
        draw.text((2 + bar_w + 6, y - 6), s, fill=_TEXT, font=font)
    return img


def text_key(lines: Sequence[str]) -> Image.Image:
    """Lines of text as a key, e.g. how a normal map's colours read (``colour = (n + 1) / 2``)."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    img = Image.new(
        "RGB", (int(max(probe.textlength(s, font=font) for s in lines)) + 6, 14 * len(lines) + 4), _BACKGROUND
    )
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((2, 2 + 14 * k), line, fill=_TEXT, font=font)
    return img
