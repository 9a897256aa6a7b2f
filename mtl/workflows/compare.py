"""``mtl compare``: runs grouped by configuration (or by sweep point), their metrics as mean ± std and a 95 %
t-interval over seeds, delta-m in both conventions (``mtl.engine.monitor``), and baseline files."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from mtl.core.checkpoint import atomic_write
from mtl.core.errors import UserError
from mtl.core.stats import Stat, describe
from mtl.engine.monitor import DELTA_CONVENTIONS, Metrics, load_baseline

SELECT_CHOICES = "best, last or last:K (the mean over the last K epochs, K >= 1)"
# config keys that do not make a run a different experiment: seeds are what groups aggregate over
RUN_ONLY_KEYS = ("name", "out_dir", "train.seed")
DELTA_COLUMNS = {"flat": "delta_m_flat", "libmtl": "delta_m_libmtl"}
DELTA_HEADERS = {"delta_m_flat": "Δm % (flat)", "delta_m_libmtl": "Δm % (LibMTL Δp)"}
STEP_COLUMN = "step_ms"  # with timing: mean training time per step (summary.json time), ms
MEMORY_COLUMN = "peak_mib"  # with timing: training memory (summary.json memory), MiB
FEATURES_COLUMN = "features_s"  # with timing: the one-time caching of encoder features (summary.json), s
HEADERS = {
    **DELTA_HEADERS,
    STEP_COLUMN: "train ms/step",
    MEMORY_COLUMN: "train peak MiB",
    FEATURES_COLUMN: "features s (once)",
}

# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run (or one stage of a staged run) as ``mtl compare`` found it."""

    dir: Path  # the folder with its summary.json (a stage's folder for staged runs) and metrics.jsonl
    summary: Dict[str, Any]
    config: Optional[Dict[str, Any]]  # the resolved config.yaml (a staged run's top config); None when absent
    stage: Optional[str] = None
    seed: Optional[int] = None
    point: Optional[Tuple[str, str]] = None  # (sweep folder + point id, point label) for runs of a sweep
    values: Dict[str, float] = field(default_factory=dict)  # "task.metric" and delta-m columns -> reported value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _read_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return config if isinstance(config, dict) else None


def _load_run(run_dir: Path, seed: Optional[int] = None, point: Optional[Tuple[str, str]] = None) -> List[Run]:
    summary = _read_json(run_dir / "summary.json")
    if not isinstance(summary, dict):
        raise UserError(f"{run_dir / 'summary.json'} is not a run summary (a JSON object); was it written by mtl?")
    if "methods" in summary:
        raise UserError(
            f"{run_dir} is a continual run (continual.methods): its table is {run_dir / 'results.md'}; "
            f"mtl compare reads single runs, staged runs and sweeps"
        )
    config = _read_config(run_dir)
    if seed is None and config is not None:
        seed = (config.get("train") or {}).get("seed")
    if "stages" in summary:
        return [Run(run_dir / st["name"], st, config, st["name"], seed, point) for st in summary["stages"]]
    return [Run(run_dir, summary, config, None, seed, point)]


def _load_sweep(folder: Path, skipped: List[str]) -> List[Run]:
    manifest = _read_json(folder / "sweep.json")
    try:
        labels = {p["id"]: p["label"] for p in manifest["points"]}
        entries = [(r["point"], r["seed"], r["dir"], r["status"]) for r in manifest["runs"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder / 'sweep.json'} is not a sweep manifest (it lacks {e}); was it written by mtl sweep?")
    runs: List[Run] = []
    for point, seed, rel, status in entries:
        if status != "done":
            skipped.append(f"{folder / rel} ({status})")
            continue
        if not (folder / rel / "summary.json").is_file():
            raise UserError(f"{folder / 'sweep.json'} lists {folder / rel} as done, but it has no summary.json")
        runs += _load_run(folder / rel, seed, (f"{folder.resolve()}#{point}", labels.get(point, point)))
    return runs


def _walk(folder: Path, skipped: List[str], given: bool = True) -> List[Run]:
    if (folder / "sweep.json").is_file():
        return _load_sweep(folder, skipped)
    if (folder / "summary.json").is_file():
        if not given and "methods" in _read_json(folder / "summary.json"):
            skipped.append(f"{folder} (a continual run: see its results.md)")
            return []
        return _load_run(folder)
    if not given and (folder / "config.yaml").is_file():
        skipped.append(f"{folder} (no summary.json: unfinished?)")
        return []
    runs: List[Run] = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        runs += _walk(child, skipped, given=False)
    return runs


def collect_runs(paths: Sequence[str | Path]) -> Tuple[List[Run], List[str]]:
    """The runs under ``paths`` (run folders, staged runs, sweep folders, or folders holding any of them, searched
    down to the first summary.json or sweep.json), each once; and what was left out (sweep runs not done,
    unfinished runs, continual runs)."""
    runs: List[Run] = []
    skipped: List[str] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"{p} is not a folder; give run folders, sweep folders or folders holding runs")
        found = _walk(p, skipped)
        if not found and not skipped:
            raise UserError(f"{p} holds no run (no summary.json in it or its subfolders); is the run finished?")
        runs += found
    unique: Dict[Path, Run] = {}
    for r in runs:
        unique.setdefault(r.dir.resolve(), r)
    return list(unique.values()), skipped


