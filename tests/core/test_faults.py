"""Faults: signals (SIGTERM mid-epoch, to a process group, to torchrun) and --resume, non-finite losses, out of
memory, full disks and read-only folders, crashes during writes."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_folder, sigterm_at_step, tiny_config

from mtl.cli import main
from mtl.config.load import build_config
from mtl.core.checkpoint import TEMP_SUFFIX, load_checkpoint, save_checkpoint
from mtl.core.errors import UserError
from mtl.tasks.classification import Classification
from mtl.workflows.train import run


def _slow_config(tmp_path, out):
    folder = make_folder(tmp_path / "data", per_class=(48, 8), size=48)
    return tiny_config(
        folder,
        out,
        **{
            "data.batch_size": 4,
            "data.image_size": 48,
            "data.resize_size": 48,
            "train.epochs": 4,
            "train.deterministic": True,
            "train.log_images": 0,
        },
    )


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
    cfg = build_config(
        tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1, "train.nonfinite": "skip"}), {}
    )
    _nan_after(monkeypatch, 4)  # steps 5 and 6 get nan; validation too, which is reported, not skipped
    summary = run(cfg, quiet=True)
    assert summary["skipped_steps"] == 2
    assert summary["final"]["train"]["loss"] == pytest.approx(summary["final"]["train"]["loss"])  # finite
    weights = torch.load(f"{summary['run_dir']}/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_out_of_gpu_memory_names_the_batch_size(color_folder, tmp_path, monkeypatch):
    from mtl.models.transfer import TransferModel

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
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk broke")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


# --------------------------------------------------------------------------- memory, full disk, read-only folders


def _cli(capsys, *args):
    """``mtl`` in this process: exit code and the stderr lines."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], err


def _one_line(code, lines, err, *words):
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mtl: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


CPU_OOM = (
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 38654705664 bytes. "
    "Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("error", [RuntimeError(CPU_OOM), MemoryError()], ids=["allocator", "MemoryError"])
def test_out_of_cpu_memory_names_the_phase_and_batch_size(color_folder, tmp_path, monkeypatch, error):
    from mtl.models.transfer import TransferModel

    def oom(self, x):
        raise error

    monkeypatch.setattr(TransferModel, "forward", oom)
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.log_images": 0}), {})
    with pytest.raises(
        UserError,
        match=r"^out of CPU memory in the train phase at batch size 8; try data.batch_size=4 "
        r"\(or a smaller data.image_size\)$",
    ):
        run(cfg, quiet=True)


def test_out_of_memory_outside_a_phase_is_one_line(color_folder, tmp_path, monkeypatch, capsys):
    from mtl.workflows import train as experiment

    def oom(cfg):
        raise RuntimeError(f"Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback:\n{CPU_OOM}")

    monkeypatch.setattr(experiment, "build_experiment", oom)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(color_folder, tmp_path / "runs")))
    _one_line(
        *_cli(capsys, "train", cfg),
        "out of memory (DefaultCPUAllocator: can't allocate memory",
        "lower data.batch_size or data.image_size",
    )
    assert not (tmp_path / "runs").exists()


def _no_space(*args):
    return OSError(errno.ENOSPC, "No space left on device")


