"""Shared fixtures: small image folders the tests draw themselves."""

import os
import signal
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The tests mirror the package's folders and share helpers across them (``from test_bad_input import refused``):
# every folder is importable whichever tests run.
sys.path[:0] = [str(d) for d in sorted(Path(__file__).parent.iterdir()) if d.is_dir() and not d.name.startswith("_")]

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def make_folder(root: Path, per_class=(16, 8), size=32, seed=0, classes=COLORS) -> Path:
    """``root/{train,val}/<class>/*.png``: noisy images whose mean colour gives the class."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for name, rgb in classes.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.normal(0, 40, (size, size, 3))
                img = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): two OpenMP threads on a
    busy 2-core machine can run such inputs 50x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def color_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "colors")


def tiny_config(root: Path, out: Path, **overrides) -> dict:
    """A raw config that trains small_cnn on a colour folder in a second or two."""
    cfg = {
        "name": "tiny",
        "out_dir": str(out),
        "data": {
            "name": "folder",
            "root": str(root),
            "image_size": 32,
            "resize_size": 32,
            "batch_size": 8,
            "num_workers": 0,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
        "model": {"encoder": "small_cnn", "encoder_options": {"widths": [8, 16, 16, 32]}},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 3, "progress": False, "log_images": 4},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def sigterm_at_step(monkeypatch, step: int) -> None:
    """Send the process the real SIGTERM once the trainer has made ``step`` updates (from a hook's after_step), so
    that the run stops after that step as a killed one would; ``monkeypatch.undo()`` takes the hook away."""
    from mtl.engine.hooks import UnfreezeHook

    def stop(self, trainer, losses):
        if trainer.global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(UnfreezeHook, "after_step", stop)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torchvision cache, and a downloader that fails as if offline."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return home


def one_line_error(call: object, *fragments: str) -> str:
    """The message of the UserError that ``call()`` raises: one line, holding every fragment."""
    from mtl.core.errors import UserError

    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message