def find_runs(paths: Sequence[str]) -> List[Tuple[str, Dict[str, Any]]]:
    """``(folder, summary)`` per run: a run directory, a staged run (one per stage), a sweep, or a folder of runs."""
    return [(str(r.dir), r.summary) for r in collect_runs(paths)[0]]


def run_metrics(summary: Mapping[str, Any], which: str = "final") -> Dict[str, Dict[str, float]]:
    """Per-task validation metrics of a run's ``final`` or ``best`` epoch."""
    phase = (summary.get(which) or {}).get("val") or {}
    return {t: dict(m) for t, m in (phase.get("tasks") or {}).items()}


def run_directions(summary: Mapping[str, Any]) -> Dict[str, Dict[str, bool]]:
    """Per task and metric: is higher better?"""
    return {t: dict(info.get("directions", {})) for t, info in (summary.get("tasks") or {}).items()}


def _epochs(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; is it a run folder?")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def run_curve(run_dir: str | Path, task: str, metric: str, phase: str = "val") -> List[Tuple[int, float]]:
    """``(epoch, value)`` of ``task``'s ``metric`` in ``phase`` (train or val) for every epoch of metrics.jsonl."""
    epochs = _epochs(Path(run_dir))
    curve = [
        (int(e["epoch"]), float(e[phase]["tasks"][task][metric]))
        for e in epochs
        if metric in (((e.get(phase) or {}).get("tasks") or {}).get(task) or {})
    ]
    if not curve:
        known = sorted(
            {f"{t}.{m}" for e in epochs for t, ms in ((e.get(phase) or {}).get("tasks") or {}).items() for m in ms}
        )
        raise UserError(
            f"{run_dir}/metrics.jsonl has no {phase} values of {task}.{metric}; it has: {', '.join(known) or 'none'}"
        )
    return curve


# --------------------------------------------------------------------------- selection


def parse_select(select: str) -> Tuple[str, int]:
    """``best`` | ``last`` | ``last:K`` (``final`` is ``last``, the old ``--which`` name) -> (mode, K), with K = 0 for
    a single checkpoint (best or last) and K >= 1 for the mean over the last K epochs of metrics.jsonl."""
    select = "last" if select == "final" else select
    if select in ("best", "last"):
        return select, 0
    mode, _, k = select.partition(":")
    if mode == "last" and k.isdigit() and int(k) >= 1:
        return "last", int(k)
    raise UserError(f"--select must be {SELECT_CHOICES}; got {select!r}")


def _phase_tasks(run: Run, phase: Any, what: str) -> Dict[str, Dict[str, float]]:
    tasks = (phase or {}).get("tasks") if isinstance(phase, dict) else None
    if not tasks:
        raise UserError(f"{run.dir} has no {what} metrics in its summary.json; was it trained with validation?")
    return {t: dict(m) for t, m in tasks.items()}


def selected_metrics(run: Run, mode: str, k: int, on_test: bool) -> Dict[str, Dict[str, float]]:
    """A run's reported metrics: the best (by train.monitor on validation) or last epoch's, on the test split when
    ``on_test``; or, for last:K, the mean validation metrics over its last K epochs (from metrics.jsonl)."""
    s = run.summary
    if on_test:
        return _phase_tasks(run, s["test"].get("best" if mode == "best" else "last"), f"test ({mode})")
    if mode == "best":
        return _phase_tasks(run, (s.get("best") or {}).get("val"), "best-epoch validation")
    if not k:
        return _phase_tasks(run, (s.get("final") or {}).get("val"), "last-epoch validation")
    epochs = [e for e in _epochs(run.dir) if (e.get("val") or {}).get("tasks")]
    if len(epochs) < k:
        raise UserError(
            f"--select last:{k}: {run.dir} has {len(epochs)} epochs with validation metrics; give K <= {len(epochs)}"
        )
    last = [e["val"]["tasks"] for e in epochs[-k:]]
    return {
        t: {m: sum(e[t][m] for e in last) / k for m in ms if all(m in e.get(t, {}) for e in last)}
        for t, ms in last[-1].items()
    }


def _protocol(mode: str, k: int, on_test: bool, test_names: Sequence[Any], baseline: bool) -> str:
    if mode == "best":
        text = "selection: best epoch on validation (train.monitor)"
    elif not k:
        text = "selection: last epoch"
    else:
        text = f"selection: mean over the last {k} epochs"
    names = sorted({str(n) for n in test_names if n})
    split = f"test split ({', '.join(names)})" if names else "test split"
    text += f"; reported: {split}, evaluated once" if on_test else "; reported: validation"
    text += "; mean ± std over seeds (n per group); CI: 95 % t-interval"
    if baseline:
        text += "; Δm per run against the baseline, then over seeds (+ = better than the baseline)"
    return text


# --------------------------------------------------------------------------- groups


@dataclass
class Group:
    """Runs of one configuration (or sweep point, or stage) that differ only in their seed."""

    label: str
    runs: List[Run]
    stats: Dict[str, Stat]  # column -> over the runs that report it

    def as_dict(self) -> Dict[str, Any]:
        return {
            "label": self.label,
            "n": len(self.runs),
            "runs": [{"dir": str(r.dir), "seed": r.seed, "values": r.values} for r in self.runs],
            "stats": {c: s.as_dict() for c, s in self.stats.items()},
        }


@dataclass
class Aggregate:
    """What ``mtl compare`` shows: the groups, the columns in order, and the protocol that produced them."""

    groups: List[Group]
    columns: List[str]  # "task.metric" (loss included), then the delta-m columns with a baseline
    protocol: str
    reported: str  # "val" or "test"
    notes: List[str]

    def as_dict(self) -> Dict[str, Any]:
        return {
            "protocol": self.protocol,
            "reported": self.reported,
            "columns": self.columns,
            "notes": self.notes,
            "groups": [g.as_dict() for g in self.groups],
        }


def _strip(config: Mapping[str, Any]) -> Dict[str, Any]:
    out = json.loads(json.dumps(config))
    for key in RUN_ONLY_KEYS:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


_ABSENT = object()


def _differing(configs: Sequence[Mapping[str, Any]], prefix: str = "") -> List[str]:
    """The dotted keys whose values are not the same in all ``configs``, descending into the mappings among them."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    out: List[str] = []
    for key in keys:
        values = [c.get(key, _ABSENT) for c in configs]
        if any(v != values[0] for v in values):
            mappings = [v for v in values if isinstance(v, dict)]
            if len(mappings) < len(values):
                out.append(f"{prefix}{key}")  # e.g. tasks.depth, set in some configs and null in others
            if len(mappings) > 1:
                out += _differing(mappings, f"{prefix}{key}.")
    return out


def _label_part(config: Mapping[str, Any], key: str) -> str:
    """``key=value`` for a label; empty where a shorter key already tells the difference or the value is a mapping."""
    *parents, last = key.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return ""
    value = node.get(last)
    if isinstance(value, dict):
        return ""
    text = "null" if value is None else json.dumps(value) if isinstance(value, (list, bool)) else str(value)
    return f"{key}={text}"


def _group_key(run: Run) -> Tuple[str, ...]:
    if run.point is not None:
        return ("point", run.point[0], run.stage or "")
    if run.config is None:
        return ("folder", str(run.dir.resolve()))
    return ("config", json.dumps(_strip(run.config), sort_keys=True), run.stage or "")


def _labels(keys: Sequence[Tuple[str, ...]], first: Mapping[Tuple[str, ...], Run]) -> Dict[Tuple[str, ...], str]:
    configs = {k[1]: _strip(first[k].config or {}) for k in keys if k[0] == "config"}
    differing = _differing(list(configs.values())) if len(configs) > 1 else []
    sweeps = {first[k].point[0].rsplit("#", 1)[0] for k in keys if k[0] == "point"}
    labels: Dict[Tuple[str, ...], str] = {}
    for key in keys:
        run = first[key]
        if key[0] == "point":
            label = run.point[1]
            if len(sweeps) > 1:
                label = f"{Path(run.point[0].rsplit('#', 1)[0]).name}: {label}".rstrip(": ")
        elif key[0] == "folder":
            label = str(run.dir)
        else:
            parts = [_label_part(configs[key[1]], d) for d in differing]
            label = " ".join(p for p in parts if p) or str(run.config.get("name", ""))
        labels[key] = f"{label} stage={run.stage}".strip() if run.stage else label
    shared = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    # e.g. a sweep point and plain runs of the same config, or folders without config.yaml
    return {key: f"{label} ({first[key].dir})" if label in shared else label for key, label in labels.items()}


def aggregate(
    paths: Sequence[str | Path],
    select: str = "best",
    baseline: Optional[str | Path | Metrics] = None,
    timing: bool = False,
) -> Aggregate:
    """Runs under ``paths`` grouped by sweep point, else by resolved config apart from train.seed, name and out_dir
    (staged runs: per stage); per group and column (task.metric, and with ``baseline`` delta-m in both conventions,
    computed per run; with ``timing`` the training time per step, the training memory and the time spent caching
    features) the values over seeds with mean, sample std and 95 % t-interval."""
    mode, k = parse_select(select)
    runs, skipped = collect_runs(paths)
    if not runs:
        raise UserError(f"no finished run under {', '.join(map(str, paths))}; left out: {', '.join(skipped)}")
    # never selected on test: best/last report their checkpoint's test metrics when every run has them
    on_test = not k and all(isinstance(r.summary.get("test"), dict) for r in runs)
    base = load_baseline(baseline) if isinstance(baseline, (str, Path)) else baseline
    if isinstance(baseline, (str, Path)):
        _check_baseline_split(Path(baseline), "test" if on_test else "val")
    columns: Dict[str, None] = {}
    for run in runs:
        metrics = selected_metrics(run, mode, k, on_test)
        for task, values in metrics.items():
            for metric, value in values.items():
                columns[f"{task}.{metric}"] = None
                run.values[f"{task}.{metric}"] = float(value)
        if base:
            directions = run_directions(run.summary)
            if all(m in metrics.get(t, {}) and m in directions.get(t, {}) for t, ms in base.items() for m in ms):
                for name, fn in DELTA_CONVENTIONS.items():
                    run.values[DELTA_COLUMNS[name]] = fn(metrics, base, directions)
    if base:
        columns.update(dict.fromkeys(DELTA_COLUMNS.values()))
    if timing:
        for run in runs:
            steps, train_s = (
                run.summary.get("steps_per_epoch"),
                (run.summary.get("time") or {}).get("mean_train_epoch_s"),
            )
            if steps and train_s is not None:
                run.values[STEP_COLUMN] = 1000.0 * float(train_s) / int(steps)
            peak = (run.summary.get("memory") or {}).get("peak_mib")
            if peak is not None:
                run.values[MEMORY_COLUMN] = float(peak)
            if run.summary.get("feature_cache_s") is not None:
                run.values[FEATURES_COLUMN] = float(run.summary["feature_cache_s"])
        columns[STEP_COLUMN] = None
        for column in (MEMORY_COLUMN, FEATURES_COLUMN):
            if any(column in run.values for run in runs):
                columns[column] = None
    first: Dict[Tuple[str, ...], Run] = {}
    members: Dict[Tuple[str, ...], List[Run]] = {}
    for run in runs:
        first.setdefault(_group_key(run), run)
        members.setdefault(_group_key(run), []).append(run)
    labels = _labels(list(members), first)
    groups = []
    notes = [f"left out: {', '.join(skipped)}"] if skipped else []
    for key, group_runs in members.items():
        stats = {}
        for column in columns:
            values = [r.values[column] for r in group_runs if column in r.values]
            if values:
                stats[column] = describe(values)
        groups.append(Group(labels[key], group_runs, stats))
        seeds = [r.seed for r in group_runs if r.seed is not None]
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            notes.append(f"{labels[key]}: several runs with seed {', '.join(map(str, twice))} (not independent seeds)")
    lacking = [str(r.dir) for r in runs if base and DELTA_COLUMNS["flat"] not in r.values]
    if lacking:
        notes.append(f"Δm n/a for runs without every task and metric of the baseline: {', '.join(lacking)}")
    test_names = [(r.summary.get("protocol") or {}).get("test") for r in runs]
    protocol = _protocol(mode, k, on_test, test_names, bool(base))
    return Aggregate(groups, list(columns), protocol, "test" if on_test else "val", notes)


# --------------------------------------------------------------------------- output


def split_column(column: str) -> Tuple[str, str]:
    """``(task, metric)`` of a ``task.metric`` column: task names hold no dot, metric names may
    (``normal.within_11.25``)."""
    task, metric = column.split(".", 1)
    return task, metric


def shown_columns(agg: Aggregate, metrics: Optional[Sequence[str]]) -> List[str]:
    task_columns = [c for c in agg.columns if c not in HEADERS]
    reported = list(dict.fromkeys(split_column(c)[1] for c in task_columns))
    unknown = [m for m in metrics or [] if m not in reported]
    if unknown:
        raise UserError(
            f"--metrics: no run reports {', '.join(unknown)}; the runs report {', '.join(reported) or 'none'}"
        )
    shown = [c for c in task_columns if ((split_column(c)[1] in metrics) if metrics else not c.endswith(".loss"))]
    return shown + [c for c in agg.columns if c in HEADERS]


def _cell(stat: Optional[Stat], n: int, delta: bool, step: bool = False) -> str:
    if stat is None:
        return "n/a" if delta else ""
    f = "{:+.2f}" if delta else "{:.1f}" if step else "{:.4f}"
    spread = "{:.2f}" if delta else "{:.1f}" if step else "{:.4f}"
    text = f.format(stat.mean)
    if stat.std is not None:
        text += f" ± {spread.format(stat.std)} [{f.format(stat.ci_low)}, {f.format(stat.ci_high)}]"
    return text + (f" (n={stat.n})" if stat.n != n else "")


def render(agg: Aggregate, fmt: str = "md", metrics: Optional[Sequence[str]] = None) -> str:
    """The aggregate as a Markdown table (``md``), long-form ``csv`` (one row per group and column, with the
    per-seed values) or ``json``; each starts with the protocol."""
    columns = shown_columns(agg, metrics)
    if fmt == "json":
        out = agg.as_dict()
        for g in out["groups"]:
            g["stats"] = {c: s for c, s in g["stats"].items() if c in columns}
        return json.dumps({**out, "columns": columns}, indent=2, ensure_ascii=False)
    if fmt == "csv":
        buf = io.StringIO()
        buf.write("".join(f"# {line}\n" for line in [agg.protocol] + agg.notes))
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["group", "column", "n", "mean", "std", "ci_low", "ci_high", "values", "seeds"])
        for g in agg.groups:
            for c in columns:
                if c in g.stats:
                    s = g.stats[c]
                    seeds = [r.seed for r in g.runs if c in r.values]
                    writer.writerow(
                        [g.label, c, s.n, repr(s.mean)]
                        + ["" if v is None else repr(v) for v in (s.std, s.ci_low, s.ci_high)]
                        + [";".join(map(repr, s.values)), ";".join("" if x is None else str(x) for x in seeds)]
                    )
        return buf.getvalue().rstrip("\n")
    if fmt != "md":
        raise UserError(f"--format must be md, csv or json; got {fmt!r}")
    costs = [c for c in (STEP_COLUMN, MEMORY_COLUMN) if c in columns]  # each followed by its ratio
    columns = [c for c in columns if c not in costs]
    reference = {c: next((g for g in agg.groups if c in g.stats), None) for c in costs}
    header = ["group", "n"] + [HEADERS.get(c, c) for c in columns]
    for c in costs:
        ref = reference[c]
        header += [HEADERS[c]] + ([f"× {ref.label}"] if ref is not None else [])
    lines = [agg.protocol, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for g in agg.groups:
        n = len(g.runs)
        cells = [g.label, str(n)] + [
            _cell(g.stats.get(c), n, c in DELTA_HEADERS, c == FEATURES_COLUMN) for c in columns
        ]
        for c in costs:
            stat, ref = g.stats.get(c), reference[c]
            cells.append(_cell(stat, n, False, True))
            if ref is not None:
                cells.append(f"{stat.mean / ref.stats[c].mean:.2f}" if stat and ref.stats[c].mean > 0 else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = list(agg.notes)
    if any(len(g.runs) == 1 for g in agg.groups):
        notes.append("n = 1: the value of a single run, no ± or interval")
    if reference.get(STEP_COLUMN) is not None:
        notes.append(
            "train ms/step: training time of an epoch over its steps, mean over seeds; "
            f"× {reference[STEP_COLUMN].label}: the ratio of those means (runs that shared the machine's cores with "
            "other jobs are not comparable)"
        )
    if reference.get(MEMORY_COLUMN) is not None:
        notes.append(
            "train peak MiB: peak CUDA memory allocated while training, or on the CPU how much the process's peak "
            "resident memory grew while training and validating (beyond the model and data loaded before), mean over "
            "seeds; × the ratio of those means"
        )
    if FEATURES_COLUMN in columns:
        notes.append(
            "features s (once): the seconds spent caching the frozen encoder's features before the first epoch "
            "(train.cache_features), mean over seeds; train ms/step leaves them out"
        )
    if any(c in DELTA_HEADERS for c in columns):
        notes.append(
            "Δm flat: mean over all (task, metric) pairs (Maninis et al. 2019); LibMTL Δp: mean over tasks of each "
            "task's mean (Lin & Zhang 2023)"
        )
    return "\n".join(lines + ([""] + notes if notes else []))


def compare_table(
    paths: Sequence[str],
    baseline: Optional[str] = None,
    select: str = "best",
    metrics: Optional[Sequence[str]] = None,
    fmt: str = "md",
) -> str:
    """``mtl compare``: the runs under ``paths`` aggregated (see ``aggregate``) and rendered (see ``render``)."""
    return render(aggregate(paths, select, baseline), fmt, metrics)


# --------------------------------------------------------------------------- baselines


def _check_baseline_split(path: Path, reported: str) -> None:
    """Refuse a baseline file written from the other split than the one the table reports."""
    for line in path.read_text().splitlines():
        if line.startswith("# reported: "):
            split = line[len("# reported: ") :].split()[0]
            if split != reported:
                names = {"val": "validation", "test": "test"}
                raise UserError(
                    f"baseline file {path} holds {names.get(split, split)} metrics but the runs report "
                    f"{names[reported]} metrics; write the baseline from runs evaluated the same way"
                )


def write_baseline(paths: Sequence[str], out: str | Path, select: str = "best") -> Dict[str, Dict[str, float]]:
    """A baseline file ``{task: {metric: mean over seeds}}`` from (single-task) runs, one group of runs per task,
    with a comment header naming n and the runs; a task given by two groups is an error."""
    agg = aggregate(paths, select)
    baseline: Dict[str, Dict[str, float]] = {}
    source: Dict[str, Group] = {}
    for g in agg.groups:
        for task in dict.fromkeys(split_column(c)[0] for c in g.stats if c not in HEADERS):
            if task in source:
                raise UserError(
                    f"task {task!r} is in both groups {source[task].label!r} and {g.label!r}; "
                    f"give one group of runs (seeds of one config) per task"
                )
            source[task] = g
            # a zero baseline cannot be improved on relatively (e.g. no pixel within 11.25 degrees yet): left out
            baseline[task] = {
                split_column(c)[1]: s.mean
                for c, s in g.stats.items()
                if c not in HEADERS and split_column(c)[0] == task and not c.endswith(".loss") and s.mean != 0
            }
    header = [
        "single-task baselines for delta_m: {task: {metric: value}}, each the mean over n runs",
        f"reported: {agg.reported}",
        agg.protocol,
    ]
    header += [f"{t}: n={len(g.runs)}: {', '.join(str(r.dir) for r in g.runs)}" for t, g in source.items()]
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(baseline, sort_keys=False)
    atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text))
    return baseline
