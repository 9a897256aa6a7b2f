"""TrivialAugment, RandAugment, AugMix and random erasing for whole batches, every image with its own draws.

torchvision's v2 classes draw one op per call, so a batch tensor would get the same op for every image. Here the
random parameters of every image (op, magnitude, sign; AugMix's chain depths and Dirichlet weights; erasing boxes)
are drawn first on a CPU generator (``draw``), for the whole global batch, and then applied to a uint8 batch on
its own device: geometric ops as one per-image affine sampling, colour ops with per-image factors, and histogram
ops (autocontrast, equalize) by torchvision's own batched kernels on the images that drew them.

Every op follows ``torchvision.transforms.v2._auto_augment._AutoAugmentBase._apply_image_or_video_transform`` and
the ``torchvision.transforms.v2.functional`` kernel it calls on uint8 tensors, rounding included:

- ShearX/ShearY: affine shear by ``atan(m)`` about the top-left corner; TranslateX/Y: ``int(m)`` pixels; Rotate:
  ``m`` degrees about the centre (counter-clockwise). Inverse matrix as ``_get_inverse_affine_matrix``, grid as
  ``_affine_grid`` (pixel centres, align_corners=False), sampled with fill 0 and rounded to uint8.
- Brightness ``x * (1 + m)``; Color (saturation) and Contrast blend with the floored luma / its mean:
  ``x * f + y * (1 - f)`` with one rounding of the sum (the fused multiply-add of ``add_(y, alpha=1 - f)``),
  truncated to uint8; Sharpness blends the interior pixels with the rounded 3x3 [1 1 1; 1 5 1; 1 1 1] / 13 blur.
- Posterize keeps the top ``int(m)`` bits; Solarize inverts pixels >= ``255 * m`` (a float32 threshold);
  AutoContrast and Equalize per image and channel.

Magnitude tables and policies: TrivialAugment (Mueller & Hutter 2021, "TrivialAugment: Tuning-free Yet
State-of-the-Art Data Augmentation", the Wide space), RandAugment (Cubuk et al. 2020), AugMix (Hendrycks et al.
2020, eq. in Algorithm 1: ``x_augmix = m * x + (1 - m) * sum_i w_i chain_i(x)``, ``w ~ Dirichlet(alpha)``,
``m ~ Beta(alpha, alpha)``), each as torchvision's class of that name defines it. Random erasing: Zhong et al.
2020, as torchvision's ``RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)`` on normalised images.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from mtl.config.schema import AUTO_AUGMENT_OPTIONS, auto_augment_problem
from mtl.core.errors import UserError

__all__ = ["BatchAutoAugment", "BatchRandomErasing", "OPS", "apply_ops", "erase_boxes", "policy_options"]

# op id -> name; an id's magnitude means what torchvision's op of that name takes (NONE: an AugMix chain ended)
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
_ID = {name: i for i, name in enumerate(OPS)}
_GEOMETRIC = (_ID["ShearX"], _ID["ShearY"], _ID["TranslateX"], _ID["TranslateY"], _ID["Rotate"])
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
_COLOUR = ("Brightness", "Color", "Contrast", "Sharpness")


def _space(policy: str, bins: int, size: Tuple[int, int]) -> Dict[str, Optional[Tensor]]:
    """The magnitudes of each op of ``policy`` by bin (float32, as torchvision's ``_AUGMENTATION_SPACE``), None for
    ops without one; dict order = the order torchvision draws ops from."""
    height, width = size
    lin = torch.linspace
    if policy == "trivial":
        shear, translate, rotate, colour, poster = (0.99, 0.99), (32.0, 32.0), 135.0, 0.99, 6
    elif policy == "randaugment":
        shear, translate, rotate, colour, poster = (0.3, 0.3), (150 / 331 * width, 150 / 331 * height), 30.0, 0.9, 4
    else:  # augmix
        shear, translate, rotate, colour, poster = (0.3, 0.3), (width / 3.0, height / 3.0), 30.0, 0.9, 4
    posterize = (8 if policy != "augmix" else 4) - (torch.arange(bins) / ((bins - 1) / poster))
    space: Dict[str, Optional[Tensor]] = {
        "Identity": None,
        "ShearX": lin(0.0, shear[0], bins),
        "ShearY": lin(0.0, shear[1], bins),
        "TranslateX": lin(0.0, translate[0], bins),
        "TranslateY": lin(0.0, translate[1], bins),
        "Rotate": lin(0.0, rotate, bins),
        "Brightness": lin(0.0, colour, bins),
        "Color": lin(0.0, colour, bins),
        "Contrast": lin(0.0, colour, bins),
        "Sharpness": lin(0.0, colour, bins),
        "Posterize": posterize.round().int().float(),
        "Solarize": lin(1.0, 0.0, bins),
        "AutoContrast": None,
        "Equalize": None,
    }
    if policy == "augmix":  # no Identity; geometric and histogram ops first, colour ops last (all_ops)
        order = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Posterize", "Solarize")
        order += ("AutoContrast", "Equalize", *_COLOUR)
        space = {name: space[name] for name in order}
    return space


def policy_options(policy: str, options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``options`` of ``policy`` completed with torchvision's defaults; an unknown policy or option: UserError."""
    problem = auto_augment_problem(policy, dict(options or {}))
    if problem:
        raise UserError(problem)
    return {**AUTO_AUGMENT_OPTIONS[policy], **(options or {})}


class BatchAutoAugment:
    """A policy (``trivial`` | ``randaugment`` | ``augmix``) for uint8 (B, C, H, W) batches of ``size`` (H, W).

    ``options`` override torchvision's defaults (``mtl.config.schema.AUTO_AUGMENT_OPTIONS``: TrivialAugmentWide
    num_magnitude_bins 31; RandAugment num_ops 2, magnitude 9, num_magnitude_bins 31; AugMix severity 3,
    mixture_width 3, chain_depth -1 (1 to 3 per chain), alpha 1.0, all_ops true). Interpolation as torchvision's
    classes: nearest for TrivialAugment and RandAugment, bilinear for AugMix; fill 0.
    """

    def __init__(self, policy: str, options: Optional[Mapping[str, Any]] = None, size: Tuple[int, int] = (224, 224)):
        self.policy = policy
        self.options = policy_options(policy, options)
        self.size = (int(size[0]), int(size[1]))
        o = self.options
        if policy == "augmix":
            self.bins, self.mode = 10, "bilinear"  # torchvision's _PARAMETER_MAX
            space = _space(policy, self.bins, self.size)
            if not o["all_ops"]:
                space = {k: v for k, v in space.items() if k not in _COLOUR}
        else:
            self.bins, self.mode = o["num_magnitude_bins"], "nearest"
            space = _space(policy, self.bins, self.size)
        self.names = list(space)
        self.ids = torch.tensor([_ID[n] for n in self.names])
        # (ops, bins) magnitudes (0 for ops without one) and which ops draw a sign
        self.table = torch.stack([v.double() if v is not None else torch.zeros(self.bins) for v in space.values()])
        self.signed = torch.tensor([n in _SIGNED and space[n] is not None for n in self.names])

    def __repr__(self) -> str:
        return f"BatchAutoAugment({self.policy!r}, {self.options})"

    def _ops(self, shape: Tuple[int, ...], bin_of: Callable[[Tuple[int, ...]], Tensor], generator: Any) -> tuple:
        """(op ids, signed magnitudes float64) of ``shape``: each op uniform over the policy's, its bin by ``bin_of``
        and, for signed ops, a sign -1 with probability 1/2 (drawn for every op; used where it is signed)."""
        choice = torch.randint(len(self.names), shape, generator=generator)
        bins = bin_of(shape)
        negative = torch.rand(shape, generator=generator, dtype=torch.float64) <= 0.5
        magnitude = self.table[choice, bins]
        magnitude = torch.where(negative & self.signed[choice], -magnitude, magnitude)
        return self.ids[choice], magnitude

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """The random parameters of ``n`` images, on the CPU: ``aa_op`` (n, K) op ids (OPS) applied in order,
        ``aa_magnitude`` (n, K) float64; AugMix also ``aa_weights`` (n, 1 + mixture_width): the original's weight
        m and the chains' (1 - m) * w_i, and K = mixture_width * depth with ids -1 after a chain's end."""
        o = self.options
        if self.policy == "trivial":
            op, magnitude = self._ops((n, 1), lambda s: torch.randint(self.bins, s, generator=generator), generator)
            return {"aa_op": op, "aa_magnitude": magnitude}
        if self.policy == "randaugment":
            fixed = lambda s: torch.full(s, o["magnitude"], dtype=torch.long)  # noqa: E731
            op, magnitude = self._ops((n, o["num_ops"]), fixed, generator)
            return {"aa_op": op, "aa_magnitude": magnitude}
        width, depth = o["mixture_width"], o["chain_depth"] if o["chain_depth"] > 0 else 3
        severity = lambda s: torch.randint(o["severity"], s, generator=generator)  # noqa: E731
        op, magnitude = self._ops((n, width, depth), severity, generator)
        if o["chain_depth"] <= 0:  # stochastic depth: 1 to 3 ops per chain
            length = torch.randint(1, 4, (n, width, 1), generator=generator)
            op = torch.where(torch.arange(depth) < length, op, torch.full_like(op, -1))
        alpha = float(o["alpha"])
        m = torch._sample_dirichlet(torch.full((n, 2), alpha, dtype=torch.float32), generator=generator)
        w = torch._sample_dirichlet(torch.full((n, width), alpha, dtype=torch.float32), generator=generator)
        weights = torch.cat([m[:, :1], w * m[:, 1:]], dim=1)
        return {"aa_op": op.reshape(n, -1), "aa_magnitude": magnitude.reshape(n, -1), "aa_weights": weights}

    def __call__(self, images: Tensor, draws: Mapping[str, Tensor]) -> Tensor:
        """uint8 (B, C, H, W) -> uint8, image b augmented with ``draws``' row b (from ``draw``)."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise UserError(f"auto-augment takes uint8 (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        op, magnitude = draws["aa_op"].cpu(), draws["aa_magnitude"].cpu()
        if self.policy != "augmix":
            for k in range(op.shape[1]):
                images = apply_ops(images, op[:, k], magnitude[:, k], self.mode)
            return images
        width = draws["aa_weights"].shape[1] - 1
        op, magnitude = op.view(len(op), width, -1), magnitude.view(len(op), width, -1)
        weights = draws["aa_weights"].to(images.device, torch.float32)[:, :, None, None, None]
        mix = weights[:, 0] * images  # float32, summed in torchvision's order, truncated to uint8
        for i in range(width):
            chain = images
            for k in range(op.shape[2]):
                chain = apply_ops(chain, op[:, i, k], magnitude[:, i, k], self.mode)
            mix = mix + weights[:, i + 1] * chain
        return mix.clamp_(0, 255).to(torch.uint8)


def apply_ops(images: Tensor, op: Tensor, magnitude: Tensor, mode: str = "nearest") -> Tensor:
    """uint8 (B, C, H, W): image b through op ``op[b]`` (an id of OPS; -1 or Identity: unchanged) with magnitude
    ``magnitude[b]`` (signed, as torchvision's ``_apply_image_or_video_transform`` takes it); ``mode``: the
    interpolation of the geometric ops. ``op`` and ``magnitude`` are CPU tensors; images are grouped by op."""
    out = images.clone()
    geometric = torch.isin(op, torch.tensor(_GEOMETRIC))
    if bool(geometric.any()):
        rows = geometric.nonzero().squeeze(1)
        out[rows.to(images.device)] = _affine(images[rows.to(images.device)], op[rows], magnitude[rows], mode)
    for name, fn in _COLOUR_OPS.items():
        rows = (op == _ID[name]).nonzero().squeeze(1)
        if len(rows):
            on = rows.to(images.device)
            out[on] = fn(images[on], magnitude[rows])
    return out


# --- geometric ops ------------------------------------------------------------------------------------------------


def _affine(images: Tensor, op: Tensor, magnitude: Tensor, mode: str) -> Tensor:
    """Shear, translate or rotate each image by its own op and magnitude, as torchvision's ``affine_image`` and
    ``rotate_image`` (expand=False) on uint8 tensors: fill 0, rounded."""
    height, width = images.shape[-2:]
    n = len(op)
    zeros = torch.zeros(n, dtype=torch.float64)
    m = magnitude.to(torch.float64)
    shear = torch.deg2rad(torch.rad2deg(torch.atan(m)))  # torchvision passes degrees(atan(m))
    shear_x = torch.where(op == _ID["ShearX"], shear, zeros)
    shear_y = torch.where(op == _ID["ShearY"], shear, zeros)
    tx = torch.where(op == _ID["TranslateX"], torch.trunc(m), zeros)  # int(magnitude) pixels
    ty = torch.where(op == _ID["TranslateY"], torch.trunc(m), zeros)
    angle = torch.where(op == _ID["Rotate"], -torch.remainder(m, 360.0), zeros)  # rotate: the inverse of affine's
    sheared = (op == _ID["ShearX"]) | (op == _ID["ShearY"])  # about the top-left corner (center=[0, 0])
    cx = torch.where(sheared, torch.full_like(m, -width / 2), zeros)
    cy = torch.where(sheared, torch.full_like(m, -height / 2), zeros)
    matrix = _inverse_affine(torch.deg2rad(angle), shear_x, shear_y, tx, ty, cx, cy)
    grid = _pixel_grid(matrix.to(torch.float32).to(images.device), width, height)
    sampled = F.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return sampled.round_().to(torch.uint8)


def _inverse_affine(
    rot: Tensor, shear_x: Tensor, shear_y: Tensor, tx: Tensor, ty: Tensor, cx: Tensor, cy: Tensor
) -> Tensor:
    """(n, 2, 3) float64 output-to-input maps, in pixel coordinates about the image centre, of the affine maps
    ``T * C * R(rot) * SHy(shear_y) * SHx(shear_x) * C^-1`` (scale 1): torchvision's
    ``_get_inverse_affine_matrix`` for a batch (angles in radians)."""
    a = torch.cos(rot - shear_y) / torch.cos(shear_y)
    b = -(a * torch.tan(shear_x) + torch.sin(rot))
    c = torch.sin(rot - shear_y) / torch.cos(shear_y)
    d = torch.cos(rot) - c * torch.tan(shear_x)
    # [[a, b], [c, d]] has determinant 1: its inverse is [[d, -b], [-c, a]]
    m = torch.stack([d, -b, torch.zeros_like(a), -c, a, torch.zeros_like(a)], dim=1)
    m[:, 2] = m[:, 2] + cx - m[:, 0] * (cx + tx) - m[:, 1] * (cy + ty)
    m[:, 5] = m[:, 5] + cy - m[:, 3] * (cx + tx) - m[:, 4] * (cy + ty)
    return m.view(-1, 2, 3)


def _pixel_grid(matrix: Tensor, width: int, height: int) -> Tensor:
    """(n, H, W, 2) sampling grid of ``matrix`` (n, 2, 3) acting on centred pixel coordinates, normalised for
    ``grid_sample(align_corners=False)``, computed as torchvision's ``_affine_grid``."""
    n, device = len(matrix), matrix.device
    base = torch.empty(1, height, width, 3, dtype=matrix.dtype, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device)[:, None])
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * width, 0.5 * height], dtype=matrix.dtype, device=device)
    rescaled = matrix.transpose(1, 2) / scale
    return base.view(1, -1, 3).expand(n, -1, -1).bmm(rescaled).view(n, height, width, 2)


