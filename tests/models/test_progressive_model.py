"""ProgressiveNet: stage splitting, laterals, frozen columns that stay frozen, the Trainer view."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtl.config.schema import OptimCfg
from mtl.core.errors import UserError
from mtl.engine.optim import build_optimizer
from mtl.engine.trainer import Trainer
from mtl.models.encoders import build_encoder
from mtl.models.heads import HEADS
from mtl.models.progressive import LateralAdapter, LinearLateral, ProgressiveNet, split_stages
from mtl.tasks.base import build_task

WIDTHS = [8, 16, 16, 32]
OUT = {"a": 3, "b": 4, "c": 5}


def small_encoder():
    return build_encoder("small_cnn", widths=WIDTHS)


def head(out_dim, name="linear"):
    return HEADS.get(name)(in_dim=WIDTHS[-1], out_dim=out_dim, feature_info=None, hidden=16, dropout=0.0)


def make_net(tasks=("a", "b", "c"), lateral=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = ProgressiveNet(small_encoder, alpha=0.5, lateral=lateral, **kwargs)
    for t in tasks:
        net.add_column(t, head(OUT[t]))
    return net


def images(n=8, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def train_steps(net, task, steps=3, momentum=0.0, weight_decay=0.0, seed=2):
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, OUT[task], (8,), generator=g)
        loss = nn.functional.cross_entropy(net(x, task), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return params


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


# ------------------------------------------------------------------------------------------------ split_stages
def _check_split(encoder, x):
    encoder.eval()
    with torch.no_grad():
        expected = encoder(x)
        stages = split_stages(encoder)
        assert [n for n, _ in stages] == [i["name"] for i in encoder.feature_info]
        h = x
        for name, stage in stages:
            h = stage(h)
            assert torch.equal(h, expected[name]), name
    own = {id(p) for p in encoder.parameters()}
    assert {id(p) for _, s in stages for p in s.parameters()} == own  # the encoder's own modules, all of them


def test_split_stages_small_cnn():
    _check_split(small_encoder(), images(2))


def test_split_stages_resnet18():
    torch.manual_seed(0)
    _check_split(build_encoder("resnet18"), images(2))


def test_split_stages_rejects_unsupported_encoder():
    with pytest.raises(UserError, match="small_cnn"):
        split_stages(build_encoder("mobilenet_v2"))


# ------------------------------------------------------------------------------------------------ shapes, laterals
def test_three_columns_output_shapes_and_structure():
    net = make_net()
    assert net.tasks == ["a", "b", "c"]
    x = images(4)
    for t in net.tasks:
        assert net(x, t).shape == (4, OUT[t])
    c0, c1, c2 = net.columns
    assert len(c0.laterals) == 0 and c0.head_lateral is None
    assert len(c1.laterals) == len(WIDTHS) - 1 and isinstance(c1.head_lateral, LinearLateral)
    assert all(isinstance(m, LateralAdapter) for m in c2.laterals)
    assert c2.laterals[0].reduce.in_channels == 2 * WIDTHS[0]  # reads stage 0 of columns 0 and 1
    assert c2.head_lateral.mlp[0].in_features == 2 * WIDTHS[-1]
    feats = net.features(x, "c")
    assert len(feats) == 3 and list(feats[2]) == ["stage1", "stage2", "stage3", "stage4", "out"]


def test_adapter_channels_and_odd_sizes():
    net = make_net(("a", "b"), adapter_channels=6)
    assert net.columns[1].laterals[0].reduce.out_channels == 6
    assert net.columns[1].head_lateral.mlp[0].out_features == 6
    assert net(images(2, size=37), "b").shape == (2, OUT["b"])  # odd maps: lateral resized to the stage's map


def test_frozen_columns_stay_frozen_through_later_training():
    net = make_net(("a",))
    a = net.columns[0]
    train_steps(net, "a")
    fixed = images(6, seed=5)
    net.eval()
    with torch.no_grad():
        out_a = net(fixed, "a").clone()
    before_a = snapshot(a)
    assert before_a["stages.0.0.1.num_batches_tracked"] > 0  # trained in train mode: stats moved

    net.add_column("b", head(OUT["b"]))
    assert not any(p.requires_grad for p in a.parameters())
    params = train_steps(net, "b", momentum=0.9, weight_decay=0.1)
    assert {id(p) for p in params} == {id(p) for p in net.columns[1].parameters()}
    net.train()
    assert all(not m.training for m in a.modules())
    assert_same(before_a, a)
    before_b = snapshot(net.columns[1])
    assert before_b["stages.0.0.1.num_batches_tracked"] > 0

    net.add_column("c", head(OUT["c"]))
    train_steps(net, "c", momentum=0.9, weight_decay=0.1)
    assert_same(before_a, a)
    assert_same(before_b, net.columns[1])
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(fixed, "a"), out_a)


def test_laterals_carry_earlier_columns():
    x = images(4)
    for lateral in (True, False):
        net = make_net(("a", "b"), lateral=lateral).eval()
        with torch.no_grad():
            before = net(x, "b").clone()
            for p in net.columns[0].parameters():
                p.add_(0.5 * torch.randn_like(p))
            after = net(x, "b")
        assert torch.equal(before, after) is (not lateral)
    net = make_net(("a", "b"))
    net(x, "b").sum().backward()
    alphas = [m.alpha for m in net.columns[1].laterals] + [net.columns[1].head_lateral.alpha]
    assert all(a.requires_grad and a.grad is not None and a.grad.abs() > 0 for a in alphas)
    assert all(p.grad is None for p in net.columns[0].parameters())


def test_only_columns_up_to_the_task_run():
    net = make_net(("a", "b", "c"))
    calls = []
    handles = [net.columns[i].register_forward_hook(lambda *_, i=i: calls.append(i)) for i in range(3)]
    net(images(2), "a")
    assert calls == [0]
    calls.clear()
    net(images(2), "b")
    assert calls == [0, 1]
    for h in handles:
        h.remove()


def test_errors():
    net = make_net(("a", "b"))
    for task in (None, "nope"):
        with pytest.raises(UserError, match="a, b"):
            net(images(2), task)
    with pytest.raises(UserError, match="already"):
        net.add_column("a", head(3))
    with pytest.raises(UserError, match="already used"):
        net.add_column("d", head(3), encoder=_encoder_of(net))
    with pytest.raises(UserError, match="same architecture"):
        net.add_column("d", head(3), encoder=build_encoder("small_cnn", widths=[8, 16, 32, 32]))
    with pytest.raises(UserError, match="encoder_fn"):
        ProgressiveNet().add_column("a", head(3))
    with pytest.raises(UserError, match="pooled"):
        ProgressiveNet(small_encoder).add_column(
            "a", HEADS.get("fpn")(in_dim=32, out_dim=3, feature_info=small_encoder().feature_info)
        )
    with pytest.raises(UserError, match="adapter_channels"):
        ProgressiveNet(adapter_channels=0)
    assert net.tasks == ["a", "b"]  # failed adds change nothing


def _encoder_of(net):
    """A small_cnn whose stages are column 0's modules (reused: must be refused)."""
    enc = small_encoder()
    for name, module in zip(net.columns[0].stage_names, net.columns[0].stages):
        setattr(enc, name, module)
    return enc


