"""Image files decoded once into a uint8 store of fixed squares, in memory or in a memory-mapped ``.npy`` file: each
file squeezed to a square (training crops are cut from it), or its exact evaluation view (Resize + CenterCrop)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm import tqdm

from mtl.core.checkpoint import give_plain_mode
from mtl.core.errors import UserError
from mtl.data.image_files import load_rgb, to_rgb
from mtl.data.transforms import eval_view

_FORMAT_VERSION = 1  # bump when the decoding or the file layout changes: old files then get another key
_RESAMPLE = Image.BILINEAR  # antialiased when shrinking (the filter widens with the scale)
_REDUCING_GAP = 3.0  # shrink by an integer factor first while staying >= 3x the target; indistinguishable, faster
_SHOWN_PATHS = 3
_CHUNK = 4096  # indices handed to the thread pool at a time, so a huge set does not create millions of futures
_GB = 1e9


@dataclass
class DecodedImages:
    """Every image of a set as a ``size x size`` RGB square, with its original (H, W) and the files that failed.
    ``view_resize``: the squares are the evaluation views Resize(view_resize) + CenterCrop(size), else squeezed."""

    images: Tensor  # uint8 (N, 3, size, size)
    sizes: Tensor  # long (N, 2): original (H, W) after the EXIF transpose; (0, 0) for a failed file
    failed: list[int] = field(default_factory=list)
    location: str = "memory"  # "memory" or the path of the memory-mapped file
    view_resize: Optional[int] = None

    @property
    def nbytes(self) -> int:
        """Bytes of ``images``."""
        return self.images.numel() * self.images.element_size()


def decoded_key(paths: Sequence[str], size: int, view_resize: Optional[int] = None) -> str:
    """Hex digest over each file's (absolute path, byte size, mtime_ns) in order, ``size``, the format version and
    ``view_resize`` (when given: another kind of square, another key)."""
    files = []
    for path in paths:
        full = os.path.abspath(os.fspath(path))
        try:
            st = os.stat(full)
            files.append([full, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([full, None, None])  # a missing file decodes as failed; its reappearance changes the key
    fields = {"version": _FORMAT_VERSION, "size": int(size), "files": files}
    if view_resize is not None:
        fields["view_resize"] = int(view_resize)
    text = json.dumps(fields)
    return hashlib.sha256(text.encode()).hexdigest()


def decode_images(
    paths: Sequence[str],
    size: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    budget_bytes: int = 4 << 30,
    progress: bool = True,
    threads: int | None = None,
    view_resize: int | None = None,
) -> DecodedImages:
    """Decode every file once into a uint8 (N, 3, size, size) store: one tensor in memory if it fits
    ``budget_bytes``, else a memory-mapped file in ``cache_dir`` that later calls reuse while no file changes.

    Each file is squeezed to ``size``² (``resize_square``: JPEGs decoded at a reduced DCT scale first), or, with
    ``view_resize``, stored as its evaluation view: the whole file decoded (``load_rgb``) and transformed as the
    per-item eval transform does, torchvision's Resize(view_resize) + CenterCrop(size) (``transforms.eval_view``),
    so that the stored pixels are exactly the ones that transform normalises."""
    paths = [os.fspath(p) for p in paths]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise UserError(f"the decoded image size must be a positive whole number of pixels, got {size!r}")
    size = int(size)
    if threads is None:
        threads = min(16, 2 * (os.cpu_count() or 1))
    if threads < 1:
        raise UserError(f"decoding needs at least 1 thread, got threads={threads}")
    if view_resize is not None and (
        isinstance(view_resize, bool) or not isinstance(view_resize, (int, np.integer)) or view_resize < 1
    ):
        raise UserError(f"the evaluation view's resize must be a positive whole number of pixels, got {view_resize!r}")
    view_resize = None if view_resize is None else int(view_resize)
    n = len(paths)
    needed = n * 3 * size * size
    if needed <= budget_bytes:
        images = torch.empty((n, 3, size, size), dtype=torch.uint8)
        sizes = torch.zeros((n, 2), dtype=torch.long)
        failed = _fill(paths, size, images.numpy(), sizes.numpy(), progress, threads, view_resize)
        for i in failed:
            images[i].zero_()
        decoded = DecodedImages(images, sizes, failed, "memory", view_resize)
    else:
        decoded = _memory_mapped(paths, size, cache_dir, needed, budget_bytes, progress, threads, view_resize)
    if decoded.failed:  # also when a memory-mapped file is reused: those rows are still zeros
        shown = ", ".join(paths[i] for i in decoded.failed[:_SHOWN_PATHS])
        more = ", ..." if len(decoded.failed) > _SHOWN_PATHS else ""
        warnings.warn(
            f"could not decode {len(decoded.failed)} of {n} images; their rows are zeros: {shown}{more}", stacklevel=2
        )
    return decoded


def _memory_mapped(
    paths: list[str],
    size: int,
    cache_dir: str | os.PathLike | None,
    needed: int,
    budget_bytes: int,
    progress: bool,
    threads: int,
    view_resize: Optional[int] = None,
) -> DecodedImages:
    """Reuse ``<cache_dir>/decoded-<size>px-<key>.npy`` (evaluation views: ``view-<size>px-r<resize>-<key>.npy``)
    when its key matches, else decode into it atomically."""
    too_big = (
        f"the decoded images need {needed / _GB:.2f} GB, more than the memory budget of {budget_bytes / _GB:.2f} GB"
    )
    if cache_dir is None:
        raise UserError(
            f"{too_big}, and no cache folder is set for a memory-mapped file; "
            f"raise data.cache_budget_gb or set data.cache_dir to a writable folder"
        )
    folder = Path(cache_dir).expanduser()
    key = decoded_key(paths, size, view_resize)
    stem = f"decoded-{size}px-{key[:16]}" if view_resize is None else f"view-{size}px-r{view_resize}-{key[:16]}"
    data_path, meta_path = folder / f"{stem}.npy", folder / f"{stem}.pt"
    if data_path.exists() or meta_path.exists():
        try:
            return _open(data_path, meta_path, key, len(paths), size, view_resize)
        except Exception as err:  # a damaged or foreign file is rebuilt, not fatal
            warnings.warn(f"ignoring unusable decoded-image cache {data_path} ({err}); rebuilding it", stacklevel=3)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_data = tempfile.mkstemp(dir=folder, prefix=f".{data_path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        why = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or err
        raise UserError(
            f"{too_big}, and the cache folder {folder} is not writable ({why}); "
            f"raise data.cache_budget_gb or set data.cache_dir to a writable folder"
        ) from None
    try:
        store = np.lib.format.open_memmap(tmp_data, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
        _reserve(tmp_data, folder, needed)
        sizes = torch.zeros((len(paths), 2), dtype=torch.long)
        failed = _fill(paths, size, store, sizes.numpy(), progress, threads, view_resize)  # failed rows stay zeros
        store.flush()
        del store
        give_plain_mode(tmp_data)
        os.replace(tmp_data, data_path)
    except BaseException:
        _unlink(tmp_data)
        raise
    # The metadata goes last: it marks the data file complete.
    _write_atomic(meta_path, {"key": key, "sizes": sizes, "failed": torch.tensor(failed, dtype=torch.long)})
    return DecodedImages(_map(data_path), sizes, failed, str(data_path), view_resize)


def _open(
    data_path: Path, meta_path: Path, key: str, n: int, size: int, view_resize: Optional[int] = None
) -> DecodedImages:
    """The stored images for ``key``; raises if either file is missing, damaged or for other files."""
    meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    if meta.get("key") != key:
        raise ValueError("it was made for other files")
    sizes, failed = meta["sizes"], meta["failed"].tolist()
    images = _map(data_path)
    if images.shape != (n, 3, size, size) or images.dtype != torch.uint8 or sizes.shape != (n, 2):
        raise ValueError(f"it holds shape {tuple(images.shape)} {images.dtype}, expected ({n}, 3, {size}, {size})")
    return DecodedImages(images, sizes.long(), failed, str(data_path), view_resize)


def _map(path: Path) -> Tensor:
    """A tensor over the ``.npy`` file, no copy; copy-on-write, so an accidental write never reaches the file."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _fill(
    paths: list[str],
    size: int,
    store: np.ndarray,
    sizes: np.ndarray,
    progress: bool,
    threads: int,
    view_resize: Optional[int] = None,
) -> list[int]:
    """Decode ``paths[i]`` into ``store[i]`` and its (H, W) into ``sizes[i]`` in threads; return the failed indices."""
    view = eval_view(size, view_resize) if view_resize is not None else None

    def one(i: int) -> bool:
        try:
            pixels, hw = _decode_file(paths[i], size) if view is None else _decode_view(paths[i], view)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError, ...)
            return False
        store[i] = pixels.transpose(2, 0, 1)
        sizes[i] = hw
        return True

    failed = []
    bar = tqdm(total=len(paths), desc=f"decoding {len(paths)} images", unit="img", disable=not progress, leave=False)
    workers = max(1, min(threads, len(paths)))
    with bar, warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore")  # decoder chatter ("Possibly corrupt EXIF data", ...) on files that do load
        try:
            for start in range(0, len(paths), _CHUNK):
                chunk = range(start, min(start + _CHUNK, len(paths)))
                for i, ok in zip(chunk, pool.map(one, chunk)):
                    if not ok:
                        failed.append(i)
                    bar.update()
        except BaseException:  # Ctrl-C: drop the queued files instead of decoding the rest of the chunk
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return failed


