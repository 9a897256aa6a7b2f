"""``captcha_chars``: single characters rendered offline by the ``captcha`` package, deterministic per seed."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import PIL
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from mtl.core.errors import UserError
from mtl.data.cache import cache_path, load_or_build
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.tensor_dataset import TensorImageDataset

DEFAULT_CHARSET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_ROOT = "data/captcha_chars"
_RENDER_SIZE = 64  # captcha's default font sizes (42, 50, 56) suit a canvas about this tall
_FORMAT = 1  # bump when the rendering code changes, to invalidate caches


@DATASETS.register("captcha_chars")
def captcha_chars(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    charset: str = DEFAULT_CHARSET,
    per_class: int = 200,
    val_per_class: int = 50,
    size: int = 32,
    seed: int = 0,
) -> TensorImageDataset:
    """One class per character of ``charset``; ``per_class`` train and ``val_per_class`` val images each."""
    split = resolve_split("captcha_chars", split, ("train", "val"), {"test": "val"})
    if not charset or len(set(charset)) != len(charset):
        raise UserError(f"captcha_chars charset must be non-empty with no repeated characters, got {charset!r}")
    count = per_class if split == "train" else val_per_class
    if count < 1 or size < 8:
        raise UserError(f"captcha_chars needs per_class and val_per_class >= 1 and size >= 8, got {count} and {size}")
    key = {
        "charset": charset,
        "count": count,
        "size": size,
        "seed": seed,
        "split": split,
        "captcha": _captcha().__version__,
        "pillow": PIL.__version__,
        "format": _FORMAT,
    }
    path = cache_path(root or DEFAULT_ROOT, "captcha_chars", key)
    tensors = load_or_build(path, key, lambda: render_chars(charset, count, size, f"mtl.captcha_chars/{seed}/{split}"))
    return TensorImageDataset(tensors["images"], tensors["labels"], list(charset), transform)


def render_chars(charset: str, per_class: int, size: int, seed: str) -> dict[str, Tensor]:
    """Render ``per_class`` images of each character: uint8 images (N,3,size,size), labels (N,) cycling the charset."""
    render_size = max(_RENDER_SIZE, size)
    font_sizes = tuple(round(s * render_size / _RENDER_SIZE) for s in (42, 50, 56))
    generator = _captcha().image.ImageCaptcha(width=render_size, height=render_size, font_sizes=font_sizes)
    n = per_class * len(charset)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.arange(n) % len(charset)
    with seeded_captcha(random.Random(seed)):
        for i in tqdm(range(n), desc=f"rendering captcha_chars ({seed})", unit="img", disable=None, leave=False):
            image = generator.generate_image(charset[int(labels[i])])
            if render_size != size:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            images[i] = pil_to_tensor(image)
    return {"images": images, "labels": labels}


class SeededSecrets:
    """The part of the ``secrets`` module that ``captcha.image`` uses, drawn from a seeded ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq: Sequence[Any]) -> Any:
        return self._rng.choice(seq)


@contextmanager
def seeded_captcha(rng: random.Random) -> Iterator[None]:
    """Make ``captcha.image`` draw its randomness from ``rng`` (it uses ``secrets``, which cannot be seeded)."""
    captcha = _captcha()
    original = captcha.image.secrets
    captcha.image.secrets = SeededSecrets(rng)
    try:
        yield
    finally:
        captcha.image.secrets = original


def _captcha() -> Any:
    """The ``captcha`` package, imported on first use so that other data sets work without it."""
    try:
        import captcha.image
    except ImportError:
        raise UserError("the captcha_chars data set needs the captcha package: pip install captcha") from None
    return captcha