def test_column_parameters():
    net = make_net(("a", "b"), lateral=True)
    c0, c1 = net.column_parameters("a"), net.column_parameters("b")
    assert c0["laterals"] == 0 and c1["laterals"] > 0
    for task, counts in (("a", c0), ("b", c1)):
        column = net.columns[net.tasks.index(task)]
        assert counts["total"] == sum(p.numel() for p in column.parameters())
        assert counts["total"] == counts["stages"] + counts["laterals"] + counts["head"]
    assert make_net(("a", "b"), lateral=False).column_parameters("b")["laterals"] == 0


# ------------------------------------------------------------------------------------------------ ColumnView
def test_column_view_state_dict_round_trip():
    net = make_net(("a", "b"))
    view = net.view("b")
    x = images(3)
    view.eval()
    out = view(x)
    assert list(out) == ["b"] and out["b"].shape == (3, OUT["b"])
    other = make_net(("a", "b"), seed=7)
    assert not torch.equal(other.view("b").eval()(x)["b"], out["b"])
    other.view("b").load_state_dict(view.state_dict())
    other.eval()
    assert torch.equal(other(x, "b"), out["b"])
    assert torch.equal(other(x, "a"), net(x, "a"))
    assert list(view.heads) == ["b"] and view.heads["b"] is net.columns[1].head
    with pytest.raises(UserError, match="known tasks"):
        net.view("z")


def test_column_view_trains_with_trainer_and_only_the_new_column_changes():
    net = make_net(("a", "b"))
    view = net.view("b")
    task = build_task("b", type="classification", target="label", num_classes=OUT["b"])
    g = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randn(4, 3, 32, 32, generator=g), "targets": {"b": torch.randint(0, 4, (4,), generator=g)}}
        for _ in range(3)
    ]
    loader = DataLoader(batches, batch_size=None)
    opt = build_optimizer(view, OptimCfg(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01))
    in_opt = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert in_opt == {id(p) for p in net.columns[1].parameters()}
    shared = list(view.shared_parameters())
    assert {id(p) for p in shared} == {id(p) for p in net.columns[1].stages.parameters()}
    assert {id(p) for p in shared} | {id(p) for p in view.task_parameters()} == in_opt
    before_a, before_b = snapshot(net.columns[0]), snapshot(net.columns[1])
    trainer = Trainer(
        view,
        {"b": task},
        {"train": loader, "val": loader},
        opt,
        None,
        epochs=1,
        device=torch.device("cpu"),
        progress=False,
    )
    history = trainer.fit()
    assert "acc" in history[0]["val"]
    assert_same(before_a, net.columns[0])
    after_b = net.columns[1].state_dict()
    assert any(not torch.equal(v, after_b[k]) for k, v in before_b.items())


# ------------------------------------------------------------------------------------------------ resnet
def test_resnet18_two_columns():
    torch.manual_seed(0)
    net = ProgressiveNet(lambda: build_encoder("resnet18"), alpha=0.1)
    net.add_column("a", nn.Linear(512, 3))
    net.add_column("b", nn.Linear(512, 4))
    net.eval()
    with torch.no_grad():
        assert net(images(2), "b").shape == (2, 4)
    assert net.column_parameters("b")["laterals"] > 0
