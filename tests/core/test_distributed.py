"""torchrun with 2 CPU processes (gloo) computes, step by step, what one process computes with the same global batch;
and the weighting state agrees across processes whatever their data and RNG."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_folder, tiny_config

from mtl import cli
from mtl.core.checkpoint import load_checkpoint
from mtl.engine import trainer as engine


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


# `mtl train CONFIG` (the real command) with one more hook: after every step it keeps the gradient that was applied
# and the task weights, then puts the parameters back where training started. Every step therefore computes from
# the same weights in 1 and in 2 processes, and only its own rounding separates them; comparing whole runs instead
# compares chaos (a rounding difference flips a ReLU, PCGrad or RLW amplify it).
RECORD = """
import torch
from mtl.engine import trainer as engine


class Record(engine.Hook):
    def __init__(self, steps):
        self.steps = steps

    def before_train(self, trainer):
        self.params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        self.start = [p.detach().clone() for p in self.params]

    def after_step(self, trainer, losses):
        grad = torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None]).double().cpu()
        self.steps.append({"grad": grad, "weights": trainer.weighting.last_weights.detach().double().cpu().clone()})
        with torch.no_grad():
            for p, p0 in zip(self.params, self.start):
                p.copy_(p0)


INIT = engine.Trainer.__init__


def recording(steps):
    def with_record(self, *args, **kwargs):
        INIT(self, *args, **kwargs)
        self.hooks.append(Record(steps))

    return with_record
"""
STEPS = (
    RECORD
    + """
import sys
from mtl.core import distributed as dist
from mtl.workflows.stages import train_from_file

dist.init_from_env()  # what `mtl train` does, then one process group for every config in turn
results = {}
for path in sys.argv[2:]:
    steps = []
    engine.Trainer.__init__ = recording(steps)
    train_from_file(path, [])
    results[path] = steps
if dist.rank() == 0:
    torch.save(results, sys.argv[1])
