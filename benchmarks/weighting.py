"""Single-task baselines vs multitask weighting methods on one config, in one process.

    python benchmarks/weighting.py configs/mtl_scenes.yaml --methods equal,uncertainty,pcgrad,mgda train.epochs=10

Trains one single-task run per task (the baselines), then the multitask config once per method, and
prints a Markdown table: final validation metrics per task, delta_m % against the baselines, and the
mean training time per step with its ratio to equal weighting (same process, same machine).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from mtl.config.load import build_config, load_config
from mtl.engine.monitor import delta_m
from mtl.workflows.compare import run_directions, run_metrics
from mtl.workflows.train import run


def _step_s(summary: Dict[str, Any]) -> float:
    return summary["time"]["mean_train_epoch_s"] / max(summary["steps_per_epoch"], 1)


def _device(summary: Dict[str, Any]) -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run, e.g. train.epochs=5")
    parser.add_argument(
        "--methods",
        default="equal,uncertainty,dwa,pcgrad,mgda,cagrad",
        help="comma-separated weighting names (default: %(default)s)",
    )
    parser.add_argument("--out", default="runs/bench_weighting", help="run directory root (default: %(default)s)")
    parser.add_argument("--skip-single", action="store_true", help="no single-task baselines (no delta_m)")
    parser.add_argument("--metrics", help="comma-separated metric names to show (delta_m always uses all)")
    args = parser.parse_args(argv)

    raw, sources = load_config(args.config, args.overrides + [f"out_dir={args.out}", "train.progress=false"])
    tasks = list(raw.get("tasks") or {})
    baseline: Dict[str, Dict[str, float]] = {}
    rows = []
    if not args.skip_single:
        for task in tasks:
            single = copy.deepcopy(raw)
            single["tasks"] = {task: raw["tasks"][task]}
            single["name"] = f"{raw.get('name', 'run')}_single_{task}"
            single.setdefault("weighting", {})["name"] = "equal"
            t0 = time.perf_counter()
            summary = run(build_config(single, sources), quiet=True)
            print(f"single {task}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            baseline[task] = {m: v for m, v in run_metrics(summary)[task].items() if m != "loss" and v != 0}
            rows.append((f"single-task {task}", summary))
    for method in args.methods.split(","):
        multi = copy.deepcopy(raw)
        multi.setdefault("weighting", {})["name"] = method
        multi["name"] = f"{raw.get('name', 'run')}_{method}"
        t0 = time.perf_counter()
        summary = run(build_config(multi, sources), quiet=True)
        print(f"{method}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        rows.append((method, summary))

    shown = args.metrics.split(",") if args.metrics else None
    columns = [
        (t, m)
        for t in tasks
        for m in (baseline.get(t) or run_metrics(rows[-1][1])[t])
        if m != "loss" and (shown is None or m in shown)
    ]
    equal = next((_step_s(s) for name, s in rows if name == "equal"), None)
    print(
        f"`python benchmarks/weighting.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{time.strftime('%Y-%m-%d')}, {_device(rows[0][1])}\n"
    )
    header = ["run"] + [f"{t}.{m}" for t, m in columns] + ["Δm %", "s/step", "× equal"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for name, summary in rows:
        values = run_metrics(summary)
        cells = [name] + [f"{values[t][m]:.4f}" if m in values.get(t, {}) else "" for t, m in columns]
        multi = all(t in values for t in tasks)
        cells.append(f"{delta_m(values, baseline, run_directions(summary)):+.2f}" if baseline and multi else "")
        step = _step_s(summary)
        cells += [f"{step * 1000:.1f} ms", f"{step / equal:.2f}" if equal and multi else ""]
        print("| " + " | ".join(cells) + " |")
    print(f"\nruns under {Path(args.out).resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