def _fail_on_call(monkeypatch, owner, name, n, error=_no_space, when=lambda *a, **k: True, partial=None):
    """Make ``owner.name`` raise ``error`` at its n-th call that satisfies ``when``, after calling ``partial`` (which
    writes part of the data, as a disk that fills up midway does)."""
    real, seen = getattr(owner, name), {"n": 0}

    def flaky(*args, **kwargs):
        if when(*args, **kwargs):
            seen["n"] += 1
            if seen["n"] == n:
                if partial is not None:
                    partial(*args, **kwargs)
                raise error(*args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


def _inject_full_disk(monkeypatch, where):
    """A full disk at one of the writes that a training run of 2 epochs makes, in the second epoch."""
    import tensorboard.compat.tensorflow_stub.io.gfile as gfile

    from mtl.workflows import train as experiment

    if where == "config":
        _fail_on_call(monkeypatch, experiment, "dump_config", 1, partial=lambda cfg, p: Path(p).write_text("name: ti"))
    elif where == "checkpoint":  # last.pt of epoch 2, half written
        _fail_on_call(
            monkeypatch,
            torch,
            "save",
            2,
            when=lambda obj, f: ".last.pt." in f.name,
            partial=lambda obj, f: f.write(b"PK\x03\x04" + bytes(50_000)),
        )
    elif where == "metrics":  # the second line, half written
        real_write = os.write
        calls = {"n": 0}

        def half_line(fd, data):
            if _fd_path(fd).endswith("metrics.jsonl"):
                calls["n"] += 1
                if calls["n"] == 2:
                    return real_write(fd, bytes(data)[:20])  # a short write; the next one finds the disk full
                if calls["n"] == 3:
                    raise _no_space()
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", half_line)
    elif where in ("tensorboard", "tensorboard-read-only"):  # TensorBoard's writer thread, in epoch 2
        err = _no_space if where == "tensorboard" else lambda *a: OSError(errno.EROFS, "Read-only file system")
        _fail_on_call(monkeypatch, gfile.LocalFileSystem, "append", 13, error=err)  # 10 events per epoch
    elif where == "summary":
        _fail_on_call(monkeypatch, Path, "write_text", 1, when=lambda self, *a, **k: ".summary.json." in self.name)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # no thread tracebacks
@pytest.mark.parametrize(
    "where", ["config", "checkpoint", "metrics", "tensorboard", "tensorboard-read-only", "summary"]
)
def test_a_full_disk_is_one_line_and_keeps_what_was_written(color_folder, tmp_path, monkeypatch, capsys, where):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 2, "train.log_images": 0}))
    )
    _inject_full_disk(monkeypatch, where)
    code, lines, err = _cli(capsys, "train", cfg)
    monkeypatch.undo()
    if where == "config":  # nothing of the run was written: no run directory
        _one_line(code, lines, err, "no space left on device writing", "config.yaml")
        assert not list((tmp_path / "runs").glob("tiny/*"))
        return
    run_dir = _only_run(tmp_path / "runs")
    words = {
        "checkpoint": run_dir / "checkpoints" / "last.pt",
        "metrics": run_dir / "metrics.jsonl",
        "tensorboard": run_dir / "events.out.tfevents.",
        "tensorboard-read-only": run_dir / "events.out.tfevents.",
        "summary": run_dir / "summary.json",
    }[where]
    kind = "cannot write" if where.endswith("read-only") else "no space left on device writing"
    line = _one_line(code, lines, err, f"{kind} {words}")  # and no traceback of TensorBoard's writer thread
    assert f"then continue with mtl train --resume {run_dir}" in line
    if where == "summary":
        assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 2
        assert not (run_dir / "summary.json").exists()
    else:
        assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1  # the last good one, intact
        assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["epoch"] in (1, 2)
    for text in (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True):
        assert text.endswith("\n") and json.loads(text)  # whole lines only
    assert not list(run_dir.rglob(f"*{TEMP_SUFFIX}"))
    if where == "checkpoint":  # with space again, the run continues where its checkpoint is
        assert main(["train", "--resume", str(run_dir)]) == 0
        epochs = [json.loads(t)["epoch"] for t in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2]


