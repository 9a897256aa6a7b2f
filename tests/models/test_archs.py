"""Multitask architectures (model.arch): each paper's equation against a hand computation from its parts, the
declared shared / task-owned parameters against autograd, stage chains against the encoders, clean refusals."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mtl.core.errors import UserError
from mtl.models.architectures import ARCHS
from mtl.models.encoders import build_encoder
from mtl.models.experts import smooth_step
from mtl.models.stages import run_chain, stage_chain

TASKS = ["a", "b", "c"]
SIZE = (3, 8, 8)


def _encoder():
    return build_encoder("small_cnn", widths=[4, 6], blocks=1)


def _build(name, **options):
    torch.manual_seed(0)
    return ARCHS.get(name)(_encoder(), _encoder, TASKS, SIZE, **options).eval()


def _x(n=2):
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(1))


def _gate(linear, x):
    return torch.softmax(linear(x.flatten(1)), -1)


def test_mmoe_is_the_gate_weighted_sum_of_its_experts():
    arch, x = _build("mmoe", num_experts=3), _x()
    features = arch.split(arch(x))
    experts = [e(x) for e in arch.shared]
    for t in TASKS:
        g = _gate(arch.gates[t], x)
        for key in ("stage1", "stage2", "out"):
            want = sum(g[:, k].reshape(-1, *[1] * (experts[k][key].dim() - 1)) * experts[k][key] for k in range(3))
            torch.testing.assert_close(features[t][key], want)


def test_cgc_mixes_each_task_own_experts_with_the_shared_ones():
    arch, x = _build("cgc", shared_experts=2, task_experts=1), _x()
    features = arch.split(arch(x))
    shared = [e(x)["out"] for e in arch.shared]
    for t in TASKS:
        candidates = [arch.task_experts[t][0](x)["out"]] + shared  # own experts first, as in S^k(x)
        g = _gate(arch.gates[t], x)
        torch.testing.assert_close(features[t]["out"], sum(g[:, [k]] * c for k, c in enumerate(candidates)))


def test_smooth_step_is_the_papers_piecewise_cubic():
    gamma = 2.0
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.3, 1.0, 7.0], dtype=torch.float64)
    want = [0.0, 0.0, -2 / 8 * (-0.125) + 3 / 4 * (-0.5) + 0.5, 0.5, -2 / 8 * 0.027 + 3 / 4 * 0.3 + 0.5, 1.0, 1.0]
    torch.testing.assert_close(smooth_step(t, gamma), torch.tensor(want, dtype=torch.float64))


def test_dselect_k_weights_match_a_brute_force_over_expert_codes():
    arch, x = _build("dselect_k", num_experts=4, k=2, gamma=1.0), _x()
    with torch.no_grad():  # logits far enough from 0 to make some bits exact, others in the cubic
        arch.z["a"].weight.normal_(0, 0.05)
        arch.z["a"].bias.copy_(torch.tensor([2.0, -0.1, 0.2, -3.0]))
    q = arch.expert_weights("a", x).detach()
    with torch.no_grad():
        z = arch.z["a"](x.flatten(1)).reshape(2, 2, 2)  # (B, k, m)
        alpha = torch.softmax(arch.w["a"](x.flatten(1)), -1)
    for b in range(2):
        for i in range(4):
            bits = [(i >> 1) & 1, i & 1]  # expert i's code, most significant bit first
            r = [
                math.prod(
                    float(smooth_step(z[b, j, m], 1.0)) if bits[m] else 1 - float(smooth_step(z[b, j, m], 1.0))
                    for m in range(2)
                )
                for j in range(2)
            ]
            assert float(q[b, i]) == pytest.approx(sum(float(alpha[b, j]) * r[j] for j in range(2)), abs=1e-6)
    torch.testing.assert_close(q.sum(-1), torch.ones(2))  # 4 experts: the codes cover every selection
    features = arch.split(arch(x))
    experts = [e(x)["out"] for e in arch.shared]
    torch.testing.assert_close(features["a"]["out"], sum(q[:, [i]] * experts[i] for i in range(4)))


def test_ple_streams_follow_the_papers_levels():
    arch, x = _build("ple", shared_experts=1, task_experts=1), _x()
    features = arch.split(arch(x))
    streams, shared = {t: x for t in TASKS}, x
    for j in range(2):
        own = {t: arch.task_experts[j][t][0](streams[t]) for t in TASKS}
        common = arch.shared_experts[j][0](shared)
        new = {}
        for t in TASKS:
            g = _gate(arch.task_gates[j][t], streams[t])
            new[t] = g[:, 0, None, None, None] * own[t] + g[:, 1, None, None, None] * common
        if j == 0:
            g = _gate(arch.shared_gates[0], shared)
            everyone = [own[t] for t in TASKS] + [common]
            shared = sum(g[:, k, None, None, None] * e for k, e in enumerate(everyone))
        streams = new
    for t in TASKS:
        torch.testing.assert_close(features[t]["stage2"], streams[t])
        torch.testing.assert_close(features[t]["out"], streams[t].mean((-2, -1)))


def test_cross_stitch_mixes_columns_per_channel():
    arch, x = _build("cross_stitch", alpha_same=0.9), _x()
    torch.testing.assert_close(arch.stitch[0][0], torch.full((3, 3), 0.05) + 0.85 * torch.eye(3))
    with torch.no_grad():
        arch.stitch[0].normal_()
        arch.stitch[1].normal_()
    features = arch.split(arch(x))
    maps = [x] * 3
    for j, name in enumerate(["stage1", "stage2"]):
        maps = [arch.columns[t][j](maps[t]) for t in range(3)]
        alpha = arch.stitch[j]  # (C, T, T)
        maps = [sum(alpha[:, t, s, None, None] * maps[s] for s in range(3)) for t in range(3)]
        for t, task in enumerate(TASKS):
            torch.testing.assert_close(features[task][name], maps[t])


def test_ltb_evaluates_the_argmax_tree_and_samples_one_hot_parents_in_training():
    arch, x = _build("ltb"), _x()
    with torch.no_grad():
        arch.branch_logits.copy_(torch.tensor([[[0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]]]))
    assert arch.parents() == [[1, 1, 0]]
    features = arch.split(arch(x))
    first = [arch.columns[t][0](x) for t in range(3)]
    for t, parent in enumerate([1, 1, 0]):
        torch.testing.assert_close(features[TASKS[t]]["stage2"], arch.columns[t][1](first[parent]))
    arch.train()
    d = arch.choices()
    assert set(d.detach().flatten().tolist()) <= {0.0, 1.0} and d.detach().sum(-1).eq(1).all()
    (d * torch.randn_like(d)).sum().backward()  # straight-through: the logits get a gradient
    assert arch.branch_logits.grad is not None and arch.branch_logits.grad.abs().sum() > 0
    # the draws are a function of the seed and the draw count, which a checkpoint keeps
    other = _build("ltb").train()
    other.load_state_dict(arch.state_dict())
    torch.testing.assert_close(other.choices(), arch.choices())


@pytest.mark.parametrize("name", ARCHS.names())
def test_declared_task_parameters_reach_only_their_task(name):
    arch = _build(name).train()
    owned = list(arch.task_parameters())
    shared = list(arch.shared_parameters())
    assert {id(p) for p in owned}.isdisjoint(id(p) for p in shared)
    assert len(owned) + len(shared) == len(list(arch.parameters()))
    features = arch.split(arch(_x(4)))
    reached = []
    for t in TASKS if owned else ():
        grads = torch.autograd.grad(features[t]["out"].square().sum(), owned, retain_graph=True, allow_unused=True)
        reached.append([g is not None and g.abs().sum() > 0 for g in grads])
    for i in range(len(owned)):
        assert sum(r[i] for r in reached) <= 1, f"{name}: a task-owned parameter reaches several tasks"
    if arch.representation is not None:  # every task's features come from the representation's tensors
        rep = {k: v.detach().requires_grad_(v.requires_grad) for k, v in arch(_x(4)).items()}
        split = arch.split(rep)
        for t in TASKS:
            used = [v for v in rep.values() if v.requires_grad]
            grads = torch.autograd.grad(split[t]["out"].sum(), used, allow_unused=True, retain_graph=True)
            assert any(g is not None for g in grads)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("mmoe", {"num_experts": 0}, "positive integer"),
        ("dselect_k", {"num_experts": 3}, "power of 2"),
        ("dselect_k", {"gamma": -1}, "positive number"),
        ("cross_stitch", {"alpha_same": 2}, r"\[0, 1\]"),
        ("ltb", {"tau_decay": 0}, r"\(0, 1\]"),
    ],
)
def test_bad_arch_options(name, options, message):
    with pytest.raises(UserError, match=message):
        _build(name, **options)


def test_stage_chains_reproduce_the_encoders_stage_maps_and_refuse_others():
    encoder = build_encoder("resnet18")
    encoder.get_submodule("layer1.0.conv1").weight.requires_grad_(False)
    chain = stage_chain(encoder, "ple")
    assert not chain[0][4][0].conv1.weight.requires_grad  # frozen flags copied by name
    x = torch.randn(1, 3, 32, 32)
    encoder.eval(), chain.eval()
    with torch.no_grad():
        want = [v for k, v in encoder(x).items() if k != "out"]
        for a, b in zip(want, run_chain(chain, x)):
            torch.testing.assert_close(a, b)
    with pytest.raises(UserError, match="supports small_cnn"):  # refused by name, before anything is built
        stage_chain(SimpleNamespace(name="vit_b_16"), "ltb")


def test_parameters_and_modes_of_copies_follow_the_config_freeze():
    encoder = _encoder()
    encoder.stage1.requires_grad_(False)

    def make():
        other = _encoder()
        other.stage1.requires_grad_(False)
        return other

    arch = ARCHS.get("cross_stitch")(encoder, make, TASKS, SIZE)
    for column in arch.columns:
        assert not any(p.requires_grad for p in column[0].parameters())
        assert all(p.requires_grad for p in column[1].parameters())
    assert isinstance(arch.columns[0][0], nn.Sequential)
