"""torchrun with 2 CPU processes (gloo) trains the same weights as one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_folder, tiny_config

def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _train(cfg_path, processes):
    if processes == 1:
        cmd = [sys.executable, "-m", "mtl", "train", str(cfg_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "mtl", "train", str(cfg_path)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_dir(out):
    dirs = [p for p in (out / "tiny").iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs  # only process 0 writes: one run directory
    return dirs[0]


@pytest.mark.parametrize("weighting", ["equal", "pcgrad", "rlw"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, weighting):
    folder = make_folder(tmp_path / "data")
    finals = {}
    for n in (1, 2):
        out = tmp_path / f"runs{n}"
        cfg = tiny_config(folder, out, **{"train.epochs": 2, "train.log_images": 0, "train.deterministic": True,
                                          "model.encoder_options": {"widths": [8, 16, 16, 32], "norm": "group"}})
        if weighting != "equal":  # two tasks on the same labels, so that gradients get balanced
            cfg["tasks"] = {"a": {"target": "label"}, "b": {"target": "label", "head": {"name": "mlp", "hidden": 16}}}
            cfg["weighting"] = {"name": weighting}
            cfg["optim"] = {"name": "sgd", "lr": 0.05}  # Adam would magnify float-order noise of near-zero gradients
        path = tmp_path / f"cfg{n}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        done = _train(path, n)
        run_dir = _run_dir(out)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["processes"] == n
        assert done.stdout.count("run ") == 1  # one console, process 0's
        finals[n] = (summary, torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"])
    (s1, w1), (s2, w2) = finals[1], finals[2]
    assert s1["final"]["val"]["loss"] == pytest.approx(s2["final"]["val"]["loss"], rel=1e-4)
    assert s1["final"]["train"]["loss"] == pytest.approx(s2["final"]["train"]["loss"], rel=1e-4)
    for k in w1:
        assert (w1[k].float() - w2[k].float()).abs().max() < 1e-5, (k, (w1[k].float() - w2[k].float()).abs().max(), w1[k].abs().max())


def test_two_processes_match_one_on_batched_multitask_scenes(tmp_path):
    """Scenes load in whole batches with flips drawn for the global batch: each process takes its share."""
    finals = {}
    for n in (1, 2):
        out = tmp_path / f"runs{n}"
        cfg = {"_base_": str(Path(__file__).parents[1] / "configs" / "mtl_scenes.yaml"), "name": "tiny",
               "out_dir": str(out),
               "data": {"root": str(tmp_path / "scenes"), "batch_size": 8,
                        "options": {"size": 32, "train_size": 24, "val_size": 8, "seed": 0}},
               "model": {"encoder_options": {"widths": [8, 16, 16, 32], "norm": "group"}},
               # depth and normals average over each process's valid pixels, which differ between processes
               "tasks": {"seg": {"head": {"name": "fpn", "options": {"channels": 16}}}, "depth": None, "normal": None},
               "optim": {"name": "sgd", "lr": 0.02, "momentum": 0.9},  # Adam magnifies float-order noise
               "train": {"epochs": 2, "progress": False, "deterministic": True}}
        path = tmp_path / f"cfg{n}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        _train(path, n)
        run_dir = _run_dir(out)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["pipeline"].startswith("batched")
        finals[n] = summary
    for phase in ("train", "val"):
        assert finals[1]["final"][phase]["loss"] == pytest.approx(finals[2]["final"][phase]["loss"], rel=1e-4), phase
    assert finals[1]["final"]["val"]["tasks"]["seg"]["miou"] == pytest.approx(finals[2]["final"]["val"]["tasks"]["seg"]["miou"], abs=1e-4)


WEIGHTS_AGREE = """
import json, sys
import torch
import torch.distributed as tdist
from mtl import distributed as dist
from mtl.weighting import build_weighting

dist.init_from_env()
torch.manual_seed(0)
shared = torch.nn.Linear(4, 3)  # the same start everywhere
torch.manual_seed(100 + dist.rank())  # different local data, and a global RNG that runs apart
seen = {}
for name in ("gradnorm", "rlw", "pcgrad"):
    method = build_weighting(name, ["a", "b", "c"])
    for step in range(6):
        out = shared(torch.randn(8, 4))
        losses = torch.stack([out[:, 0].pow(2).mean(), (out[:, 1] - 1).abs().mean(), out[:, 2].exp().mean()])
        if method.gradient_level:
            method(torch.randn(3, 5), losses.detach())
        else:
            method(dist.global_mean(losses), shared=list(shared.parameters()))
        torch.randn(dist.rank() + 1)  # data augmentation drawing more on one process than on the other
    mine = getattr(method, "loss_weights", method.last_weights).clone()
    if name == "pcgrad":  # its weights are all ones: compare the task order it draws next
        mine = torch.cat([method.generator().get_state()[:64].float()])
    everyone = [torch.zeros_like(mine) for _ in range(dist.world_size())]
    tdist.all_gather(everyone, mine)
    seen[name] = [e.tolist() for e in everyone]
if dist.rank() == 0:
    json.dump(seen, open(sys.argv[1], "w"))
dist.shutdown()
"""


def test_weighting_state_agrees_across_processes(tmp_path):
    """GradNorm's weights come from gradient norms and RLW's and PCGrad's from random draws: each process must
    reach the same values although its data and global RNG differ."""
    script = tmp_path / "agree.py"
    script.write_text(WEIGHTS_AGREE)
    out = tmp_path / "seen.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(out.read_text())
    for name, (rank0, rank1) in seen.items():
        assert rank0 == rank1, name
    assert seen["gradnorm"][0] != [1.0, 1.0, 1.0]  # the weights did move


def test_batch_size_that_does_not_split_is_a_clear_error(tmp_path, monkeypatch):
    from mtl import distributed
    from mtl.config import build_config
    from mtl.errors import UserError
    from mtl.experiment import build_data

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    cfg = build_config(tiny_config(make_folder(tmp_path / "d"), tmp_path / "r"), {})
    with pytest.raises(UserError, match="does not split over 3 processes"):
        build_data(cfg, torch.device("cpu"))


def test_in_order_gives_process_0_the_whole_split(tmp_path, monkeypatch):
    """Under torchrun, each loader yields this process's share; ``in_order`` (used for the end-of-run confusion
    matrices that process 0 writes alone) yields every item, for each kind of loader."""
    from test_multitask import scenes_config

    from mtl import distributed
    from mtl.config import build_config
    from mtl.experiment import build_data, in_order
    from mtl.features import FeatureBatches

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)
    folder = make_folder(tmp_path / "d")
    configs = [build_config(tiny_config(folder, tmp_path / "r"), {}),
               build_config(tiny_config(folder, tmp_path / "r", **{"data.pipeline": "items", "data.num_workers": 0}), {}),
               scenes_config(tmp_path)]
    for cfg in configs:
        _, datasets, loaders, _, _ = build_data(cfg, torch.device("cpu"))
        n = len(datasets["val"])
        share = sum(len(b["image"]) for b in loaders["val"])
        whole = [b for b in in_order(loaders["val"])]
        assert share < n and sum(len(b["image"]) for b in whole) == n, type(loaders["val"]).__name__
    features = FeatureBatches(torch.randn(1, 10, 4), {"label": torch.arange(10)}, batch_size=4, shuffle=False)
    assert sum(len(b["image"]) for b in features) == 5  # items 0, 2 | 4, 6 | 8
    assert torch.cat([b["targets"]["label"] for b in in_order(features)]).tolist() == list(range(10))
