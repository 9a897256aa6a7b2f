"""Staged configs (one run per stage, ``weights: stage:<name>`` chaining them) and the ``mtl train`` entry that
picks one run, stages or a continual sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from mtl.config.load import build_config, dump_config, load_config
from mtl.config.schema import Config
from mtl.config.stages import stage_configs
from mtl.core import distributed as dist
from mtl.core.checkpoint import atomic_write, save_json
from mtl.core.errors import UserError
from mtl.core.imports import import_config_modules
from mtl.workflows.continual import run_continual
from mtl.workflows.train import new_run_dir, run


def run_stages(top: Config, configs: List[Config]) -> List[Dict[str, Any]]:
    """Run each stage into ``<run>/<stage>/``; ``weights: stage:<name>`` uses that stage's best encoder."""
    root = new_run_dir(top)
    if dist.is_main():
        atomic_write(root / "config.yaml", lambda tmp: dump_config(top, tmp))
    summaries, dirs = [], {}
    for i, cfg in enumerate(configs):
        if cfg.model.weights and cfg.model.weights.startswith("stage:"):
            cfg.model.weights = f"run:{dirs[cfg.model.weights[6:]]}"
        cfg.out_dir = str(root)
        if dist.is_main():
            print(f"\n=== stage {i + 1}/{len(configs)}: {cfg.name} ===")
        dirs[cfg.name] = root / cfg.name
        summaries.append(run(cfg, dirs[cfg.name]))
    if dist.is_main():
        table = stage_table(summaries)
        print("\n" + table)
        atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(table + "\n"))
        save_json({"run_dir": str(root), "stages": summaries}, root / "summary.json")
    return summaries


def stage_table(summaries: List[Dict[str, Any]]) -> str:
    """A Markdown table: best and final validation accuracy, the test accuracy of the best-on-validation checkpoint
    (a column only when a stage has a test split), time per epoch, trainable parameters."""
    tested = any(s.get("test") for s in summaries)
    rows = [
        "| stage | train images | best val acc | final val acc | "
        + ("test acc (best epoch) | " if tested else "")
        + "s/epoch | trainable params |",
        "|---|---:|---:|---:|" + ("---:|" if tested else "") + "---:|---:|",
    ]
    for s in summaries:
        best = (s["best"]["val"] or {}).get("acc", float("nan"))
        final = ((s["final"] or {}).get("val") or {}).get("acc", float("nan"))
        test = ((s.get("test") or {}).get("best") or {}).get("acc")
        rows.append(
            f"| {s['name']} | {s['train_size']} | {best:.4f} | {final:.4f} | "
            + (("—" if test is None else f"{test:.4f}") + " | " if tested else "")
            + f"{s['time']['mean_epoch_s']:.2f} | {s['params']['trainable']:,} |"
        )
    return "\n".join(rows)


def train_from_file(path: str, overrides: List[str]) -> List[Dict[str, Any]]:
    """``mtl train``: a single run, or every stage of a staged config."""

    raw, sources = load_config(path, overrides)
    import_config_modules(raw)
    top = build_config(raw, sources)
    if top.continual.methods:
        if len(top.stages) < 2:
            raise UserError("continual.methods needs a task sequence: two or more stages, one task each")

        if dist.world_size() > 1:
            raise UserError("continual runs (continual.methods) train one process; start them without torchrun")

        return [run_continual(top, stage_configs(raw, sources))]
    if top.stages:
        return run_stages(top, stage_configs(raw, sources))
    return [run(top)]
