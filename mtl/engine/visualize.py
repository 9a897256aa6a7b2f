"""Pictures and tables for people: titled prediction grids (as the tutorials' ``visualize_model``), overlays of
dense predictions, confusion matrices and plain-text tables. Drawn with PIL: matplotlib is not a dependency."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.v2.functional import to_image, to_pil_image
from torchvision.utils import make_grid

from mtl.tasks.base import Task
from mtl.tasks.drawing import colormap, palette  # noqa: F401  (their home before task types drew)

RGB = Tuple[int, int, int]
_RIGHT, _WRONG, _PLAIN = (80, 220, 80), (240, 80, 80), (235, 235, 235)


def _class_name(classes: Sequence[str], i: int) -> str:
    return classes[i] if 0 <= i < len(classes) else str(i)


def titled_grid(
    images: Tensor, titles: Sequence[str], colours: Optional[Sequence[RGB]] = None, min_size: int = 96
) -> Tensor:
    """(N, 3, H, W) images in [0, 1] -> one uint8 (3, H', W') grid, each tile with a title bar."""
    if images.shape[-1] < min_size:
        images = F.interpolate(images, scale_factor=min_size / images.shape[-1], mode="nearest")
    tiles = []
    for i, (img, text) in enumerate(zip(images, titles)):
        pil = to_pil_image(img.clamp(0, 1))
        draw = ImageDraw.Draw(pil)
        draw.rectangle([0, 0, pil.width, 12], fill=(0, 0, 0))
        draw.text((2, 0), text, fill=colours[i] if colours is not None else _PLAIN)
        tiles.append(to_image(pil))
    return make_grid(torch.stack(tiles), nrow=min(8, len(tiles)), padding=2)


def prediction_grid(
    images: Tensor, preds: Tensor, targets: Tensor, classes: Sequence[str], min_size: int = 96
) -> Tensor:
    """(N, 3, H, W) images in [0, 1] -> one (3, H', W') grid; green title if right, red if wrong."""
    titles, colours = [], []
    for p, t in zip(preds.tolist(), targets.tolist()):
        right = p == t
        titles.append(
            _class_name(classes, p) if right else f"{_class_name(classes, p)} (true {_class_name(classes, t)})"
        )
        colours.append(_RIGHT if right else _WRONG)
    return titled_grid(images, titles, colours, min_size)


# --------------------------------------------------------------------------- dense predictions


def dense_overlay(task: Task, output: Tensor, image: Tensor) -> Tensor:
    """``task.draw(output, image)``: one dense prediction as a (3, H, W) picture (kept for code written before task
    types drew their own predictions)."""
    return task.draw(output, image)


# --------------------------------------------------------------------------- confusion matrices


def _label_strip(names: Sequence[str], cell: int, width: int, font: ImageFont.ImageFont, right: bool) -> Image.Image:
    """A (width x len(names) * cell) image of the names, one per cell row, right- or left-aligned."""
    strip = Image.new("RGB", (width, len(names) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        x = width - 4 - draw.textlength(name, font=font) if right else 4
        draw.text((x, i * cell + (cell - 11) / 2), name, fill=(0, 0, 0), font=font)
    return strip


def confusion_image(matrix: Tensor, classes: Sequence[str], title: str = "") -> Tensor:
    """A confusion matrix (rows true, columns predicted) as a uint8 (3, H, W) heatmap.

    Cells are shaded by the fraction of their row (white 0 -> blue 1) and show their counts when they are large
    enough; class names label the rows (left) and columns (top, rotated).
    """
    counts = matrix.detach().cpu().long()
    n = counts.shape[0]
    cell = max(4, min(40, 640 // max(n, 1)))
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = [(_class_name(classes, i)[:18]) for i in range(n)] if cell >= 11 else []
    label = int(max((probe.textlength(s, font=font) for s in names), default=0)) + 8 if names else 0
    title_h = 16 if title else 0
    pad = 6
    width = max(pad + label + n * cell + pad, int(probe.textlength(title, font=font)) + 2 * pad)
    img = Image.new("RGB", (width, title_h + label + n * cell + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
    x0, y0 = pad + label, title_h + label
    if names:
        img.paste(_label_strip(names, cell, label, font, right=True), (pad, y0))
        img.paste(_label_strip(names, cell, label, font, right=False).rotate(90, expand=True), (x0, title_h))
    fractions = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    for i in range(n):
        for j in range(n):
            f = float(fractions[i, j])
            fill = tuple(round(255 + (c - 255) * f) for c in (33, 90, 170))
            box = [x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1]
            draw.rectangle(box, fill=fill, outline=(210, 210, 210) if cell >= 8 else None)
            text = str(int(counts[i, j]))
            if cell >= 18 and probe.textlength(text, font=font) <= cell - 2:
                tw = draw.textlength(text, font=font)
                draw.text(
                    (box[0] + (cell - tw) / 2, box[1] + (cell - 11) / 2),
                    text,
                    font=font,
                    fill=(255, 255, 255) if f > 0.5 else (30, 30, 30),
                )
    return to_image(img)


def confusion_text(matrix: Tensor, classes: Sequence[str]) -> str:
    """The confusion matrix as a text table: one row per true class, one column per predicted class."""
    counts = matrix.detach().cpu().long().tolist()
    names = [_class_name(classes, i) for i in range(len(counts))]
    rows = [["true \\ predicted", *names]] + [[name, *map(str, row)] for name, row in zip(names, counts)]
    return text_table(rows, right=range(1, len(names) + 1))


def text_table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Rows of cells (the first is the header) as aligned plain text; columns in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(len(r) for r in rows))]
    right = set(right)
    lines = [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
    return "\n".join(lines)