# --- colour ops ---------------------------------------------------------------------------------------------------


def _factor(magnitude: Tensor, device: torch.device) -> Tensor:
    """Per-image (n, 1, 1, 1) float64 factors 1 + m."""
    return (1.0 + magnitude.to(torch.float64)).to(device).view(-1, 1, 1, 1)


def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's ``_blend`` on uint8 with a per-image ``ratio`` (n, 1, 1, 1) float64: ``x * r`` in float32, then
    ``+ y * (1 - r)`` rounded once (the fused multiply-add of ``add_(alpha=)``), clamped and truncated."""
    scaled = images.float() * ratio.float()
    alpha = (1.0 - ratio).float().double()
    return (scaled.double() + other.double() * alpha).float().clamp_(0, 255).to(torch.uint8)


def _luma(images: Tensor) -> Tensor:
    """Floored float32 luma (n, 1, H, W) as torchvision's ``_rgb_to_grayscale_image``; grey images as they are."""
    if images.shape[1] == 1:
        return images.float()
    r, g, b = images.float().unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _brightness(images: Tensor, magnitude: Tensor) -> Tensor:
    factor = _factor(magnitude, images.device).float()
    return (images.float() * factor).clamp_(0, 255).to(torch.uint8)


def _color(images: Tensor, magnitude: Tensor) -> Tensor:
    if images.shape[1] == 1:  # torchvision (like PIL) leaves grey images unchanged
        return images
    return _blend(images, _luma(images), _factor(magnitude, images.device))