dist.shutdown()
"""
)

ARCHS = ["arch=ltb", "arch=mmoe"]  # MGDA over the architecture's declared shared parameters
WEIGHTINGS = ["equal", "gradnorm", "rlw", "pcgrad", "mgda", "imtl", "db_mtl", "excess_mtl", "modo"]


def _config(root, weighting):
    """A tiny run; for a weighting, two tasks on the same labels, so that there is something to balance."""
    if weighting == "scenes":  # batched scenes: flips drawn for the global batch, each process takes its share
        return {
            "_base_": str(Path(__file__).parents[2] / "configs" / "mtl_scenes.yaml"),
            "name": "tiny",
            "data": {
                "root": str(root / "scenes"),
                "batch_size": 8,
                "options": {"size": 32, "train_size": 24, "val_size": 8, "seed": 0},
            },
            "model": {"encoder_options": {"widths": [8, 16, 16, 32], "norm": "group"}},
            # depth and normals average over each process's valid pixels, which differ between processes
            "tasks": {"seg": {"head": {"name": "fpn", "options": {"channels": 16}}}, "depth": None, "normal": None},
            "train": {"epochs": 1, "progress": False, "deterministic": True, "log_images": 0},
        }
    cfg = tiny_config(
        make_folder(root / "data"),
        root / "runs",
        **{
            "train.epochs": 1,
            "train.log_images": 0,
            "train.deterministic": True,
            "model.encoder_options": {"widths": [8, 16, 16, 32], "norm": "group"},
        },
    )
    if weighting.startswith("arch="):
        cfg["model"]["arch"] = weighting.partition("=")[2]
        weighting = "mgda"
    if weighting != "equal":
        cfg["tasks"] = {"a": {"target": "label"}, "b": {"target": "label", "head": {"name": "mlp", "hidden": 16}}}
        cfg["weighting"] = {"name": weighting}
    return cfg


def _write(root, weighting, processes):
    path = root / f"{weighting}{processes}.yaml"
    path.write_text(yaml.safe_dump({**_config(root, weighting), "out_dir": str(root / f"runs{processes}")}))
    return path


@pytest.fixture(scope="module")
def torchrun_root(tmp_path_factory):
    return tmp_path_factory.mktemp("torchrun")


@pytest.fixture(scope="module")
def two_processes(torchrun_root):
    """Per-step (gradient, task weights) of every config below, trained under torchrun with 2 processes."""
    root = torchrun_root
    paths = {w: _write(root / w, w, 2) for w in WEIGHTINGS + ARCHS + ["scenes"] if (root / w).mkdir() is None}
    script, out = root / "steps.py", root / "steps.pt"
    script.write_text(STEPS)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(out),
        *map(str, paths.values()),
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    return {w: results[str(p)] for w, p in paths.items()}


def _one_process(tmp_path, weighting, monkeypatch):
    """The same per-step record from `mtl train` in this process."""
    path = _write(tmp_path, weighting, 1)
    namespace, steps = {}, []
    exec(RECORD, namespace)
    monkeypatch.setattr(engine.Trainer, "__init__", namespace["recording"](steps))
    assert cli.main(["train", str(path)]) == 0
    monkeypatch.undo()
    return steps


# The largest per-step differences between 1 and 2 processes measured on a 2-core x86 CPU (batch 8 vs 2 x 4)
# were 4e-7 (gradients, relative) and 0 (weights); these bounds leave room for other CPUs and kernels, and sit
# far below what a missing reduction gives (6e-3 for GradNorm's weights without its all-reduce).
GRAD_TOL, WEIGHT_TOL = 1e-4, 1e-5


def _compare(one, two):
    assert len(one) == len(two) > 0
    gaps = [
        (float((a["grad"] - b["grad"]).norm() / a["grad"].norm()), float((a["weights"] - b["weights"]).abs().max()))
        for a, b in zip(one, two)
    ]
    print(f"largest gaps: gradient {max(g for g, _ in gaps):.1e}, weights {max(w for _, w in gaps):.1e}")
    for k, (grad_gap, weight_gap) in enumerate(gaps):
        assert grad_gap < GRAD_TOL and weight_gap < WEIGHT_TOL, (k, grad_gap, weight_gap)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_two_processes_compute_what_one_computes(tmp_path, monkeypatch, two_processes, weighting):
    """One test per kind of weighting: plain sum, loss weights from gradient norms (GradNorm), random loss weights
    (RLW), random task order on gradients (PCGrad), a solver on gradients (MGDA), learned loss scales on transformed
    losses (IMTL), gradients averaged over steps (DB-MTL), squared gradients summed over steps behind multiplicative
    weights (ExcessMTL), three batches' gradients per step (MoDo: its 6 batches make 2 steps). GradDrop is not here:
    it needs grad_on=representation, where each process balances its own samples' gradients (its sign purity sums
    over the local batch), so 2 processes do not compute what 1 does."""
    one = _one_process(tmp_path, weighting, monkeypatch)
    _compare(one, two_processes[weighting])
    if weighting not in ("equal", "pcgrad"):  # (PCGrad's weights are ones)
        assert len({tuple(s["weights"].tolist()) for s in one}) > 1  # the weights do move from step to step


@pytest.mark.parametrize("arch", ARCHS)
def test_two_processes_compute_what_one_computes_with_an_architecture(tmp_path, monkeypatch, two_processes, arch):
    """LTB draws its tree at random each step (every process must draw the same); MMoE's gates are task-owned."""
    _compare(_one_process(tmp_path, arch, monkeypatch), two_processes[arch])


def test_two_processes_compute_what_one_computes_on_batched_multitask_scenes(tmp_path, monkeypatch, two_processes):
    _compare(_one_process(tmp_path, "scenes", monkeypatch), two_processes["scenes"])


def test_two_processes_sum_the_best_epochs_confusion_matrix(tmp_path, monkeypatch, two_processes, torchrun_root):
    """Each process counts the confusion matrix of its share of the validation split; the one kept for TensorBoard
    (``best_confusion`` in last.pt) is their sum: what one process counts over the whole split. (Every step of these
    runs starts from the same weights, so both validate the same model.)"""
    _one_process(tmp_path, "equal", monkeypatch)
    (one,) = (tmp_path / "runs1").glob("*/*/checkpoints/last.pt")
    (two,) = (torchrun_root / "equal" / "runs2").glob("*/*/checkpoints/last.pt")
    one, two = load_checkpoint(one)["best_confusion"]["label"], load_checkpoint(two)["best_confusion"]["label"]
    assert one.sum() == 3 * 8  # every validation image of conftest's folder (3 classes, 8 each) once
    assert one.sum(1).tolist() == [8, 8, 8] and torch.equal(one, two)


