"""``captcha``: whole captcha texts rendered by the ``captcha`` package, one classification target per position."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import PIL
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from mtl.core.errors import UserError
from mtl.data.cache import cache_path, load_or_build
from mtl.data.captcha_chars import DEFAULT_CHARSET, seeded_captcha
from mtl.data.dense_transforms import normalize, random_shift
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_ROOT = "data/captcha"
_FORMAT = 1  # bump when the rendering code changes, to invalidate caches
_MAX_SHIFT = 3  # pixels of random translation when augmenting (no flips: text is not mirror-symmetric)


class CaptchaTextDataset(Dataset):
    """Items ``{"image", "char0", ..., "char{L-1}"}``: the image and the class index of each character."""

    def __init__(
        self,
        images: Tensor,
        texts: Tensor,
        charset: str,
        augment: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.images, self.texts = images, texts
        self.classes = list(charset)
        self.keys = [f"char{i}" for i in range(texts.shape[1])]
        self.targets = {
            key: {"type": "classification", "num_classes": len(charset), "classes": list(charset)} for key in self.keys
        }
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self.images[index].float() / 255
        if self.augment:
            image = random_shift(image, _MAX_SHIFT)
        item = {"image": normalize(image, self.mean, self.std)}
        item.update({key: self.texts[index, i].clone() for i, key in enumerate(self.keys)})
        return item

    def text(self, index: int) -> str:
        """The rendered text of item ``index``."""
        return "".join(self.classes[int(c)] for c in self.texts[index])


@DATASETS.register("captcha")
def captcha(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    augment: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    length: int = 4,
    width: int = 160,
    height: int = 60,
    size: Sequence[int] = (48, 128),
    train_size: int = 2000,
    val_size: int = 500,
    seed: int = 0,
    charset: str = DEFAULT_CHARSET,
) -> CaptchaTextDataset:
    """Random ``length``-character texts of ``charset`` rendered at ``width`` x ``height`` and resized to
    ``size`` (h, w); targets ``char0``.. ``char{length-1}``. ``augment`` = a small random shift."""
    split = resolve_split("captcha", split, ("train", "val"), {"test": "val"})
    if transform is not None:
        raise UserError("data set 'captcha' normalises and augments itself; pass augment/mean/std, not a transform")
    if not charset or len(set(charset)) != len(charset):
        raise UserError(f"captcha charset must be non-empty with no repeated characters, got {charset!r}")
    count = train_size if split == "train" else val_size
    if len(size) != 2 or min(size) < 8 or min(width, height) < 16 or count < 1 or length < 1:
        raise UserError(
            f"captcha needs size [h, w] >= 8, width and height >= 16, length >= 1 and train_size/val_size >= 1; "
            f"got size {list(size)}, {width}x{height}, length {length}, {count} images"
        )
    module = _captcha()
    key = {
        "charset": charset,
        "length": length,
        "count": count,
        "render": [width, height],
        "size": [int(s) for s in size],
        "seed": seed,
        "split": split,
        "captcha": module.__version__,
        "pillow": PIL.__version__,
        "format": _FORMAT,
    }
    path = cache_path(root or DEFAULT_ROOT, "captcha", key)
    tensors = load_or_build(
        path, key, lambda: render_texts(charset, length, count, (width, height), size, f"mtl.captcha/{seed}/{split}")
    )
    return CaptchaTextDataset(tensors["images"], tensors["texts"], charset, augment=augment, mean=mean, std=std)


def render_texts(
    charset: str, length: int, count: int, render_size: tuple[int, int], size: Sequence[int], seed: str
) -> dict[str, Tensor]:
    """``count`` random texts: uint8 images (N,3,h,w) and character indices (N,length)."""
    rng = random.Random(seed)
    generator = _captcha().image.ImageCaptcha(width=render_size[0], height=render_size[1])
    texts = torch.tensor([[rng.randrange(len(charset)) for _ in range(length)] for _ in range(count)]).long()
    h, w = int(size[0]), int(size[1])
    images = torch.empty(count, 3, h, w, dtype=torch.uint8)
    with seeded_captcha(rng):
        for i in tqdm(range(count), desc=f"rendering captcha ({seed})", unit="img", disable=None, leave=False):
            image = generator.generate_image("".join(charset[int(c)] for c in texts[i]))
            if image.size != (w, h):
                image = image.resize((w, h), Image.Resampling.BILINEAR)
            images[i] = pil_to_tensor(image.convert("RGB"))
    return {"images": images, "texts": texts.reshape(count, length)}


def _captcha() -> Any:
    """The ``captcha`` package, imported on first use so that other data sets work without it."""
    try:
        import captcha.image
    except ImportError:
        raise UserError("the captcha data set needs the captcha package: pip install captcha") from None
    return captcha
