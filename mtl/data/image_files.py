"""Reading image files with PIL: any mode to RGB, and a cheap check that a file decodes."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def is_image_file(path: str) -> bool:
    """True for a visible file with an image extension (``._x.jpg`` macOS sidecars are not images)."""
    return not os.path.basename(path).startswith(".") and path.lower().endswith(IMG_EXTENSIONS)


def check_image(path: str) -> None:
    """Decode the whole file, raising if it is unreadable; JPEGs decode at 1/8 scale, which still reads every byte."""
    with Image.open(path) as image:
        image.draft("RGB", (1, 1))
        image.load()


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB, upright per its EXIF orientation."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (grey, 16-bit grey, palette, alpha, CMYK, ...) to 8-bit RGB; transparency becomes white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255 instead of rescaling them.
        grey = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        image = Image.fromarray(grey.astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")