WEIGHTS_AGREE = """
import json, sys
from types import SimpleNamespace
import torch
import torch.distributed as tdist
from mtl.core import distributed as dist
from mtl.weighting import build_weighting
from mtl.weighting.bilevel import MetaProblem

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


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        out = self.head(torch.tanh(self.body(x)))
        return {"a": out[:, 0], "b": out[:, 1], "c": out[:, 2]}


torch.manual_seed(1)
net = Net()  # the same start everywhere; below, each process its own train and meta batches
torch.manual_seed(200 + dist.rank())
fns = {t: (lambda out, y: (out - y).pow(2).mean()) for t in "abc"}
# what MetaProblem reads of an optimizer (torch.optim's first use imports torch._dynamo: seconds)
opt = SimpleNamespace(param_groups=[{"params": list(net.parameters()), "lr": 0.1, "weight_decay": 0.0}], state={})
method = build_weighting("auto_lambda", ["a", "b", "c"], lr=0.01)
for step in range(3):
    train, meta = [(torch.randn(8, 4), {t: torch.randn(8) for t in "abc"}) for _ in range(2)]
    with MetaProblem(net, fns, opt, train, meta) as problem:
        method.meta_step(problem)
    out = net(train[0])
    method(dist.global_mean(torch.stack([fns[t](out[t], train[1][t]) for t in "abc"]))).backward()
    dist.all_reduce_mean_([p.grad for p in net.parameters()])
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
            p.grad = None
everyone = [torch.zeros(3) for _ in range(dist.world_size())]
tdist.all_gather(everyone, method.loss_weights.clone())
seen["auto_lambda"] = [e.tolist() for e in everyone]
if dist.rank() == 0:
    json.dump(seen, open(sys.argv[1], "w"))
dist.shutdown()
"""


def test_weighting_state_agrees_across_processes(tmp_path):
    """GradNorm's weights come from gradient norms, RLW's and PCGrad's from random draws and Auto-Lambda's from
    meta steps on each process's share of the batches: each process must reach the same values although its data
    and global RNG differ."""
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
    assert any(abs(w - 0.1) > 1e-3 for w in seen["auto_lambda"][0]), seen["auto_lambda"]


def test_batch_size_that_does_not_split_is_a_clear_error(tmp_path, monkeypatch):
    from mtl.build.data import build_data
    from mtl.config.load import build_config
    from mtl.core import distributed
    from mtl.core.errors import UserError

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    cfg = build_config(tiny_config(make_folder(tmp_path / "d"), tmp_path / "r"), {})
    with pytest.raises(UserError, match="does not split over 3 processes"):
        build_data(cfg, torch.device("cpu"))


def test_in_order_gives_process_0_the_whole_split(tmp_path, monkeypatch):
    """Under torchrun, each loader yields this process's share; ``in_order`` (used for feature caching and SWA's
    BatchNorm pass) yields every item, for each kind of loader."""
    from test_multitask import scenes_config

    from mtl.build.data import build_data
    from mtl.config.load import build_config
    from mtl.core import distributed
    from mtl.data.loaders import in_order
    from mtl.engine.feature_cache import FeatureBatches

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)
    folder = make_folder(tmp_path / "d")
    configs = [
        build_config(tiny_config(folder, tmp_path / "r"), {}),
        build_config(tiny_config(folder, tmp_path / "r", **{"data.pipeline": "items", "data.num_workers": 0}), {}),
        scenes_config(tmp_path),
    ]
    for cfg in configs:
        _, datasets, loaders, _, _ = build_data(cfg, torch.device("cpu"))
        n = len(datasets["val"])
        share = sum(len(b["image"]) for b in loaders["val"])
        whole = [b for b in in_order(loaders["val"])]
        assert share < n and sum(len(b["image"]) for b in whole) == n, type(loaders["val"]).__name__
    features = FeatureBatches(torch.randn(1, 10, 4), {"label": torch.arange(10)}, batch_size=4, shuffle=False)
    assert sum(len(b["image"]) for b in features) == 5  # items 0, 2 | 4, 6 | 8
    assert torch.cat([b["targets"]["label"] for b in in_order(features)]).tolist() == list(range(10))
