"""docs/extending.md, executed: its module registers six parts and its config names them; its task type, continual
learner, command and workflow run as written."""

import json
import math
import re
import sys
from pathlib import Path

import pytest

from mtl.cli import main

DOC = Path(__file__).parents[2] / "docs" / "extending.md"


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_documented_parts_train_from_a_config_that_names_them(tmp_path, monkeypatch, capsys):
    pytest.importorskip("captcha")
    (module,) = [b for b in blocks("python") if b.startswith("# my_parts.py")]
    (config,) = [b for b in blocks("yaml") if b.startswith("# my_config.yaml")]
    (tmp_path / "my_parts.py").write_text(module)
    (tmp_path / "my_config.yaml").write_text(config)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # found via the cwd rule
    assert main(["train", "my_config.yaml", "train.progress=false"]) == 0

    from mtl.engine.hooks import HOOKS
    from mtl.models.encoders import ENCODERS
    from mtl.models.heads import HEADS
    from mtl.tasks.base import LOSSES, METRICS
    from mtl.weighting.base import WEIGHTINGS

    for registry, name in [
        (ENCODERS, "tiny_convnet"),
        (HEADS, "cosine"),
        (LOSSES, "focal"),
        (METRICS, "error_rate"),
        (WEIGHTINGS, "inverse_loss"),
        (HOOKS, "grad_norms"),
    ]:
        assert name in registry, name
    assert capsys.readouterr().out.count("mean gradient norm") == 5  # the hook, every 2 of the 10 epochs
    (summary_path,) = (tmp_path / "runs" / "my_parts_demo").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    digit = summary["final"]["val"]["tasks"]["digit"]
    assert set(digit) == {"loss", "acc", "error_rate"}
    assert digit["error_rate"] == pytest.approx(1 - digit["acc"])  # the registered metric, over the whole epoch
    assert summary["tasks"]["digit"]["directions"]["error_rate"] is False
    epochs = [json.loads(line) for line in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["train"]["loss"] < 0.9 * epochs[0]["train"]["loss"]  # it learns
    weights = [e["weights"] for e in epochs]
    assert all(sum(w.values()) == pytest.approx(2.0) for w in weights)  # inverse_loss: weights sum to T
    assert any(abs(w["digit"] - 1.0) > 1e-3 for w in weights)  # and are not simply equal
    import torch

    state = torch.load(summary_path.parent / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert "encoder.stage2.0.weight" in state and "heads.digit.weight" in state  # tiny_convnet + cosine head


def test_unknown_plugin_module_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("model: {encoder: small_cnn}\n")
    assert main(["train", "c.yaml", "--import", "no_such_parts_module"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot import plugin module 'no_such_parts_module'" in err[0]


def test_config_imports_must_be_a_list_of_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("imports: 3\nmodel: {encoder: small_cnn}\n")
    assert main(["train", "c.yaml"]) == 2
    assert "imports must be a list" in capsys.readouterr().err


def _block(lang, first_line):
    (found,) = [b for b in blocks(lang) if b.startswith(first_line)]
    return found


def test_the_documented_task_type_trains_and_reports_its_metrics(tmp_path, monkeypatch):
    pytest.importorskip("captcha")
    from mtl.tasks.base import TASK_TYPES

    monkeypatch.setattr(TASK_TYPES, "_entries", dict(TASK_TYPES._entries))  # the doc's type is gone after this test
    (tmp_path / "my_task.py").write_text(_block("python", "# my_task.py"))
    (tmp_path / "my_task_config.yaml").write_text(_block("yaml", "# my_task_config.yaml"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["train", "my_task_config.yaml", "train.progress=false"]) == 0
    assert TASK_TYPES.get("ordinal").type_name == "ordinal"
    (summary_path,) = (tmp_path / "runs" / "ordinal_demo").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    digit = summary["final"]["val"]["tasks"]["digit"]
    assert set(digit) == {"loss", "acc", "mae"} and 0 <= digit["acc"] <= 1 and 0 <= digit["mae"] <= 9
    assert summary["tasks"]["digit"] == {
        "type": "ordinal",
        "primary": "mae",
        "directions": {"loss": False, "acc": True, "mae": False},
    }
    import torch

    state = torch.load(summary_path.parent / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert state["heads.digit.0.weight"].shape[0] == 10  # one logit per threshold of the ten digits


def test_the_documented_continual_learner_keeps_its_anchor_and_runs_next_to_the_others(tmp_path, monkeypatch):
    pytest.importorskip("captcha")
    import torch
    from test_continual import CONFIGS, tiny

    from mtl.core.checkpoint import load_checkpoint
    from mtl.workflows.learners import LEARNERS

    monkeypatch.setattr(LEARNERS, "_entries", dict(LEARNERS._entries))  # the doc's learner is gone after this test
    monkeypatch.setattr("mtl.workflows.continual.have_matplotlib", lambda: False)
    (tmp_path / "my_learner.py").write_text(_block("python", "# my_learner.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = tiny(
        tmp_path,
        "imports=[my_learner]",
        "continual.methods=[finetune,l2_anchor]",
        "continual.options={l2_anchor: {strength: 10}}",
        "train.epochs=1",
        "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3]}}]",
    )
    assert main(["train", str(CONFIGS / "progressive.yaml"), *overrides]) == 0
    (root,) = (tmp_path / "runs" / "progressive").iterdir()
    summary = json.loads((root / "summary.json").read_text())
    assert [len(row) for row in summary["methods"]["l2_anchor"]["R"]] == [1, 2]
    anchor = load_checkpoint(root / "l2_anchor" / "a" / "learner.pt")["anchor"]
    best = load_checkpoint(root / "l2_anchor" / "a" / "checkpoints" / "best.pt")["model"]
    encoder = [v for k, v in best.items() if k.startswith("encoder.") and v.dtype.is_floating_point]
    assert anchor and all(any(v.shape == a.shape and torch.equal(v, a) for v in encoder) for a in anchor)


def test_the_documented_command_runs_from_its_one_module_and_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("captcha")
    import importlib.util

    from mtl import cli

    (tmp_path / "count.py").write_text(_block("python", "# mtl/commands/count.py"))
    spec = importlib.util.spec_from_file_location("mtl.commands.count", tmp_path / "count.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mtl.commands.count", module)
    spec.loader.exec_module(module)
    line = eval(_block("python", '    ("count"').strip().rstrip(","))  # the doc's one line in COMMANDS
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, line])
    (tmp_path / "my_config.yaml").write_text(_block("yaml", "# my_config.yaml"))
    monkeypatch.chdir(tmp_path)
    assert main(["count", "my_config.yaml"]) == 0
    assert capsys.readouterr().out.splitlines() == ["train: 400 items", "val: 100 items"]
    assert main(["count", "no_such.yaml"]) == 2 and "no_such.yaml" in capsys.readouterr().err


def _load_as(name, path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_the_documented_workflow_and_its_command_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("captcha")
    from mtl import cli

    (tmp_path / "workflow.py").write_text(_block("python", "# mtl/workflows/init_loss.py"))
    (tmp_path / "command.py").write_text(_block("python", "# mtl/commands/init_loss.py"))
    _load_as("mtl.workflows.init_loss", tmp_path / "workflow.py", monkeypatch)
    _load_as("mtl.commands.init_loss", tmp_path / "command.py", monkeypatch)
    line = eval(_block("python", '    ("init_loss"').strip().rstrip(","))
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, line])
    (tmp_path / "my_parts.py").write_text(_block("python", "# my_parts.py"))
    (tmp_path / "my_config.yaml").write_text(_block("yaml", "# my_config.yaml"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["init_loss", "my_config.yaml", "--seeds", "0,1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["seed", "loss"] and [r[0] for r in rows[1:]] == ["0", "1"]
    losses = [float(r[1]) for r in rows[1:]]
    assert all(math.isfinite(v) and v > 0 for v in losses) and losses[0] != losses[1]  # each seed its own heads
