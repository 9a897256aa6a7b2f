"""The decoded-image store: in memory, memory-mapped and reused, keys, failed files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mtl.data.decoded as decoded
from mtl.core.errors import UserError
from mtl.data.decoded import DecodedImages, decode_images, decoded_key, resize_square
from mtl.data.image_files import load_rgb

SIZE = 16
CORRUPT = 6  # index of the file of random bytes in `image_files`
JPEGS = (3, 4, 5)  # indices of the JPEGs: decoded with draft, so close to the reference rather than equal


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients plus a dark left half: smooth enough for JPEG, and not symmetric, so a missed rotation shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3)
    img = base + 50 * np.stack([np.sin(x / 9), np.cos(y / 7), np.sin((x + y) / 11)], axis=-1)
    img[:, : w // 2] *= 0.4
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def image_files(tmp_path: Path) -> list[str]:
    """PNGs (RGB, grey, RGBA), JPEGs (RGB, grey, EXIF orientation 6) of different sizes, and one corrupt file."""
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    d.mkdir()
    paths = [str(d / n) for n in ("rgb.png", "grey.png", "alpha.png", "rgb.jpg", "grey.jpg", "rot6.jpg", "bad.jpg")]
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (50, 25), dtype=np.uint8)).save(paths[1])
    Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8)).save(paths[2])
    Image.fromarray(_smooth(120, 200, 1)).save(paths[3], quality=95)
    Image.fromarray(_smooth(90, 70, 2)[..., 0]).save(paths[4], quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 160 wide, 96 high; shown rotated: 96 wide, 160 high
    Image.fromarray(_smooth(96, 160, 3)).save(paths[5], quality=95, exif=exif)
    Path(paths[CORRUPT]).write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    return paths


def _decode(paths: list[str], **kwargs) -> tuple[DecodedImages, list[str]]:
    """decode_images without a progress bar, and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_images(paths, SIZE, progress=False, **kwargs)
    return out, [str(w.message) for w in caught]


def _reference(path: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(resize_square(load_rgb(path), SIZE)).copy()).permute(2, 0, 1)


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = decoded._decode_file

    def counting(path: str, size: int):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(decoded, "_decode_file", counting)
    return calls


def _assert_same(a: DecodedImages, b: DecodedImages) -> None:
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.sizes, b.sizes)
    assert a.failed == b.failed


def test_in_memory_matches_reference_decode(image_files):
    out, messages = _decode(image_files)
    n = len(image_files)
    assert out.location == "memory"
    assert out.images.shape == (n, 3, SIZE, SIZE) and out.images.dtype == torch.uint8
    assert out.nbytes == n * 3 * SIZE * SIZE
    assert out.sizes.dtype == torch.long
    assert out.sizes.tolist() == [[30, 40], [50, 25], [33, 33], [120, 200], [90, 70], [160, 96], [0, 0]]
    assert load_rgb(image_files[5]).size == (96, 160)  # the EXIF orientation was written, so the test means something
    assert out.failed == [CORRUPT]
    assert out.images[CORRUPT].eq(0).all()
    assert len(messages) == 1 and "could not decode 1 of 7" in messages[0] and image_files[CORRUPT] in messages[0]
    for i, path in enumerate(image_files):
        if i == CORRUPT:
            continue
        ref = _reference(path)
        if i in JPEGS:
            diff = (out.images[i].float() - ref.float()).abs().mean().item()
            assert diff < 6, f"{path}: mean abs diff {diff:.2f} from the full-size decode"
        else:
            assert torch.equal(out.images[i], ref), path


def test_threads_do_not_change_the_result(image_files):
    one, _ = _decode(image_files, threads=1)
    many, _ = _decode(image_files, threads=4)
    _assert_same(one, many)