@contextlib.contextmanager
def _tmpfs(path, size):
    """A small tmpfs at ``path`` (root with the right to mount only: skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(
            "cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the monkeypatched tests cover the writes"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _check_run_files(run_dir):
    """Every file a run wrote is whole: JSON lines, checkpoints, summary; no temporaries are left."""
    for text in (
        (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
        if (run_dir / "metrics.jsonl").exists()
        else []
    ):
        assert text.endswith("\n") and json.loads(text)
    for pt in (run_dir / "checkpoints").glob("*.pt"):
        load_checkpoint(pt)
    if (run_dir / "summary.json").exists():
        json.loads((run_dir / "summary.json").read_text())
    assert not list(run_dir.rglob(f"*{TEMP_SUFFIX}"))


def test_a_full_disk_at_every_fill_level_is_one_line(color_folder, tmp_path, capsys):
    """A real small file system, filled up to leave 0, 4, 8, 16, 32, 64, ... KiB: every run ends well or with one
    line, and what it wrote is whole."""
    disk = tmp_path / "disk"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            tiny_config(
                color_folder,
                disk / "runs",
                **{"train.epochs": 1, "train.log_images": 0, "model.encoder_options": {"widths": [4, 4, 8, 8]}},
            )
        )
    )
    outcomes = []
    with _tmpfs(disk, "2m"):
        for free_kib in [0, 4, 8, 16, *range(32, 2048, 32)]:
            for p in disk.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            st = os.statvfs(disk)
            (disk / "ballast").write_bytes(bytes(max(st.f_bavail * st.f_frsize - free_kib * 1024, 0)))
            code, lines, err = _cli(capsys, "train", cfg)
            outcomes.append(code)
            if code == 0:
                if outcomes[-2:] == [0, 0]:  # it fits from here on
                    break
                continue
            _one_line(code, lines, err, "no space left on device writing")
            for run_dir in (disk / "runs").glob("tiny/*"):  # none when refused before the run started
                _check_run_files(run_dir)
                assert "then continue with mtl train --resume" in lines[0] or "then start it again with" in lines[0]
    print("OUTCOMES", outcomes)
    assert outcomes[0] == 2 and outcomes[-1] == 0, outcomes


def test_predict_out_on_a_full_disk_is_one_line_and_keeps_earlier_files(color_folder, tmp_path, monkeypatch, capsys):
    import csv

    from PIL import Image

    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1, "train.log_images": 0}), {})
    run_dir = run(cfg, quiet=True)["run_dir"]
    out = tmp_path / "out"
    assert main(["predict", run_dir, str(color_folder / "val"), "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["predictions.csv", "predictions.png"]
    for name in before:
        if name.endswith(".csv"):
            _fail_on_call(monkeypatch, csv.DictWriter, "writerows", 1)
        else:
            _fail_on_call(
                monkeypatch,
                Image.Image,
                "save",
                1,
                when=lambda im, fp, *a, **k: ".predictions.png." in str(fp),
                partial=lambda im, fp, *a, **k: Path(fp).write_bytes(b"\x89PNG half"),
            )
        code, lines, err = _cli(capsys, "predict", run_dir, color_folder / "val", "--out", out)
        monkeypatch.undo()
        _one_line(
            code,
            lines,
            err,
            f"no space left on device writing {out / name}; free space there or write "
            f"elsewhere; --out names another folder",
        )
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier files, whole


@contextlib.contextmanager
def _read_only(folder):
    """``folder`` read-only: a read-only bind mount as root (who may write anywhere), else chmod -R a-w."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    try:
        bound = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if bound.returncode != 0:
        pytest.skip("as root, a read-only folder needs a read-only bind mount, which is not allowed here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_run_directory_is_one_line_without_thread_tracebacks(color_folder, tmp_path, capsys):
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1}), {})
    run_dir = Path(run(cfg, quiet=True)["run_dir"])
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with _read_only(run_dir):
        line = _one_line(
            *_cli(capsys, "train", "--resume", run_dir),
            f"cannot write in run directory {run_dir} (",
            "copy it somewhere writable and resume the copy",
        )
        assert "read-only file system" in line or "permission denied" in line
        _one_line(
            *_cli(capsys, "predict", run_dir, color_folder / "val"),
            f"cannot write {run_dir / 'predictions'}",
            "--out names another folder",
        )
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


# --------------------------------------------------------------------------- signals