def _contrast(images: Tensor, magnitude: Tensor) -> Tensor:
    mean = torch.mean(_luma(images), dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, _factor(magnitude, images.device))


def _sharpness(images: Tensor, magnitude: Tensor) -> Tensor:
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    # The blur's sum is an integer s: s / 13 is never a half, so round(s / 13) = floor((2 s + 13) / 26) exactly.
    x = images.to(torch.int32)
    total = F.avg_pool2d(x.float(), 3, stride=1) * 9  # exact: sums of 9 integers below 2**24
    total = total.round().to(torch.int32) + 4 * x[..., 1:-1, 1:-1]
    blurred = torch.div(2 * total + 13, 26, rounding_mode="floor").float()
    inner = x[..., 1:-1, 1:-1].float()
    alpha = (1.0 - _factor(magnitude, images.device)).float().double()
    mixed = (inner.double() + (blurred - inner).double() * alpha).float()  # one rounding, as add_(alpha=)
    out = images.clone()
    out[..., 1:-1, 1:-1] = mixed.clamp_(0, 255).to(torch.uint8)
    return out


def _posterize(images: Tensor, magnitude: Tensor) -> Tensor:
    bits = magnitude.to(torch.int64).clamp(0, 8)
    mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8).to(images.device)
    return images & mask.view(-1, 1, 1, 1)


