"""``scenes``: ray-cast rooms of spheres, boxes and cylinders with per-pixel segmentation, depth and normals.

A pinhole camera (y down, looking along +z, horizon above the image centre) sees a checkered floor, a back
wall (yawed, of random height: sky above it) and objects resting on the floor. Every surface is intersected
analytically for all pixels at once, the nearest hit wins, and Lambert + Phong shading with a random light
(plus soft blob shadows on the floor) gives the image shading cues consistent with the geometry. Objects get
random colours, so their kind must be told from shape and shading, not colour.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from mtl.core.errors import UserError
from mtl.data.cache import cache_path, load_or_build
from mtl.data.dense_batches import flip_batch, random_flips, to_device
from mtl.data.dense_transforms import normalize, random_hflip
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtl.tasks.normals import unit_vectors

SEG_CLASSES = ("sky", "wall", "floor", "sphere", "box", "cylinder")
KINDS = ("sphere", "box", "cylinder")
DEFAULT_ROOT = "data/scenes"
_FORMAT = 1  # bump when the rendering code changes, to invalidate caches
_CHUNK = 64  # images rendered together (bounds memory to a few tens of MB)
_FOCAL = 1.1  # focal length in image widths
_HORIZON = 0.4  # principal point row, as a fraction of the height: the camera looks slightly down
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class SceneDataset(Dataset):
    """Items ``{"image", "seg", "depth", "normal", "label"}`` from rendered tensors (see ``render_scenes``)."""

    def __init__(
        self,
        tensors: dict[str, Tensor],
        augment: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip: bool = True,
    ) -> None:
        self.tensors = tensors
        self.augment, self.flip = augment, flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.classes = list(KINDS)
        self.targets = {
            "seg": {"type": "segmentation", "num_classes": len(SEG_CLASSES), "classes": list(SEG_CLASSES)},
            "depth": {"type": "depth"},
            "normal": {"type": "normals"},
            "label": {"type": "classification", "num_classes": len(KINDS), "classes": list(KINDS)},
        }

    def __len__(self) -> int:
        return len(self.tensors["images"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        t = self.tensors
        sample = {
            "image": t["images"][index].float() / 255,
            "seg": t["seg"][index].long(),
            "depth": t["depth"][index].float()[None],
            # stored as float16: renormalise (zero vectors, the sky, stay zero)
            "normal": unit_vectors(t["normal"][index].float(), dim=0),
            "label": t["labels"][index].clone(),
        }
        if self.augment:
            sample = random_hflip(sample, self.targets, p=0.5 if self.flip else 0.0)
        sample["image"] = normalize(sample["image"], self.mean, self.std)
        return sample

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Random flips of n items (see ``dense_batches``); none without ``flip`` (drawn all the same)."""
        return {"flip": random_flips(n, generator)["flip"] & self.flip}

    def gather(self, rows: Tensor, device: torch.device, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Items ``rows`` stacked on ``device`` (uint8/half copies, converted there), mirrored where
        ``params["flip"]``."""

        def take(key: str) -> Tensor:
            return to_device(self.tensors[key][rows], device)

        batch = {
            "image": take("images").float() / 255,
            "seg": take("seg").long(),
            "depth": take("depth").float()[:, None],
            "normal": unit_vectors(take("normal").float(), dim=1),
            "label": take("labels"),
        }
        if params is not None:
            flip_batch(batch, params["flip"], self.targets)
        batch["image"] = normalize(batch["image"], self.mean, self.std)
        return batch


@DATASETS.register("scenes")
def scenes(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    augment: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: int = 64,
    train_size: int = 1000,
    val_size: int = 200,
    test_size: int = 200,
    seed: int = 0,
    max_objects: int = 4,
    flip: bool = True,
) -> SceneDataset:
    """Generated scenes; targets ``seg`` (6 classes), ``depth``, ``normal`` and ``label`` (the object kind
    covering the most pixels). Splits ``train``, ``val`` and ``test`` are drawn from independent random streams
    (``seed`` and the split), so no scene is shared. ``augment`` = random horizontal flip (none with ``flip``
    False). ``transform`` is not supported."""
    split = resolve_split("scenes", split, ("train", "val", "test"))
    if transform is not None:
        raise UserError("data set 'scenes' normalises and augments itself; pass augment/mean/std, not a transform")
    count = {"train": train_size, "val": val_size, "test": test_size}[split]
    if count < 1 or size < 16 or max_objects < 1:
        raise UserError(
            f"scenes needs {split}_size >= 1, size >= 16 and max_objects >= 1, got {count}, {size} and {max_objects}"
        )
    key = {"count": count, "size": size, "seed": seed, "split": split, "max_objects": max_objects, "format": _FORMAT}
    path = cache_path(root or DEFAULT_ROOT, "scenes", key)
    rng_seed = [seed, _SPLIT_IDS[split]]
    tensors = load_or_build(path, key, lambda: render_scenes(count, size, max_objects, np.random.default_rng(rng_seed)))
    return SceneDataset(tensors, augment=augment, mean=mean, std=std, flip=flip)


def render_scenes(count: int, size: int, max_objects: int, rng: np.random.Generator) -> dict[str, Tensor]:
    """Render ``count`` scenes: uint8 images (N,3,S,S), int8 seg (N,S,S), float16 depth (N,S,S) with 0 = sky,
    float16 normals (N,3,S,S) with 0 = sky, long labels (N,)."""
    params = _sample_scenes(count, max_objects, rng)
    noise_seed = int(rng.integers(2**62))
    starts = tqdm(range(0, count, _CHUNK), desc=f"rendering {count} scenes", unit="chunk", disable=None, leave=False)
    parts = [_render(_slice(params, i, i + _CHUNK), size, noise_seed + i) for i in starts]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _sample_scenes(n: int, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-scene parameters with a leading N (objects: (N, k, ...))."""
    u = rng.uniform
    cam_h = u(1.0, 2.0, n)
    wall_z = u(6.0, 11.0, n)
    light = np.stack([u(-0.7, 0.7, n), -np.ones(n), u(-0.9, -0.1, n)], 1)  # towards the light: up and back
    light /= np.linalg.norm(light, axis=1, keepdims=True)
    counts = rng.integers(1, k + 1, n)
    kinds = rng.integers(0, len(KINDS), (n, k))
    # extents: sphere (r, r, r), box half sizes (x, y, z), cylinder (r, half height, r)
    ext = np.stack([u(0.25, 0.7, (n, k)), u(0.25, 0.7, (n, k)), u(0.25, 0.7, (n, k))], -1)
    ext[kinds == 0] = ext[kinds == 0][:, :1]
    cyl = kinds == 2
    ext[cyl, 1] = u(0.3, 1.0, int(cyl.sum()))
    ext[cyl, 2] = ext[cyl, 0]
    z = u(2.0, wall_z[:, None] - 1.2, (n, k))
    half_width = 0.5 / _FOCAL  # x / z at the image's left and right edges
    x = u(-0.85, 0.85, (n, k)) * half_width * z
    y = cam_h[:, None] - ext[..., 1]  # resting on the floor (y points down, the floor is at y = cam_h)
    return {
        "cam_h": cam_h,
        "wall_z": wall_z,
        "wall_yaw": u(-0.35, 0.35, n),
        "wall_top": cam_h - u(2.0, 6.0, n),
        "light": light,
        "sky": u(0.55, 1.0, (n, 3)),
        "wall_rgb": u(0.35, 0.85, (n, 3)) * u(0.6, 1.0, (n, 1)) + 0.1,
        "floor_rgb": u(0.25, 0.75, (n, 3)),
        "tile": u(0.6, 1.4, n),
        "present": np.arange(k)[None] < counts[:, None],
        "kind": kinds,
        "centre": np.stack([x, y, z], -1),
        "extent": ext,
        "yaw": u(0, math.pi, (n, k)),
        "obj_rgb": _saturated(rng, (n, k)),
    }


def _saturated(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random saturated colours: a random hue at full value, mixed a little towards grey."""
    hue = rng.uniform(0, 1, shape)[..., None]
    rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    return 0.15 + 0.85 * (rgb * rng.uniform(0.7, 1.0, shape)[..., None])


def _slice(params: dict[str, np.ndarray], start: int, stop: int) -> dict[str, Tensor]:
    out = {}
    for key, value in params.items():
        value = value[start:stop]
        out[key] = torch.from_numpy(value.astype(np.float32) if value.dtype == np.float64 else value)
    return out


def _render(p: dict[str, Tensor], size: int, noise_seed: int) -> dict[str, Tensor]:
    """Ray-cast one chunk of scenes; pixels are flattened (P = size * size) and scene scalars are (B, 1)."""
    b, k = p["kind"].shape
    f = _FOCAL * size
    rows, cols = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx = ((cols - size / 2) / f).reshape(1, -1)  # ray direction (dx, dy, 1): t along the ray = depth z
    dy = ((rows - _HORIZON * size) / f).reshape(1, -1)

    inf = torch.tensor(math.inf)
    # floor: y = cam_h
    t_floor = torch.where(dy > 0, p["cam_h"][:, None] / dy.clamp(min=1e-6), inf)
    # back wall through (0, 0, wall_z) with normal (sin a, 0, -cos a) facing the camera, up to wall_top
    sin_a, cos_a = p["wall_yaw"][:, None].sin(), p["wall_yaw"][:, None].cos()
    denom = sin_a * dx - cos_a
    t_wall = -cos_a * p["wall_z"][:, None] / denom
    t_wall = torch.where((denom < 0) & (t_wall * dy >= p["wall_top"][:, None]), t_wall, inf)
    t_obj = [_intersect(p, j, dx, dy) for j in range(k)]
    t_all = torch.stack([t_wall, t_floor, *t_obj], 1)  # (B, 2 + k, P)
    depth, nearest = t_all.min(1)
    sky = torch.isinf(depth)
    depth = torch.where(sky, 0.0, depth)

    # segmentation: 0 sky, 1 wall, 2 floor, 3 + kind for objects
    surface_class = torch.cat([torch.tensor([[1, 2]]).expand(b, 2), 3 + p["kind"]], 1)
    seg = torch.where(sky, 0, surface_class.gather(1, nearest))

    # hit points, then normals of the winning surface
    px, py, pz = depth * dx, depth * dy, depth
    obj = (nearest - 2).clamp(min=0)

    def pick(v: Tensor) -> Tensor:  # (B, k) per-object values -> (B, P) values of each pixel's object
        return v.gather(1, obj)

    c = [pick(p["centre"][..., i]) for i in range(3)]
    e = [pick(p["extent"][..., i]) for i in range(3)]
    kind, yaw = pick(p["kind"]), pick(p["yaw"])
    rx, ry, rz = px - c[0], py - c[1], pz - c[2]
    n_obj = _object_normals(kind, yaw, (rx, ry, rz), e)
    wall_n = torch.stack([sin_a, torch.zeros_like(sin_a), -cos_a], 0).expand(3, b, dx.shape[1])
    floor_n = torch.tensor([0.0, -1.0, 0.0]).view(3, 1, 1).expand_as(wall_n)
    normal = torch.where(nearest == 0, wall_n, torch.where(nearest == 1, floor_n, n_obj))
    normal = torch.where(sky, 0.0, normal)

    obj_rgb = torch.stack([pick(p["obj_rgb"][..., i]) for i in range(3)])
    image = _shade(p, seg, normal, (px, py, pz), (dx, dy), obj_rgb, noise_seed)
    areas = F.one_hot(seg, len(SEG_CLASSES))[..., 3:].sum(1)  # (B, kinds): pixels of each object kind
    return {
        "images": image.reshape(b, 3, size, size),
        "seg": seg.to(torch.int8).reshape(b, size, size),
        "depth": depth.to(torch.float16).reshape(b, size, size),
        "normal": normal.permute(1, 0, 2).to(torch.float16).reshape(b, 3, size, size),
        "labels": areas.argmax(1),
    }


def _intersect(p: dict[str, Tensor], j: int, dx: Tensor, dy: Tensor) -> Tensor:
    """Ray parameter of the first hit with object slot ``j`` of every scene (B, P); inf where missed."""
    cx, cy, cz = (p["centre"][:, j, i : i + 1] for i in range(3))
    ex, ey, ez = (p["extent"][:, j, i : i + 1] for i in range(3))
    kind = p["kind"][:, j : j + 1]
    inf = torch.tensor(math.inf)

    # sphere: |t d - c|^2 = r^2
    a = dx**2 + dy**2 + 1
    b_ = dx * cx + dy * cy + cz
    disc = b_**2 - a * (cx**2 + cy**2 + cz**2 - ex**2)
    t_sphere = torch.where(disc >= 0, (b_ - disc.clamp(min=0).sqrt()) / a, inf)

    # box: slabs in the box frame (yawed about the vertical axis)
    s, c = p["yaw"][:, j : j + 1].sin(), p["yaw"][:, j : j + 1].cos()
    o = (-(c * cx - s * cz), -cy, -(s * cx + c * cz))  # camera origin in the box frame
    d = (c * dx - s, dy.expand_as(dx * c), s * dx + c)
    near = torch.full_like(dx * c, -math.inf)
    far = torch.full_like(near, math.inf)
    for oi, di, hi in zip(o, d, (ex, ey, ez)):
        di = torch.where(di.abs() < 1e-9, torch.full_like(di, 1e-9), di)
        t1, t2 = (-hi - oi) / di, (hi - oi) / di
        near, far = torch.maximum(near, torch.minimum(t1, t2)), torch.minimum(far, torch.maximum(t1, t2))
    t_box = torch.where(near <= far, near, inf)

    # vertical cylinder: side where the height fits, caps where the radius fits
    a = dx**2 + 1
    b_ = dx * cx + cz
    disc = b_**2 - a * (cx**2 + cz**2 - ex**2)
    t_side = (b_ - disc.clamp(min=0).sqrt()) / a
    t_side = torch.where((disc >= 0) & ((t_side * dy - cy).abs() <= ey), t_side, inf)
    t_cyl = t_side
    safe_dy = torch.where(dy.abs() < 1e-9, torch.full_like(dy, 1e-9), dy)
    for cap_y in (cy - ey, cy + ey):
        t_cap = cap_y / safe_dy
        inside = (t_cap * dx - cx) ** 2 + (t_cap - cz) ** 2 <= ex**2
        t_cyl = torch.minimum(t_cyl, torch.where(inside & (t_cap > 0), t_cap, inf))

    t = torch.where(kind == 0, t_sphere, torch.where(kind == 1, t_box, t_cyl))
    return torch.where(p["present"][:, j : j + 1] & (t > 0), t, inf)


def _object_normals(kind: Tensor, yaw: Tensor, r: tuple[Tensor, Tensor, Tensor], e: list[Tensor]) -> Tensor:
    """Unit normals (3, B, P) at hit offsets ``r`` from each pixel's object centre."""
    rx, ry, rz = r
    sphere = torch.stack([rx, ry, rz]) / e[0].clamp(min=1e-6)
    # box and cylinder: the face is the coordinate that is largest relative to the extent
    s, c = yaw.sin(), yaw.cos()
    lx, lz = c * rx - s * rz, s * rx + c * rz
    ux, uy, uz = (lx / e[0]).abs(), (ry / e[1]).abs(), (lz / e[2]).abs()
    nx = torch.where((ux >= uy) & (ux >= uz), lx.sign(), 0.0)
    nz = torch.where((uz > ux) & (uz >= uy), lz.sign(), 0.0)
    ny = torch.where((nx == 0) & (nz == 0), ry.sign(), 0.0)
    box = torch.stack([c * nx + s * nz, ny, -s * nx + c * nz])
    radial = (rx**2 + rz**2).sqrt() / e[0]
    cap = (ry / e[1]).abs() >= radial
    cylinder = torch.where(cap, torch.stack([0 * rx, ry.sign(), 0 * rz]), torch.stack([rx, 0 * ry, rz]) / e[0])
    normal = torch.where(kind == 0, sphere, torch.where(kind == 1, box, cylinder))
    return F.normalize(normal, dim=0)


def _shade(
    p: dict[str, Tensor],
    seg: Tensor,
    normal: Tensor,
    hit: tuple[Tensor, Tensor, Tensor],
    ray: tuple[Tensor, Tensor],
    obj_rgb: Tensor,
    noise_seed: int,
) -> Tensor:
    """uint8 (B, 3, P) colours: albedo x (ambient + Lambert) + Phong highlights, blob shadows, sensor noise."""
    b, k = p["kind"].shape
    px, py, pz = hit
    dx, dy = ray
    light = p["light"].T.reshape(3, b, 1)
    lambert = (normal * light).sum(0).clamp(min=0)

    tiles = (torch.floor(px / p["tile"][:, None]) + torch.floor(pz / p["tile"][:, None])) % 2
    floor = p["floor_rgb"].T[..., None] * (0.85 + 0.3 * tiles)
    skirting = py > p["cam_h"][:, None] - 0.25  # a darker strip along the bottom of the wall
    wall = p["wall_rgb"].T[..., None] * torch.where(skirting, 0.6, 1.0)
    albedo = torch.where(seg == 1, wall, torch.where(seg == 2, floor, obj_rgb))

    shadow = torch.ones_like(px)
    for j in range(k):
        cx, cy, cz = (p["centre"][:, j, i : i + 1] for i in range(3))
        height = (p["cam_h"][:, None] - cy) * 2
        # the blob is pushed away from the light by the object's height
        sx = cx - light[0] / -light[1] * height * 0.5
        sz = cz - light[2] / -light[1] * height * 0.5
        radius2 = p["extent"][:, j, 0:1] ** 2 + p["extent"][:, j, 2:3] ** 2
        blob = torch.exp(-((px - sx) ** 2 + (pz - sz) ** 2) / radius2)
        shadow = shadow * (1 - 0.55 * p["present"][:, j : j + 1] * blob)
    lit = torch.where(seg == 2, shadow * lambert, lambert)

    view = -torch.stack([dx, dy, torch.ones_like(dx)]).expand_as(normal)
    view = F.normalize(view, dim=0)
    reflect = 2 * (normal * light).sum(0) * normal - light
    specular = (reflect * view).sum(0).clamp(min=0) ** 24 * (seg >= 3) * 0.45

    colour = albedo * (0.3 + 0.7 * lit) + specular
    sky_rgb = p["sky"].T[..., None] * (0.75 + 0.25 * (dy + 0.5).clamp(0, 1))  # lighter towards the horizon
    colour = torch.where(seg == 0, sky_rgb, colour)
    noise = torch.randn(colour.shape, generator=torch.Generator().manual_seed(noise_seed)) * 0.02
    return ((colour + noise).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 0, 2)
