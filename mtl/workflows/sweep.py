"""``mtl sweep``: a grid of config overrides, each point trained once per seed, one ordinary run per (point, seed).

The grid is the product of its axes, the first axis outermost: ``optim.lr=0.001,0.003 weighting.name=equal,pcgrad``
gives (0.001, equal), (0.001, pcgrad), (0.003, equal), (0.003, pcgrad); each point's seeds run one after another.
A sweep directory holds ``sweep.json`` (the manifest: grid, points, runs and their status), ``config.yaml`` (the
config with its bases and the fixed overrides applied, without its ``sweep`` section: what every run starts from),
``logs/<point>-seed<k>.log`` and the runs at ``<point>/seed<k>/``, each written by ``mtl train CONFIG OVERRIDES
train.seed=k --run-dir <point>/seed<k>`` in its own process.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from mtl.config.load import build_config, load_config, load_yaml, parse_override
from mtl.config.schema import Config, SweepCfg
from mtl.config.stages import stage_configs
from mtl.core.checkpoint import atomic_write, save_json
from mtl.core.errors import UserError
from mtl.core.imports import import_config_modules, resolve_imports
from mtl.core.rundir import check_not_in_use, lock_run_dir, make_run_dir
from mtl.workflows.launchers import Job, check_cluster, describe_code, mtl_command, run_local, run_submitit
from mtl.workflows.stages import pipeline_root

MANIFEST = "sweep.json"
CONFIG = "config.yaml"
VERSION = 1
_CLI = "mtl sweep's command line"
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
_CLOSING = {"[": "]", "{": "}", "(": ")"}


# --------------------------------------------------------------------------- the grid


def split_values(text: str) -> List[str]:
    """A value split at its top-level commas: ``0.001,0.003`` -> two values; commas inside brackets, braces or
    quotes do not split (``[1,2]`` stays one list)."""
    parts, depth, quote, start = [], [], "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in _CLOSING:
            depth.append(_CLOSING[c])
        elif depth and c == depth[-1]:
            depth.pop()
        elif c == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def value_text(value: Any) -> str:
    """``value`` as an override's YAML text (``0.001``, ``pcgrad``, ``[1, 2]``); refused when it would not read back
    as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("...").strip()
    if parse_override(f"x={text}")[1] != value:
        raise UserError(f"sweep value {value!r} cannot be written as a command-line override; give it as text")
    return text


def _key(keys: Sequence[str], item: str) -> str:
    key = ".".join(keys)
    if keys[0] == "sweep":
        raise UserError(
            f"{item!r}: mtl sweep takes its own settings from --seeds, --jobs, --launcher and the slurm options, or "
            f"from the config's sweep section; it cannot sweep or override sweep.* keys"
        )
    return key


def command_line_grid(overrides: Sequence[str]) -> List[Tuple[str, List[str], List[Any]]]:
    """(key, value texts, values) of each ``key=v1,v2,...`` argument, in order; a key given twice is refused."""
    found: Dict[str, Tuple[str, List[str], List[Any]]] = {}
    for item in overrides:
        key_text, _, text = item.partition("=")
        texts = split_values(text) if "=" in item else [text]
        values = []
        for t in texts:
            keys, value = parse_override(f"{key_text}={t}")
            values.append(value)
        key = _key(keys, item)
        if key in found:
            raise UserError(f"{key} is given twice on the command line; give its values once: {key}=v1,v2")
        found[key] = (key, texts, values)
    return list(found.values())


def _check_axis(key: str, values: List[Any]) -> None:
    if not values:
        raise UserError(f"sweep axis {key} has no values; give one or more, e.g. {key}=v1,v2")
    for i, v in enumerate(values):
        if v in values[:i]:
            raise UserError(f"sweep axis {key} lists {value_text(v)} twice; give each value once")


def point_id(overrides: Sequence[str], taken: Sequence[str]) -> str:
    """A folder name for a point: its overrides joined by ``_`` with other characters replaced (``default`` for
    none), made unique against ``taken``."""
    base = _SAFE.sub("-", "_".join(overrides)).strip("-.")[:100] or "default"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def parse_seeds(text: str) -> List[int]:
    """``0,1,2`` -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds takes integers separated by commas, e.g. --seeds 0,1,2, got {text!r}") from None
    return seeds


# --------------------------------------------------------------------------- planning


def _sweep_section(raw: Mapping[str, Any], sources: Any) -> SweepCfg:
    """The config's ``sweep`` section, validated (defaults when it has none)."""
    section = raw.get("sweep")
    return build_config({"sweep": section or {}}, sources).sweep