def _solarize(images: Tensor, magnitude: Tensor) -> Tensor:
    threshold = (255.0 * magnitude.to(torch.float64)).float().to(images.device).view(-1, 1, 1, 1)
    return torch.where(images.float() >= threshold, 255 - images, images)


_COLOUR_OPS: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": lambda images, magnitude: TF.autocontrast(images),
    "Equalize": lambda images, magnitude: TF.equalize(images),
}


# --- random erasing -----------------------------------------------------------------------------------------------


class BatchRandomErasing:
    """torchvision's ``RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)`` per image of a batch of
    ``size`` (H, W): with probability ``p``, the first of 10 (area, log-aspect) draws whose box fits strictly
    inside the image is set to 0 at a uniform position; no box fits: the image stays as it is."""

    scale: Tuple[float, float] = (0.02, 0.33)
    ratio: Tuple[float, float] = (0.3, 3.3)
    attempts = 10

    def __init__(self, p: float, size: Tuple[int, int]) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise UserError(f"random_erasing must be a probability from 0 to 1, got {p!r}")
        self.p, self.size = float(p), (int(size[0]), int(size[1]))

    def __repr__(self) -> str:
        return f"BatchRandomErasing(p={self.p})"

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """``{"erase": (n, 4) long (top, left, height, width)}``; height 0: not erased."""
        height, width = self.size
        erase = torch.rand(n, generator=generator, dtype=torch.float64) < self.p
        u = torch.rand(n, self.attempts, 2, generator=generator, dtype=torch.float64)
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        low, high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(low + (high - low) * u[..., 1])
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < height) & (w < width)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
        h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
        position = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        top = torch.floor(position[:, 0] * (height - h + 1)).long()
        left = torch.floor(position[:, 1] * (width - w + 1)).long()
        keep = erase & fits.any(dim=1)
        box = torch.stack([top, left, h, w], dim=1)
        return {"erase": torch.where(keep[:, None], box, torch.zeros_like(box))}

    def __call__(self, images: Tensor, draws: Mapping[str, Tensor]) -> Tensor:
        return erase_boxes(images, draws["erase"])


def erase_boxes(images: Tensor, boxes: Tensor) -> Tensor:
    """(B, C, H, W) with box b (top, left, height, width) of image b set to 0 (height or width 0: none)."""
    boxes = boxes.to(images.device)
    top, left, h, w = (v.view(-1, 1, 1) for v in boxes.unbind(1))
    rows = torch.arange(images.shape[-2], device=images.device).view(1, -1, 1)
    cols = torch.arange(images.shape[-1], device=images.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return images.masked_fill(inside[:, None], 0.0)


def draw_all(parts: List[Any], n: int, generator: Optional[torch.Generator]) -> Dict[str, Tensor]:
    """The draws of every part (``BatchAutoAugment``, ``BatchRandomErasing``) for ``n`` images, in order."""
    draws: Dict[str, Tensor] = {}
    for part in parts:
        draws.update(part.draw(n, generator))
    return draws
