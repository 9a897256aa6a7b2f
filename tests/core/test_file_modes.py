"""Files mtl writes get the permissions a plain open() gives (0666 less the umask), not a temporary file's 0600:
checkpoints and summaries are readable by the user's group under the usual umask 022."""

import hashlib
import os
import stat

import pytest
import torch
import yaml
from conftest import make_folder, tiny_config

from mtl.cli import main
from mtl.core.checkpoint import atomic_write
from mtl.data.cache import load_or_build
from mtl.models import weights as W


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write(tmp_path / "f.txt", lambda tmp: open(tmp, "w").write("x"))
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _modes_under(folder, name):
    """{name/relative path: (mode, is a folder)} of every file and folder below ``folder``."""
    return {f"{name}/{p.relative_to(folder)}": (_mode(p), p.is_dir()) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_writer_respects_the_umask(tmp_path, umask, monkeypatch, mask):
    """A training run (checkpoints, summary, metrics, config, lock, the decoded-image file), `mtl eval`, `mtl predict`,
    `mtl weights import` and the data cache: files 0666 and folders 0777, less the umask, as plain open/mkdir give."""
    umask(mask)
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    data = make_folder(tmp_path / "data")
    cache = tmp_path / "decoded"
    cfg = tiny_config(
        data,
        tmp_path / "runs",
        **{"train.epochs": 1, "train.log_images": 0, "data.cache_budget_gb": 0, "data.cache_dir": str(cache)},
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert main(["predict", str(run), str(data / "val")]) == 0

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    monkeypatch.setattr(W, "known_weight_files", lambda: {f"net-{digest[:8]}.pth": [("net", "W.V1")]})
    assert main(["weights", "import", str(weights)]) == 0

    load_or_build(tmp_path / "gen" / "shapes.pt", {"split": "train"}, lambda: {"x": torch.zeros(2)})

    written = {
        **_modes_under(run, "run"),
        **_modes_under(cache, "decoded"),
        **_modes_under(tmp_path / "torch_home", "torch_home"),
        **_modes_under(tmp_path / "gen", "gen"),
    }
    for name in (
        "run/checkpoints/best.pt",
        "run/checkpoints/last.pt",
        "run/summary.json",
        "run/config.yaml",
        "run/metrics.jsonl",
        "run/metrics.csv",
        "run/.lock",
        "run/eval/val/metrics.json",
        "run/predictions/predictions.csv",
        f"torch_home/hub/checkpoints/net-{digest[:8]}.pth",
        "gen/shapes.pt",
    ):
        assert name in written, sorted(written)
    assert any(k.startswith("decoded/decoded-") and k.endswith(".npy") for k in written), sorted(written)
    wrong = {name: oct(mode) for name, (mode, folder) in written.items() if mode != (dir_mode if folder else file_mode)}
    assert not wrong, wrong