def _settings(section: SweepCfg, options: Mapping[str, Any]) -> Dict[str, Any]:
    """Launcher settings: the config's ``sweep`` section, with the command line's options (those not None) over it,
    validated as the section is."""
    settings = {"jobs": section.jobs, "launcher": section.launcher, "slurm": dataclasses.asdict(section.slurm)}
    return _merged_settings(settings, options)


def _merged_settings(settings: Mapping[str, Any], options: Mapping[str, Any]) -> Dict[str, Any]:
    merged = copy.deepcopy(dict(settings))
    sources = {}
    for key in ("jobs", "launcher"):
        if options.get(key) is not None:
            merged[key] = options[key]
            sources[("sweep", key)] = _CLI
    for key, value in (options.get("slurm") or {}).items():
        if value is None or value == {}:
            continue
        merged["slurm"][key] = {**merged["slurm"].get(key, {}), **value} if key == "extra" else value
        sources[("sweep", "slurm", key)] = _CLI
    checked = build_config({"sweep": merged}, sources).sweep
    return {"jobs": checked.jobs, "launcher": checked.launcher, "slurm": dataclasses.asdict(checked.slurm)}


def slurm_extra(items: Sequence[str]) -> Dict[str, Any]:
    """``--slurm-extra account=abc --slurm-extra exclusive=true`` -> {"account": "abc", "exclusive": True}."""
    extra = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-extra takes KEY=VALUE (an sbatch parameter), e.g. account=abc, got {item!r}")
        extra[key.strip()] = load_yaml(text) if text.strip() else None
    return extra


def _point_config(path: str, overrides: Sequence[str]) -> Config:
    """The config one run trains (``mtl train`` with these overrides), validated as ``mtl train`` validates it."""
    raw, sources = load_config(path, overrides)
    raw.pop("sweep", None)
    import_config_modules(raw)
    cfg = build_config(raw, sources)
    if raw.get("stages"):
        stage_configs(raw, sources)
    return cfg


def plan_sweep(
    path: str, overrides: Sequence[str], seeds: Optional[str], options: Mapping[str, Any], imports: Sequence[str] = ()
) -> Dict[str, Any]:
    """The sweep's manifest (every run pending), its config copy and where it goes by default; every point's config
    is built and validated here, so bad input is refused before anything is written."""
    raw, sources = load_config(path)
    section = _sweep_section(raw, sources)
    settings = _settings(section, options)
    grid: Dict[str, Tuple[List[str], List[Any]]] = {}
    for key, values in section.grid.items():
        parse_override(f"{key}=0")
        _key(key.split("."), f"sweep.grid.{key}")
        grid[key] = ([value_text(v) for v in values], list(values))
    fixed = []
    for key, texts, values in command_line_grid(overrides):
        if len(values) > 1 or key in grid:  # a command-line value replaces the config's values of that axis
            grid[key] = (texts, values)
        else:
            fixed.append(f"{key}={texts[0]}")
    for key, (_, values) in grid.items():
        _check_axis(key, values)
    seed_list = parse_seeds(seeds) if seeds is not None else list(section.seeds)
    if len(set(seed_list)) != len(seed_list):
        raise UserError(f"--seeds lists a seed twice: {','.join(map(str, seed_list))}")
    copy_raw, _ = load_config(path, fixed)
    copy_raw.pop("sweep", None)
    if imports:
        given = resolve_imports(list(imports), Path.cwd())  # --import files: from the current folder
        copy_raw["imports"] = list(dict.fromkeys([*(copy_raw.get("imports") or []), *given]))
    points, ids = [], []
    for combo in itertools.product(*[[f"{k}={t}" for t in texts] for k, (texts, _) in grid.items()]):
        ids.append(point_id(combo, ids))
        points.append({"id": ids[-1], "label": " ".join(combo), "overrides": list(combo)})
    base = _point_config(path, fixed)
    seed_list = seed_list or [base.train.seed]
    first = None
    for point in points:
        for seed in seed_list:
            try:
                cfg = _point_config(path, [*fixed, *point["overrides"], f"train.seed={seed}"])
            except UserError as e:
                where = f"sweep point {point['label']}, seed {seed}" if point["label"] else f"seed {seed}"
                raise UserError(f"{where}: {e}") from None
            first = first or cfg
    runs = [
        {"point": p["id"], "seed": s, "dir": f"{p['id']}/seed{s}", "status": "pending"}
        for p in points
        for s in seed_list
    ]
    manifest = {
        "version": VERSION,
        "config": str(path),
        "seeds": seed_list,
        "grid": {k: _json_values(values) for k, (_, values) in grid.items()},
        "points": points,
        "runs": runs,
        "launcher": settings,
    }
    return {"manifest": manifest, "config": copy_raw, "default_dir": Path(first.out_dir) / first.name}


