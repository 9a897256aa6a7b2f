"""Faults: SIGTERM mid-epoch and --resume, non-finite losses, out of GPU memory, crashes during writes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_folder, tiny_config
from mtl.checkpoint import load_checkpoint, save_checkpoint
from mtl.config import build_config
from mtl.errors import UserError
from mtl.experiment import run
from mtl.tasks import Classification


def _slow_config(tmp_path, out):
    folder = make_folder(tmp_path / "data", per_class=(48, 8), size=48)
    return tiny_config(folder, out, **{"data.batch_size": 4, "data.image_size": 48, "data.resize_size": 48,
                                       "train.epochs": 4, "train.deterministic": True, "train.log_images": 0})


def _mtl(*args, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mtl", "train", *map(str, args)]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _only_run(out):
    (run_dir,) = [p for p in (out / "tiny").iterdir() if p.is_dir()]
    return run_dir


def test_sigterm_mid_epoch_saves_a_checkpoint_and_resume_finishes_like_an_uninterrupted_run(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_slow_config(tmp_path, tmp_path / "a")))
    whole = _mtl(cfg)
    assert whole.returncode == 0, whole.stderr[-2000:]

    cfg_b = tmp_path / "cfg_b.yaml"
    cfg_b.write_text(yaml.safe_dump(_slow_config(tmp_path, tmp_path / "b")))
    proc = _mtl(cfg_b, wait=False)
    deadline = time.time() + 120
    metrics = None
    while time.time() < deadline:  # wait until the first epoch is done, then stop it inside the second
        runs = list((tmp_path / "b").glob("tiny/*/metrics.jsonl"))
        if runs and runs[0].read_text().count("\n") >= 1:
            metrics = runs[0]
            break
        time.sleep(0.02)
    assert metrics is not None, "the run never finished its first epoch"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "continue with: mtl train --resume" in out + err
    run_dir = metrics.parent
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    steps_per_epoch = 36  # 144 images, batch 4
    assert state["epoch"] < 4 and 0 < state["partial"]["step"] <= steps_per_epoch

    resumed = _mtl("--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((_only_run(tmp_path / "a") / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["epochs"] == 4
    for phase in ("train", "val"):
        assert b["final"][phase] == a["final"][phase]
    wa = torch.load(_only_run(tmp_path / "a") / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


def _nan_after(monkeypatch, calls):
    count = {"n": 0}
    original = Classification.loss

    def loss(self, pred, target):
        count["n"] += 1
        value = original(self, pred, target)
        return value * float("nan") if count["n"] > calls else value

    monkeypatch.setattr(Classification, "loss", loss)


def test_nonfinite_loss_stops_naming_task_and_step_and_keeps_the_last_checkpoint(color_folder, tmp_path, monkeypatch):
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 3}), {})
    _nan_after(monkeypatch, 6 + 3 + 2)  # epoch 1: 6 train + 3 val batches; then 2 good steps of epoch 2
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) in task label at epoch 2, step 9"):
        run(cfg, quiet=True)
    last = load_checkpoint(_only_run(tmp_path / "runs") / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and "partial" not in last
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_nonfinite_loss_can_skip_the_step(color_folder, tmp_path, monkeypatch):
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1, "train.nonfinite": "skip"}), {})
    _nan_after(monkeypatch, 4)  # steps 5 and 6 get nan; validation too, which is reported, not skipped
    summary = run(cfg, quiet=True)
    assert summary["skipped_steps"] == 2
    assert summary["final"]["train"]["loss"] == pytest.approx(summary["final"]["train"]["loss"])  # finite
    weights = torch.load(f"{summary['run_dir']}/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_out_of_gpu_memory_names_the_batch_size(color_folder, tmp_path, monkeypatch):
    from mtl.model import TransferModel

    def oom(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TransferModel, "forward", oom)
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs"), {})
    with pytest.raises(UserError, match=r"out of GPU memory in the train phase at batch size 8; try data.batch_size=4"):
        run(cfg, quiet=True)


def test_a_crash_while_writing_a_checkpoint_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def crash(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