def test_sigterm_in_the_first_epoch_saves_a_checkpoint_that_resumes_exactly(color_folder, tmp_path, monkeypatch):
    from mtl.workflows.train import resume_run

    def config(out):
        return build_config(
            tiny_config(color_folder, out, **{"train.epochs": 2, "train.deterministic": True, "train.log_images": 0}),
            {},
        )

    whole = run(config(tmp_path / "a"), quiet=True)

    sigterm_at_step(monkeypatch, 3)  # the real handler: stop after this step
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "b"), quiet=True)
    monkeypatch.undo()
    run_dir = _only_run(tmp_path / "b")
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["partial"]["step"] == 3 and state["history"] == []
    assert not (run_dir / "metrics.jsonl").exists()
    resumed = resume_run(str(run_dir))
    assert resumed["epochs"] == 2
    for phase in ("train", "val"):
        assert resumed["final"][phase] == whole["final"][phase]
    wa = load_checkpoint(Path(whole["run_dir"]) / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _wait_for_first_epoch(out_dir, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for metrics in out_dir.glob("tiny/*/metrics.jsonl"):
            if metrics.read_text().count("\n") >= 1:
                return metrics.parent
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run never finished its first epoch")


def _children():
    """{pid: [child pids]} of every process (Linux /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def _wait_for_workers(proc, ranks=0, workers=2, timeout=120):
    """Until the loader workers run: ``workers`` children of ``proc``, or with ``ranks`` (torchrun) that many
    children each with a worker of its own. Signals matter to workers only while they exist."""
    deadline = time.time() + timeout
    while True:
        tree = _children()
        if ranks:
            kids = tree.get(proc.pid, [])
            if len(kids) == ranks and all(tree.get(k) for k in kids):
                return
        elif len(tree.get(proc.pid, [])) >= workers:
            return
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the loader workers of the training never appeared")
        time.sleep(0.02)


def _epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_resumes(tmp_path):
    """What a scheduler does (kill -TERM -<pgid>): the per-item loader's workers get the signal too."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_slow_config(tmp_path, tmp_path / "runs")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtl", "train", str(cfg), "data.pipeline=items", "data.num_workers=2", "train.epochs=3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    run_dir = _wait_for_first_epoch(tmp_path / "runs", proc)
    _wait_for_workers(proc, workers=2)  # the second epoch's
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert f"continue with: mtl train --resume {run_dir}" in out + err
    assert "partial" in load_checkpoint(run_dir / "checkpoints" / "last.pt")
    deadline = time.time() + 60
    while time.time() < deadline:  # the workers ended with the main process
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("loader workers outlived the main process")
    resumed = _mtl("--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _epochs(run_dir) == [1, 2, 3]


def test_loader_workers_never_die_of_a_process_group_signal_even_while_starting(tmp_path):
    """SIGTERM to the process group at random moments around the workers' start (torch's own worker handler would
    die of it): the workers live on, and the main process gets every signal."""
    script = tmp_path / "stress.py"
    script.write_text(
        "import os, random, signal, threading, torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from mtl.data.loaders import SignalSafeLoader\n"
        "from mtl.core.runtime import ignore_stop_signals\n"
        "got, failed, trials = [], 0, 16\n"
        "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
        "for trial in range(trials):\n"
        "    loader = SignalSafeLoader(TensorDataset(torch.arange(32.0)), batch_size=8, num_workers=2,\n"
        "                              worker_init_fn=ignore_stop_signals)\n"
        "    timer = threading.Timer(random.uniform(0, 0.03), os.killpg, (0, signal.SIGTERM))\n"
        "    timer.start()\n"
        "    try:\n"
        "        assert sum(len(b[0]) for b in loader) == 32\n"
        "    except RuntimeError as e:\n"
        "        failed += 1\n"
        "    timer.join()\n"
        "print(failed, len(got), trials)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    failed, signals, trials = map(int, done.stdout.split())
    assert failed == 0 and signals == trials


def test_sigterm_to_torchrun_saves_one_checkpoint_and_resumes(tmp_path):
    """torchrun passes SIGTERM to each process (and its loader workers); all stop at the same step, process 0 saves."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_slow_config(tmp_path, tmp_path / "runs")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mtl",
        "train",
    ]
    proc = subprocess.Popen(
        [*torchrun, str(cfg), "data.pipeline=items", "data.num_workers=1", "train.epochs=3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = _wait_for_first_epoch(tmp_path / "runs", proc)
    _wait_for_workers(proc, ranks=2)  # each with the loader worker of its second epoch
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert "[rank0]" not in err and "[rank1]" not in err, err[-3000:]  # no process failed
    assert out.count(f"continue with: mtl train --resume {run_dir}") == 1, out + err[-3000:]
    assert err.count("mtl: interrupted") == 1
    assert "partial" in load_checkpoint(run_dir / "checkpoints" / "last.pt")
    resumed = subprocess.run(
        [*torchrun, "--resume", str(run_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _epochs(run_dir) == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["processes"] == 2
