"""docs/extending.md, executed: its module registers six parts, its config names them, and training runs."""
import json
import re
import sys
from pathlib import Path

import pytest

from mtl.cli import main

DOC = Path(__file__).parents[1] / "docs" / "extending.md"


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

    for registry, name in [(ENCODERS, "tiny_convnet"), (HEADS, "cosine"), (LOSSES, "focal"),
                           (METRICS, "error_rate"), (WEIGHTINGS, "inverse_loss"), (HOOKS, "grad_norms")]:
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