def _decode_file(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One file as a (size, size, 3) uint8 RGB array, upright per EXIF, and its original upright (H, W)."""
    with Image.open(path) as image:
        width, height = image.size
        image.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale still >= size; others: no-op
        stored = image.size
        upright = ImageOps.exif_transpose(image)
        if upright.size != stored:  # a 90-degree orientation (5-8) swapped the sides
            width, height = height, width
        rgb = to_rgb(upright)
    pixels = np.asarray(resize_square(rgb, size))
    return pixels, (height, width)


def _decode_view(path: str, view: Callable[[Image.Image], Tensor]) -> tuple[np.ndarray, tuple[int, int]]:
    """One file as the per-item eval transform sees it: ``load_rgb`` (upright per EXIF, RGB), then ``view``
    (``transforms.eval_view``); a (size, size, 3) uint8 array and the original upright (H, W)."""
    image = load_rgb(path)
    pixels = view(image).as_subclass(Tensor)  # uint8 (3, size, size)
    return pixels.permute(1, 2, 0).numpy(), (image.height, image.width)


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """``image`` squeezed to ``size x size`` (aspect ratio not kept), antialiased; the resize the store uses."""
    return image.resize((size, size), _RESAMPLE, reducing_gap=_REDUCING_GAP)


def _reserve(path: str, folder: Path, needed: int) -> None:
    """Allocate the file's blocks now, so a full disk is a clear error rather than a crash while writing rows."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"not enough disk space in {folder} for the {needed / _GB:.2f} GB of decoded images; "
                f"free space there, set data.cache_dir elsewhere or raise data.cache_budget_gb"
            ) from None
        # the file system cannot preallocate (EOPNOTSUPP, EINVAL, ...): write rows without the reservation
    finally:
        os.close(fd)


def _write_atomic(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        give_plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
