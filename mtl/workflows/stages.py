"""Staged configs (one run per stage, ``weights: stage:<name>`` chaining them) and the ``mtl train`` entry that
picks one run, stages or a continual sequence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from mtl.build.preflight import check_before_data
from mtl.config.load import build_config, dump_config, load_config
from mtl.config.schema import Config
from mtl.config.stages import stage_configs
from mtl.core import distributed as dist
from mtl.core.checkpoint import atomic_write, load_checkpoint, save_json
from mtl.core.errors import UserError
from mtl.core.imports import import_config_modules
from mtl.core.rundir import RunLock, check_not_in_use, lock_run_dir
from mtl.workflows.continual import resume_continual, run_continual
from mtl.workflows.train import check_resumable, new_run_dir, resume_run, run


def run_stages(top: Config, configs: List[Config], root: Optional[Path] = None) -> List[Dict[str, Any]]:
    """Run each stage into ``<run>/<stage>/`` (``root``, else a new run directory); ``weights: stage:<name>`` uses
    that stage's best encoder. Process 0 holds the run's lock throughout (each stage's run holds its own too).

    Every stage is checked first, as far as it can be without its data (``check_before_data``), before anything is
    written; a new run refused before its first stage wrote anything (e.g. by that stage's data) is removed again,
    with the folders made for it."""
    for cfg in configs:
        check_stage(cfg)
    fresh = root is None
    made = _missing_folders(Path(top.out_dir) / top.name) if fresh else []
    root = root or new_run_dir(top)
    lock = dist.on_main(lambda: _lock_new(root, top))
    try:
        return _run_stages(top, configs, root, resume=False)
    except UserError:
        if lock is not None:
            lock.release()
            lock = None
        if fresh:
            dist.on_main(lambda: _remove_unstarted(root, configs, made))
        raise
    finally:
        if lock is not None:
            lock.release()


def check_stage(cfg: Config) -> None:
    """``check_before_data`` of one stage's config, its refusal naming the stage."""
    try:
        check_before_data(cfg)
    except UserError as e:
        raise UserError(f"stage {cfg.name!r}: {e}") from None


def _missing_folders(path: Path) -> List[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_unstarted(root: Path, configs: List[Config], made: List[Path]) -> None:
    """Remove the run ``root`` when no stage has a folder in it yet (only its config.yaml and lock were written),
    then the folders in ``made`` that are left empty."""
    if any((root / cfg.name).exists() for cfg in configs):
        return
    shutil.rmtree(root, ignore_errors=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty: another run wrote there meanwhile
            break


def _lock_new(root: Path, top: Config) -> RunLock:
    root.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(root)
    try:
        atomic_write(root / "config.yaml", lambda tmp: dump_config(top, tmp))
    except BaseException:
        lock.release()
        raise
    return lock


def resume_stages(root: Path, top: Config, configs: List[Config]) -> List[Dict[str, Any]]:
    """Continue the staged run in ``root``: a stage with ``summary.json`` is reused, one with
    ``checkpoints/last.pt`` resumes, later ones run; then the root's results are written. A run whose results and
    stages are all there is left as it is (one line says so)."""
    if (root / "summary.json").is_file() and all((root / c.name / "summary.json").is_file() for c in configs):
        if dist.is_main():
            print(f"{root} is complete: every stage has its summary.json; nothing to resume")
        return json.loads((root / "summary.json").read_text())["stages"]
    lock = dist.on_main(lambda: lock_run_dir(root))
    try:
        return _run_stages(top, configs, root, resume=True)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(top: Config, configs: List[Config], root: Path, resume: bool) -> List[Dict[str, Any]]:
    summaries, dirs = [], {}
    for i, cfg in enumerate(configs):
        if cfg.model.weights and cfg.model.weights.startswith("stage:"):
            cfg.model.weights = f"run:{dirs[cfg.model.weights[6:]]}"
        # cfg.out_dir stays the top config's: `mtl train <root>/<stage>/config.yaml` writes a new top-level run
        run_dir = dirs[cfg.name] = root / cfg.name
        done = resume and (run_dir / "summary.json").is_file()
        if dist.is_main():
            print(f"\n=== stage {i + 1}/{len(configs)}: {cfg.name}{' (done: reused)' if done else ''} ===")
        if done:
            summaries.append(json.loads((run_dir / "summary.json").read_text()))
            continue
        last = run_dir / "checkpoints" / "last.pt"
        partial = resume and last.is_file()
        if resume and run_dir.exists() and not partial:  # killed in its first epoch: nothing to keep
            dist.on_main(lambda: shutil.rmtree(run_dir))
            dist.barrier()
        if partial:
            check_resumable(run_dir, cfg, load_checkpoint(last))
        summaries.append(run(cfg, run_dir, resume=partial))
    if dist.is_main():
        table = stage_table(summaries)
        print("\n" + table)
        atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(table + "\n"))
        save_json({"run_dir": str(root), "stages": summaries}, root / "summary.json")
    return summaries


def stage_table(summaries: List[Dict[str, Any]]) -> str:
    """A Markdown table: best and final validation accuracy, the test accuracy of the best-on-validation checkpoint
    (a column only when a stage has a test split), time per epoch, the one-time caching of encoder features (a column
    only when a stage cached them: ``s/epoch`` leaves it out), trainable parameters."""
    tested = any(s.get("test") for s in summaries)
    cached = any("feature_cache_s" in s for s in summaries)
    rows = [
        "| stage | train images | best val acc | final val acc | "
        + ("test acc (best epoch) | " if tested else "")
        + "s/epoch | "
        + ("features s (once) | " if cached else "")
        + "trainable params |",
        "|---|---:|---:|---:|" + ("---:|" if tested else "") + ("---:|" if cached else "") + "---:|---:|",
    ]
    for s in summaries:
        best = (s["best"]["val"] or {}).get("acc", float("nan"))
        final = ((s["final"] or {}).get("val") or {}).get("acc", float("nan"))
        test = ((s.get("test") or {}).get("best") or {}).get("acc")
        once = s.get("feature_cache_s")
        rows.append(
            f"| {s['name']} | {s['train_size']} | {best:.4f} | {final:.4f} | "
            + (("—" if test is None else f"{test:.4f}") + " | " if tested else "")
            + f"{s['time']['mean_epoch_s']:.2f} | "
            + (("—" if once is None else f"{once:.2f}") + " | " if cached else "")
            + f"{s['params']['trainable']:,} |"
        )
    return "\n".join(rows)


def train_from_file(path: str, overrides: List[str], run_dir: Optional[Path] = None) -> List[Dict[str, Any]]:
    """``mtl train``: a single run, or every stage of a staged config; written at ``run_dir`` when given."""

    raw, sources = load_config(path, overrides)
    import_config_modules(raw)
    top = build_config(raw, sources)
    if top.continual.methods:
        _check_continual(top)
        return [run_continual(top, stage_configs(raw, sources), root=run_dir)]
    if top.stages:
        return run_stages(top, stage_configs(raw, sources), root=run_dir)
    return [run(top, run_dir)]


def _check_continual(top: Config) -> None:
    if len(top.stages) < 2:
        raise UserError("continual.methods needs a task sequence: two or more stages, one task each")
    if dist.world_size() > 1:
        raise UserError("continual runs (continual.methods) train one process; start them without torchrun")


def resume_from_dir(run_dir: str) -> List[Dict[str, Any]]:
    """``mtl train --resume DIR``: a single run resumes from its ``last.pt``; the root of a staged or continual
    run, or a stage's (a method's task's) folder inside one, resumes that whole pipeline."""
    given = Path(run_dir)
    root = pipeline_root(given)
    if root is None:
        return [resume_run(run_dir)]
    if root != given.absolute() and dist.is_main():
        print(f"{given} is part of the run {root}: resuming that run as a whole")
    dist.on_main(lambda: check_not_in_use(root))  # checked again, by taking the lock, before anything is written
    raw, sources = load_config(root / "config.yaml")
    import_config_modules(raw)
    top = build_config(raw, sources)
    configs = stage_configs(raw, sources)
    if top.continual.methods:
        _check_continual(top)
        return [resume_continual(root, top, configs)]
    return resume_stages(root, top, configs)


def pipeline_root(run_dir: Path) -> Optional[Path]:
    """The root of the staged or continual run that ``run_dir`` is (or is a stage's, or a method's task's, folder
    of), judged by the roots' saved ``config.yaml``; None for anything else."""
    d = Path(run_dir).absolute()
    for root, parts in ((d, ()), (d.parent, (d.name,)), (d.parent.parent, (d.parent.name, d.name))):
        try:
            raw, _ = load_config(root / "config.yaml")
        except (UserError, OSError):
            continue
        stages = raw.get("stages") if isinstance(raw, dict) else None
        if not isinstance(stages, list) or not stages:
            continue
        names = [s.get("name") for s in stages if isinstance(s, dict)]
        methods = (raw.get("continual") or {}).get("methods") or []
        expected = (names,) if not methods else (methods, names)
        if not parts or (len(parts) == len(expected) and all(p in e for p, e in zip(parts, expected))):
            return root
    return None
