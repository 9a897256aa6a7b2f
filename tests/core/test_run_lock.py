"""Run directories: atomic creation, one writer at a time (lock), stray temporaries, runs killed before a checkpoint."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_folder, tiny_config

from mtl.cli import main
from mtl.config.load import build_config
from mtl.core.checkpoint import TEMP_SUFFIX, load_checkpoint
from mtl.core.errors import UserError
from mtl.core.rundir import check_not_in_use, lock_run_dir, make_run_dir
from mtl.workflows import train as experiment
from mtl.workflows.train import new_run_dir, resume_run, run


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _train(cfg_path, *overrides):
    cmd = [sys.executable, "-m", "mtl", "train", str(cfg_path), *overrides]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mtl: error: "), lines[0]
    return lines[0]


def _slow_config(tmp_path, epochs):
    folder = make_folder(tmp_path / "data", per_class=(48, 8), size=32)
    cfg = tiny_config(
        folder, tmp_path / "runs", **{"data.batch_size": 4, "train.epochs": epochs, "train.log_images": 0}
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_of_a_run_that_is_training_is_refused_naming_the_pid(tmp_path, capsys):
    cfg = _slow_config(tmp_path, epochs=200)  # far more than the test waits for
    proc = _train(cfg)
    try:
        metrics = _wait_for(
            lambda: next(iter((tmp_path / "runs").glob("tiny/*/metrics.jsonl")), None), proc, "the first epoch"
        )
        run_dir = metrics.parent
        assert main(["train", "--resume", str(run_dir)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"{run_dir} is in use: process {proc.pid} is training it" in line, line
        assert f"kill -TERM {proc.pid}" in line
        assert (run_dir / ".lock").read_text().split()[0] == str(proc.pid)  # still the training's
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=180)
    assert proc.returncode == 130
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer: no epoch twice
    check_not_in_use(run_dir)  # the lock went with the process


def test_a_sigkilled_run_leaves_no_lock_and_resume_says_it_has_no_checkpoint_yet(tmp_path, capsys):
    cfg = _slow_config(tmp_path, epochs=200)
    proc = _train(cfg)
    config = _wait_for(
        lambda: next(iter((tmp_path / "runs").glob("tiny/*/config.yaml")), None), proc, "the run's start"
    )
    run_dir = config.parent
    proc.kill()
    proc.communicate(timeout=60)
    assert main(["train", "--resume", str(run_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run_dir} has no checkpoint yet (killed in its first epoch?)" in line, line
    assert f"start it again with mtl train {run_dir / 'config.yaml'}" in line


def test_lock_is_exclusive_and_released(tmp_path):
    lock = lock_run_dir(tmp_path, wait_s=0)
    with pytest.raises(UserError, match=rf"is in use: process {os.getpid()} is training it"):
        lock_run_dir(tmp_path, wait_s=0)
    with pytest.raises(UserError, match="is in use"):
        check_not_in_use(tmp_path)
    lock.release()
    check_not_in_use(tmp_path)
    lock_run_dir(tmp_path, wait_s=0).release()


def test_a_checkpoint_write_killed_midway_leaves_a_temporary_that_the_next_start_removes(color_folder, tmp_path):
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1, "train.log_images": 0}), {})
    run_dir = Path(run(cfg, quiet=True)["run_dir"])
    last = run_dir / "checkpoints" / "last.pt"
    good = load_checkpoint(last)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import os, signal, sys\n"
                "from mtl.core.checkpoint import atomic_write\n"
                "def write(tmp):\n"
                "    with open(tmp, 'wb') as f:\n"
                "        f.write(b'PK' + bytes(100_000))\n"
                "        f.flush()\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\n"
                "atomic_write(sys.argv[1], write)\n"
            ),
            str(last),
        ],
        env=_env(),
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (stray,) = last.parent.glob(f".last.pt.*{TEMP_SUFFIX}")  # named after the file it was to replace
    assert stray.stat().st_size > 100_000
    resume_run(str(run_dir))  # a finished run: resuming trains nothing, but starts the run again
    assert not list(run_dir.rglob(f"*{TEMP_SUFFIX}"))
    assert load_checkpoint(last)["epoch"] == good["epoch"] == 1


def test_run_directories_are_created_atomically(tmp_path, monkeypatch):
    base = tmp_path / "runs" / "tiny" / "20250101-120000"
    made, start = [], threading.Barrier(8)

    def create():
        start.wait()
        made.append(make_run_dir(base))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)
    assert sorted(p.name for p in made) == sorted([base.name] + [f"{base.name}-{i}" for i in range(1, 8)])

    class Frozen:  # two runs started in the same second, as on a slow network file system
        @staticmethod
        def now():
            from datetime import datetime

            return datetime(2025, 1, 1, 12, 0, 1)

    monkeypatch.setattr(experiment, "datetime", Frozen)
    cfg = build_config({"name": "tiny", "out_dir": str(tmp_path / "runs")}, {})
    first, second = new_run_dir(cfg), new_run_dir(cfg)  # each is created before the next name is chosen
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == first.name + "-1"


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*No locks available"):
        lock = lock_run_dir(tmp_path)
    check_not_in_use(tmp_path)
    lock.release()