def test_memory_mapped_matches_memory_and_is_reused(image_files, tmp_path, monkeypatch):
    in_memory, _ = _decode(image_files)
    cache = tmp_path / "cache"
    calls = _count_decodes(monkeypatch)

    first, messages = _decode(image_files, cache_dir=cache, budget_bytes=1000)
    assert first.location != "memory"
    assert Path(first.location).parent == cache and first.location.endswith(".npy")
    assert len(calls) == len(image_files)
    assert len(messages) == 1 and "could not decode 1 of 7" in messages[0]
    _assert_same(first, in_memory)
    assert first.nbytes == in_memory.nbytes

    second, messages = _decode(image_files, cache_dir=cache, budget_bytes=1000)
    assert len(calls) == len(image_files), "the memory-mapped file was decoded again instead of reused"
    assert second.location == first.location
    assert len(messages) == 1 and "could not decode" in messages[0]  # failed rows are still reported, nothing else
    _assert_same(second, in_memory)

    # New bytes and a new mtime in one file: another key, so everything is decoded again.
    path = Path(image_files[0])
    before = path.stat().st_mtime_ns
    new = np.full((30, 40, 3), 77, dtype=np.uint8)
    Image.fromarray(new).save(path)
    os.utime(path, ns=(before + 10**9, before + 10**9))
    third, _ = _decode(image_files, cache_dir=cache, budget_bytes=1000)
    assert third.location != first.location
    assert len(calls) == 2 * len(image_files)
    assert third.images[0].eq(77).all()
    assert torch.equal(third.images[1:], in_memory.images[1:])

    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []
    assert sorted(p.suffix for p in cache.iterdir()) == [".npy", ".npy", ".pt", ".pt"]


def test_damaged_memory_mapped_file_is_rebuilt(image_files, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, _ = _decode(image_files, cache_dir=cache, budget_bytes=1000)
    expected = first.images.clone()
    del first
    data = next(cache.glob("*.npy"))
    data.write_bytes(data.read_bytes()[:500])  # truncated, as by a full disk or a killed copy
    calls = _count_decodes(monkeypatch)
    again, messages = _decode(image_files, cache_dir=cache, budget_bytes=1000)
    assert len(calls) == len(image_files)
    assert any("rebuilding" in m for m in messages)
    assert torch.equal(again.images, expected)


def test_mapped_store_indexes_like_a_tensor(image_files, tmp_path):
    in_memory, _ = _decode(image_files)
    mapped, _ = _decode(image_files, cache_dir=tmp_path / "cache", budget_bytes=1000)
    idx = torch.tensor([5, 0, 0, 3])
    batch = mapped.images[idx]
    assert torch.equal(batch, in_memory.images[idx])
    batch += 1  # an ordinary tensor, not a view of the file
    assert torch.equal(mapped.images[idx], in_memory.images[idx])
    mapped.images[0].fill_(9)  # copy-on-write: never reaches the file
    assert torch.equal(torch.from_numpy(np.load(mapped.location))[0], in_memory.images[0])


def test_over_budget_without_a_usable_folder_is_a_user_error(image_files, tmp_path):
    with pytest.raises(UserError, match="data.cache_budget_gb"):
        decode_images(image_files, SIZE, budget_bytes=1000, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="not writable.*data.cache_budget_gb"):
        decode_images(image_files, SIZE, cache_dir=blocker / "cache", budget_bytes=1000, progress=False)


def test_bad_arguments_are_user_errors(image_files):
    with pytest.raises(UserError, match="size"):
        decode_images(image_files, 0, progress=False)
    with pytest.raises(UserError, match="thread"):
        decode_images(image_files, SIZE, threads=0, progress=False)


def test_empty_list_gives_an_empty_store():
    out, messages = _decode([])
    assert out.images.shape == (0, 3, SIZE, SIZE) and out.sizes.shape == (0, 2)
    assert out.failed == [] and messages == []


def test_key_follows_files_and_size(image_files):
    key = decoded_key(image_files, SIZE)
    assert key == decoded_key(list(image_files), SIZE)
    assert len(key) == 64 and int(key, 16) >= 0
    assert decoded_key(image_files, SIZE + 1) != key
    assert decoded_key(image_files[:-1], SIZE) != key
    assert decoded_key(image_files[::-1], SIZE) != key
    assert decoded_key(image_files + [image_files[0]], SIZE) != key

    path = Path(image_files[2])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime
    touched = decoded_key(image_files, SIZE)
    assert touched != key
    path.write_bytes(path.read_bytes() + b"\0")  # one more byte
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the same mtime as before the write
    assert decoded_key(image_files, SIZE) not in (key, touched)