def _json_values(values: Sequence[Any]) -> List[Any]:
    return json.loads(json.dumps(list(values), default=str))


# --------------------------------------------------------------------------- directories


def check_empty_dir(path: str | Path, option: str, hint: str = "") -> Path:
    """``path`` as a Path when it does not exist or is an empty folder; otherwise a UserError naming ``option``."""
    p = Path(path)
    if p.is_dir():
        if next(p.iterdir(), None) is None:
            return p
        problem = "is not empty"
    elif p.exists() or p.is_symlink():
        problem = "is a file"
    else:
        return p
    raise UserError(f"{option} {p} {problem}; give a new folder (or an empty one){hint}")


def _create(path: Path) -> bool:
    """Create ``path`` (and its parents); whether it was created here."""
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    return not existed


def sweep_note(path: str, overrides: Sequence[str]) -> str:
    """The line ``mtl train`` prints for a config with a ``sweep`` section, else ""."""
    try:
        raw, _ = load_config(path, overrides)
    except UserError:  # mtl train reports it
        return ""
    if raw.get("sweep") is None:
        return ""
    return f"note: the sweep section of {path} is used by mtl sweep only; this trains one run from its plain values"


# --------------------------------------------------------------------------- running


def run_sweep(
    path: str,
    overrides: Sequence[str],
    seeds: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    sweep_dir: Optional[str] = None,
    imports: Sequence[str] = (),
    report: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Plan, validate and run a new sweep; returns :func:`_execute`'s result."""
    options = options or {}
    plan = plan_sweep(path, overrides, seeds, options, imports)
    manifest = plan["manifest"]
    if manifest["launcher"]["launcher"] != "local":
        check_cluster(manifest["launcher"]["launcher"])
    if sweep_dir is not None:
        root = check_empty_dir(sweep_dir, "--dir", "; to continue a sweep use mtl sweep --resume DIR")
        created = _create(root)
    else:
        root = make_run_dir(plan["default_dir"] / datetime.now().strftime("sweep-%Y%m%d-%H%M%S"))
        created = True
    lock = None
    try:
        lock = lock_run_dir(root)
        atomic_write(root / CONFIG, lambda tmp: Path(tmp).write_text(yaml.safe_dump(plan["config"], sort_keys=False)))
        save_json(manifest, root / MANIFEST)
    except BaseException:
        if lock is not None:
            lock.release()
        if created:
            shutil.rmtree(root, ignore_errors=True)
        elif root.is_dir():  # an empty --dir: leave it as empty as it was
            for child in root.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    n = len(manifest["runs"])
    points, seeds = len(manifest["points"]), len(manifest["seeds"])
    report(f"sweep {root}: {_count(points, 'point')} x {_count(seeds, 'seed')} = {_count(n, 'run')}")
    try:
        return _execute(root, manifest, list(range(n)), report)
    finally:
        lock.release()


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def read_manifest(sweep_dir: str | Path) -> Dict[str, Any]:
    """A sweep directory's ``sweep.json``; anything else is a UserError."""
    d = Path(sweep_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise UserError(f"{d} is not a sweep directory (it has no {MANIFEST}); give the folder mtl sweep printed")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; it is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION or "runs" not in manifest:
        raise UserError(f"{path} is not a version-{VERSION} sweep manifest")
    return manifest


def resumable(run_dir: Path) -> bool:
    """A run that ``mtl train --resume`` continues: a run with a checkpoint but no summary, or the root of a staged
    or continual run with a stage (a method's task) that has a checkpoint or a summary."""
    if (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "config.yaml").is_file():
        return True
    root = pipeline_root(run_dir) if (run_dir / "config.yaml").is_file() else None
    return root == run_dir.absolute() and (any(run_dir.rglob("last.pt")) or any(run_dir.glob("*/summary.json")))


def resume_sweep(
    sweep_dir: str, options: Optional[Mapping[str, Any]] = None, report: Callable[[str], None] = print
) -> Dict[str, Any]:
    """Continue a sweep: finished runs (with summary.json) are skipped, interrupted ones (a checkpoint, no summary)
    resume, the others start (again); launcher options given here replace the sweep's."""
    root = Path(sweep_dir)
    manifest = read_manifest(root)
    if not (root / CONFIG).is_file():
        raise UserError(f"cannot resume sweep {root}: its {CONFIG} is missing")
    manifest["launcher"] = _merged_settings(manifest.get("launcher") or _settings(SweepCfg(), {}), options or {})
    if manifest["launcher"]["launcher"] != "local":
        check_cluster(manifest["launcher"]["launcher"])
    lock = lock_run_dir(root)
    try:
        todo, counts = [], {"done": 0, "resume": 0, "start": 0}
        for i, run in enumerate(manifest["runs"]):
            d = root / run["dir"]
            if (d / "summary.json").is_file():
                run["status"] = "done"
                counts["done"] += 1
                continue
            if d.is_dir():
                check_not_in_use(d)
            counts["resume" if resumable(d) else "start"] += 1
            todo.append(i)
        for i in todo:
            d = root / manifest["runs"][i]["dir"]
            if d.exists() and not resumable(d):
                _clear(d, report)
            manifest["runs"][i]["status"] = "interrupted" if resumable(d) else "pending"
        save_json(manifest, root / MANIFEST)
        report(
            f"sweep {root}: {counts['done']} of {len(manifest['runs'])} runs done; {counts['resume']} to resume, "
            f"{counts['start']} to start"
        )
        return _execute(root, manifest, todo, report)
    finally:
        lock.release()


def _clear(run_dir: Path, report: Callable[[str], None]) -> None:
    """Make way for a fresh start of a run that cannot resume: a folder without checkpoints or summaries goes; one
    with them (a staged run stopped between stages) is kept under a new name."""
    if not any(run_dir.rglob("*.pt")) and not any(run_dir.rglob("summary.json")):
        shutil.rmtree(run_dir)
        return
    i = 1
    while run_dir.with_name(f"{run_dir.name}.old-{i}").exists():
        i += 1
    kept = run_dir.with_name(f"{run_dir.name}.old-{i}")
    run_dir.rename(kept)
    report(f"{run_dir} cannot resume and starts again; what it had written is kept in {kept}")


def _execute(root: Path, manifest: Dict[str, Any], todo: List[int], report: Callable[[str], None]) -> Dict[str, Any]:
    """Run ``manifest["runs"][i]`` for each i in ``todo`` with the sweep's launcher, keeping ``sweep.json`` up to
    date; one line per run start and end. Returns {"dir", "runs", "failed": [(label, seed, log, code, last line)]}."""
    settings = manifest["launcher"]
    launcher, cluster = settings["launcher"], settings["launcher"] != "local"
    gpus = int(settings["slurm"]["gpus_per_node"]) if cluster else 1
    base = root.absolute()
    points = {p["id"]: p for p in manifest["points"]}
    total = len(manifest["runs"])
    jobs, began, failed = [], {}, []

    def label(i: int) -> str:
        run = manifest["runs"][i]
        text = points[run["point"]]["label"]
        return f"[{i + 1}/{total}] {text + ' ' if text else ''}seed {run['seed']}"

    for i in todo:
        run = manifest["runs"][i]
        d = base / run["dir"]
        if resumable(d):
            args = ["train", "--resume", str(d)]
        else:
            seed = f"train.seed={run['seed']}"
            args = ["train", str(base / CONFIG), *points[run["point"]]["overrides"], seed, "--run-dir", str(d)]
        log = base / "logs" / f"{run['point']}-seed{run['seed']}.log"
        jobs.append(Job(i, mtl_command(args, gpus if cluster else 1), log))

    def started(job: Job) -> None:
        run = manifest["runs"][job.key]
        how = "resumed" if run["status"] == "interrupted" else "submitted" if cluster else "started"
        run["status"] = "running"
        began[job.key] = time.monotonic()
        save_json(manifest, root / MANIFEST)
        report(f"{label(job.key)}: {how}")

    def ended(job: Job, code: int) -> None:
        run = manifest["runs"][job.key]
        d = base / run["dir"]
        took = f"{time.monotonic() - began.get(job.key, time.monotonic()):.0f} s"
        if code == 0 and (d / "summary.json").is_file():
            run["status"], text = "done", f"done in {took}"
        elif code == 130:
            run["status"], text = "interrupted", f"interrupted after {took}"
        else:
            run["status"], text = "failed", f"failed ({describe_code(code)}) after {took}"
            failed.append((label(job.key), job.log, code, _last_line(job.log)))
        save_json(manifest, root / MANIFEST)
        report(f"{label(job.key)}: {text}")

    try:
        if cluster:
            run_submitit(jobs, launcher, settings["slurm"], base / "logs" / "submitit", root.name, started, ended)
        else:
            run_local(jobs, int(settings["jobs"]), started, ended)
    except KeyboardInterrupt:
        print(f"sweep interrupted; continue it with: mtl sweep --resume {root}", file=sys.stderr)
        raise
    return {"dir": root, "runs": manifest["runs"], "failed": failed}


def _last_line(log: Path) -> str:
    """The last line of a run's log that says why it failed (an ``mtl: error`` line, else the last line)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("mtl: error:")]
    return (errors or lines or [""])[-1][:300]
