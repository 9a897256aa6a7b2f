"""How ``mtl sweep`` starts its runs: each run is an ordinary ``python -m mtl train ...`` process whose output goes to
its own log file, started here (``local``: one at a time or ``jobs`` at once) or as a job of a submitit array
(``slurm``, ``submitit_local``). Only the standard library at module level: a cluster job unpickles
:func:`run_logged` from this module and should not pay for importing torch before the run itself does."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from mtl.core.errors import UserError

CLUSTER_EXTRA = "pip install 'mtl[cluster]'"
POLL_S = 0.2


@dataclass
class Job:
    """One run to start: its command, log file and extra environment."""

    key: int  # the caller's handle (the run's position in the sweep)
    command: List[str]
    log: Path
    env: Dict[str, str] = field(default_factory=dict)


Started = Callable[[Job], None]
Ended = Callable[[Job, int], None]  # the run's exit code: 0 done, 130 interrupted (checkpoint saved), else failed


def mtl_command(args: Sequence[str], gpus: int = 1) -> List[str]:
    """``python -m mtl ARGS``, under ``torchrun --standalone --nproc_per_node=GPUS`` when a job has several GPUs."""
    launch = ["torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m"] if gpus > 1 else []
    return [sys.executable, "-m", *launch, "mtl", *args]


def _open_log(log: Path, command: Sequence[str]) -> Any:
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "a")  # an earlier attempt's output (a resumed run) is kept above
    f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
    f.flush()
    return f


def run_logged(command: List[str], log: str, env: Mapping[str, str]) -> int:
    """Run ``command`` with ``env`` added to the environment, its output appended to ``log``; its exit code. What a
    cluster job runs."""
    with _open_log(Path(log), command) as f:
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def visible_gpus() -> List[str]:
    """The GPUs a child process may use (``CUDA_VISIBLE_DEVICES``'s entries, or 0..n-1), without initialising CUDA
    here."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and not g.strip().startswith("-")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def slot_env(slot: int, jobs: int, n_cores: int, gpus: Sequence[str]) -> Dict[str, str]:
    """The environment of the run in slot ``slot`` of ``jobs`` parallel ones: ``max(1, cores // jobs)`` threads, and
    one GPU of its own when there are at least ``jobs``. One job at a time keeps the environment as it is."""
    if jobs <= 1:
        return {}
    threads = str(max(1, n_cores // jobs))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if len(gpus) >= jobs:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot]
    return env


def _stop(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass


def run_local(jobs_list: Sequence[Job], jobs: int, started: Started, ended: Ended) -> None:
    """Run ``jobs_list`` here, ``jobs`` at a time. Each run is its own session: a Ctrl-C (or SIGTERM) reaches this
    process only, which passes one SIGTERM to each running run (so each saves a checkpoint and exits 130), waits
    for them, and raises KeyboardInterrupt; a second Ctrl-C while waiting kills them."""
    queue = list(jobs_list)
    n_cores, gpus = cores(), visible_gpus() if jobs > 1 else []
    free = list(range(jobs))
    running: Dict[int, tuple] = {}  # slot -> (job, process, log file)
    try:
        with _sigterm_as_interrupt():
            while queue or running:
                while queue and free:
                    job, slot = queue.pop(0), free.pop(0)
                    log = _open_log(job.log, job.command)
                    env = {**os.environ, **slot_env(slot, jobs, n_cores, gpus), **job.env}
                    try:
                        proc = subprocess.Popen(
                            job.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                        )
                    except BaseException:
                        log.close()
                        raise
                    running[slot] = (job, proc, log)
                    started(job)
                for slot, (job, proc, log) in list(running.items()):
                    if proc.poll() is not None:
                        log.close()
                        del running[slot]
                        free.append(slot)
                        ended(job, proc.returncode)
                if running:
                    time.sleep(POLL_S)
    except BaseException as e:  # Ctrl-C, SIGTERM, or a failure here: no run is left behind, training on its own
        procs = [p for _, p, _ in running.values()]
        _stop(procs, signal.SIGTERM)
        try:
            for p in procs:
                p.wait()
        except KeyboardInterrupt:
            _stop(procs, signal.SIGKILL)
            for p in procs:
                p.wait()
        for job, proc, log in running.values():
            log.close()
            if isinstance(e, KeyboardInterrupt):
                ended(job, proc.returncode)
        raise


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread while the block runs (what Ctrl-C does)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals are not ours to take
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def import_submitit() -> Any:
    """The submitit package, or one UserError line naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"the slurm and submitit_local launchers need the submitit package: {CLUSTER_EXTRA}") from None
    return submitit


def check_cluster(launcher: str) -> None:
    """Refuse, before anything is written, a cluster launcher that cannot start jobs here."""
    import_submitit()
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "the slurm launcher needs slurm's sbatch, which is not on PATH here; run mtl sweep on a slurm login "
            "node, or try the sweep locally with --launcher submitit_local (or local)"
        )


def submitit_parameters(slurm: Mapping[str, Any], name: str) -> Dict[str, Any]:
    """AutoExecutor parameters from ``sweep.slurm``: one task per job (several GPUs: torchrun inside it)."""
    params = {
        "name": name,
        "timeout_min": int(slurm["time"]),
        "gpus_per_node": int(slurm["gpus_per_node"]),
        "tasks_per_node": 1,
        "nodes": 1,
        "cpus_per_task": slurm.get("cpus_per_task"),
        "mem_gb": slurm.get("mem_gb"),
        "stderr_to_stdout": True,
        "slurm_partition": slurm.get("partition"),
        "slurm_array_parallelism": int(slurm["array_parallelism"]),
    }
    if slurm.get("extra"):
        params["slurm_additional_parameters"] = dict(slurm["extra"])
    return {k: v for k, v in params.items() if v is not None}


def job_env(slurm: Mapping[str, Any]) -> Dict[str, str]:
    """Threads of a cluster job's run: its CPUs shared among its GPUs' processes (when ``cpus_per_task`` is set)."""
    cpus = slurm.get("cpus_per_task")
    if not cpus:
        return {}
    threads = str(max(1, int(cpus) // max(1, int(slurm["gpus_per_node"]))))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_submitit(
    jobs_list: Sequence[Job],
    launcher: str,
    slurm: Mapping[str, Any],
    folder: Path,
    name: str,
    started: Started,
    ended: Ended,
) -> None:
    """Submit ``jobs_list`` as one array job (slurm, or submitit's local executor) and wait for every job; a job
    that ends without an exit code (cancelled, killed at the time limit) counts as exit code 1. Ctrl-C cancels the
    jobs (each run gets a signal to save a checkpoint) and raises KeyboardInterrupt."""
    if not jobs_list:
        return
    submitit = import_submitit()
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if launcher == "submitit_local" else "slurm")
    executor.update_parameters(**submitit_parameters(slurm, name))
    submitted = executor.map_array(
        run_logged,
        [j.command for j in jobs_list],
        [str(j.log) for j in jobs_list],
        [{**job_env(slurm), **j.env} for j in jobs_list],
    )
    waiting = dict(zip(submitted, jobs_list))
    for job in jobs_list:
        started(job)
    try:
        with _sigterm_as_interrupt():
            while waiting:
                for handle, job in list(waiting.items()):
                    if handle.done():
                        del waiting[handle]
                        ended(job, _exit_code(handle))
                if waiting:
                    time.sleep(POLL_S if launcher == "submitit_local" else 10)
    except KeyboardInterrupt:
        for handle, job in waiting.items():
            handle.cancel(check=False)
        for handle, job in waiting.items():
            ended(job, 130)
        raise


def _exit_code(handle: Any) -> int:
    try:
        code = handle.result()
    except Exception:  # the job died outside the run (cancelled, out of time, node failure): see the job's log
        return 1
    return code if isinstance(code, int) else 1


def describe_code(code: Optional[int]) -> str:
    """``exit 2`` or ``killed by SIGKILL``."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"
