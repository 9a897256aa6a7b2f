"""Files mtl writes get the permissions a plain open() gives (0666 less the umask), not a temporary file's 0600:
checkpoints and summaries are readable by the user's group under the usual umask 022."""

import os
import stat

import pytest
import yaml
from conftest import make_folder, tiny_config

from mtl.cli import main
from mtl.core.checkpoint import atomic_write


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


def test_a_runs_checkpoints_and_summary_are_group_readable(tmp_path, umask):
    umask(0o022)
    cfg = tiny_config(make_folder(tmp_path / "data"), tmp_path / "runs", **{"train.epochs": 1, "train.log_images": 0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    for name in ("checkpoints/best.pt", "checkpoints/last.pt", "summary.json", "config.yaml"):
        assert stat.S_IMODE((run / name).stat().st_mode) & 0o044 == 0o044, name
