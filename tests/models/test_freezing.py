"""Freezing means frozen: no gradients, not in the optimizer, BatchNorm statistics unchanged."""

import pytest
import torch
import yaml
from conftest import make_folder, tiny_config
from test_bad_input import refused
from torch import nn

from mtl.config.schema import OptimCfg, SchedCfg, UnfreezeCfg
from mtl.core.errors import UserError
from mtl.engine.optim import build_optimizer, build_scheduler, lr_mult_of, param_groups
from mtl.models.encoders import build_encoder
from mtl.models.freezing import L2SP, apply_freeze, check_unfreeze, frozen_names
from mtl.models.transfer import TransferModel


def resnet_model():
    torch.manual_seed(0)
    enc = build_encoder("resnet18")
    return TransferModel(enc, {"label": nn.Linear(enc.out_dim, 3)})


def optimizer_param_ids(opt):
    return {id(p) for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize(
    "spec, first_trained, last_frozen",
    [
        ("all", None, "layer4.1.bn2.bias"),
        ({"until": "layer3"}, "layer4.0.conv1.weight", "layer3.1.bn2.bias"),
        ({"from": "layer3"}, "conv1.weight", "layer4.1.bn2.bias"),
        ({"train": ["layer4"]}, "layer4.0.conv1.weight", "layer3.1.bn2.bias"),
        (["conv1", "bn1", "layer1"], "layer2.0.conv1.weight", "layer1.1.bn2.bias"),
        ({"freeze": ["layer*.0.*"]}, "conv1.weight", "layer4.0.downsample.1.bias"),
    ],
)
def test_freeze_specs_select_the_right_parameters(spec, first_trained, last_frozen):
    enc = build_encoder("resnet18")
    frozen = set(frozen_names(enc, spec))
    names = [n for n, _ in enc.named_parameters()]
    assert last_frozen in frozen
    if first_trained:
        assert first_trained not in frozen
    else:
        assert frozen == set(names)
    if spec == {"until": "layer3"}:
        assert frozen == {n for n in names if not n.startswith("layer4")}
    if spec == {"from": "layer3"}:
        assert frozen == {n for n in names if n.startswith(("layer3", "layer4"))}


def test_none_freezes_nothing():
    assert frozen_names(build_encoder("resnet18"), "none") == []


@pytest.mark.parametrize("spec", [{"until": "layer9"}, ["nothing"], {"bogus": 1}, "some"])
def test_bad_freeze_specs_are_clear_errors(spec):
    with pytest.raises(UserError, match="model.freeze"):
        frozen_names(build_encoder("resnet18"), spec)


@pytest.mark.parametrize("spec", ["all", {"until": "layer3"}])
def test_frozen_means_frozen(spec):
    model = resnet_model()
    apply_freeze(model.encoder, spec)
    frozen = {n for n in frozen_names(model.encoder, spec)}
    opt = build_optimizer(model, OptimCfg(lr=0.1, momentum=0.9))
    in_opt = optimizer_param_ids(opt)
    enc_params = dict(model.encoder.named_parameters())
    before_params = {n: p.detach().clone() for n, p in enc_params.items()}
    before_bufs = {n: b.clone() for n, b in model.encoder.named_buffers()}

    model.train()
    for _ in range(2):
        out = model(torch.randn(4, 3, 64, 64) * 3 + 1)["label"]
        opt.zero_grad()
        nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
        opt.step()

    for n, p in enc_params.items():
        if n in frozen:
            assert p.grad is None, n
            assert id(p) not in in_opt, n
            assert torch.equal(p, before_params[n]), n
        else:
            assert id(p) in in_opt and p.grad is not None, n
    for n, b in model.encoder.named_buffers():
        module = n.rsplit(".", 1)[0]
        if f"{module}.weight" in frozen:
            assert torch.equal(b, before_bufs[n]), f"BatchNorm buffer {n} changed"
    # a trained BatchNorm still updates its statistics
    if spec != "all":
        assert not torch.equal(
            model.encoder.get_buffer("layer4.1.bn2.running_mean"), before_bufs["layer4.1.bn2.running_mean"]
        )
    assert all(id(p) in in_opt for p in model.heads.parameters())


def test_param_groups_lr_mult_and_no_decay():
    model = resnet_model()
    cfg = OptimCfg(lr=0.1, weight_decay=1e-4, lr_mult={"encoder": 0.1, "encoder.layer4": 0.5})
    groups = param_groups(model.named_parameters(), cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["encoder.conv1.weight"])]["lr"] == pytest.approx(0.01)
    assert by_id[id(named["encoder.layer4.0.conv1.weight"])]["lr"] == pytest.approx(0.05)
    assert by_id[id(named["heads.label.weight"])]["lr"] == pytest.approx(0.1)
    assert by_id[id(named["heads.label.weight"])]["weight_decay"] == 1e-4
    assert by_id[id(named["heads.label.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["encoder.bn1.weight"])]["weight_decay"] == 0.0
    assert lr_mult_of("encoder.layer40.x", {"encoder.layer4": 0.5}) == 1.0


def test_unfreeze_adds_groups_that_follow_the_schedule():
    from mtl.engine.hooks import UnfreezeHook

    model = resnet_model()
    apply_freeze(model.encoder, "all")
    cfg = OptimCfg(lr=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, SchedCfg(name="step", step_size=1, gamma=0.5), epochs=4, steps_per_epoch=2)
    for _ in range(4):  # two epochs
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)

    class T:  # the parts of a Trainer the hook uses
        optimizer, scheduler, epoch = opt, sched, 2

    T.model = model
    UnfreezeHook(model.encoder, [UnfreezeCfg(epoch=2, modules=["layer4"], lr_mult=0.1)], cfg).before_epoch(T)
    assert len(opt.param_groups) == 2
    assert all(p.requires_grad for p in model.encoder.layer4.parameters())
    assert not any(p.requires_grad for p in model.encoder.layer3.parameters())
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.1 * 0.25)
    model.train()
    assert (
        model.encoder.get_submodule("layer4.0.bn1").training
        and not model.encoder.get_submodule("layer3.0.bn1").training
    )
    for _ in range(2):  # one more epoch: both groups halve
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.1 * 0.125)


@pytest.mark.parametrize(
    "name, expect",
    [
        ("step", [1, 1, 1, 0.1, 0.1, 0.1, 0.01]),
        ("multistep", [1, 1, 0.1, 0.1, 0.1, 0.01, 0.01]),
    ],
)
def test_step_schedules_per_epoch(name, expect):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, SchedCfg(name=name, step_size=3, milestones=[2, 5]), epochs=7, steps_per_epoch=5)
    seen = []
    for epoch in range(7):
        seen.append(opt.param_groups[0]["lr"])
        for _ in range(5):
            opt.step()
            sched.step()
    assert seen == pytest.approx(expect)


def test_cosine_onecycle_and_warmup_shapes():
    p = nn.Parameter(torch.zeros(1))

    def lrs(cfg, epochs=10, spe=10):
        opt = torch.optim.SGD([p], lr=1.0)
        sched = build_scheduler(opt, cfg, epochs, spe)
        out = []
        for _ in range(epochs * spe):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cos = lrs(SchedCfg(name="cosine", min_lr_ratio=0.1))
    assert cos[0] == pytest.approx(1.0) and cos[50] == pytest.approx(0.55) and cos[-1] == pytest.approx(0.1, abs=0.01)
    one = lrs(SchedCfg(name="onecycle", pct_start=0.3))
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0) and one.index(max(one)) == 30
    assert one[-1] < 1e-3
    warm = lrs(SchedCfg(name="constant", warmup_epochs=2))
    assert warm[0] == pytest.approx(1 / 20) and warm[19] == pytest.approx(1.0) and warm[50] == 1.0


def test_l2sp_penalty_pulls_toward_start():
    enc = build_encoder("small_cnn")
    reg = L2SP(enc, alpha=2.0)
    assert reg.penalty().item() == 0.0
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    n = sum(p.numel() for p in enc.parameters())
    assert reg.penalty().item() == pytest.approx(0.5 * 2.0 * n)
    apply_freeze(enc, "all")
    assert reg.penalty().item() == 0.0


# ------------------------------------------------------------------------------ frozen means deterministic
FAMILIES = [
    "small_cnn",
    "resnet18",
    "alexnet",
    "vgg16",
    "squeezenet1_0",
    "densenet121",
    "inception_v3",
    "googlenet",
    "shufflenet_v2_x0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_32",
    "regnet_y_400mf",
    "swin_t",
    "swin_v2_t",
    "maxvit_t",
]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _frozen_outputs(model, frozen_modules, x):
    """Every output of the given modules during one forward pass in train mode, in call order."""
    outputs = []

    def record(module, args, out):
        outputs.extend(t.detach().clone() for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t))

    handles = [m.register_forward_hook(record) for m in frozen_modules]
    try:
        with torch.no_grad():
            features = model.encoder(x)
    finally:
        for h in handles:
            h.remove()
    return features, outputs


@pytest.mark.parametrize("name", FAMILIES)
def test_frozen_parts_run_in_eval_mode(name, one_thread):
    """Dropout, stochastic depth and BatchNorm inside what model.freeze freezes do what they do in evaluation,
    also after model.train(): with freeze all, the whole encoder; with a frozen prefix, every frozen module."""
    torch.manual_seed(0)
    encoder = build_encoder(name)
    model = TransferModel(encoder, {"label": nn.Linear(encoder.out_dim, 3)})
    size = max(encoder.min_input_size, 32)
    x = torch.randn(1 if size >= 224 else 2, 3, size, size)  # vit, maxvit: one image is enough for BatchNorm

    apply_freeze(encoder, "all")
    model.train()
    assert model.heads.training and not any(m.training for m in encoder.modules())
    buffers = {k: v.clone() for k, v in encoder.named_buffers()}
    first, second = _frozen_outputs(model, [], x)[0], _frozen_outputs(model, [], x)[0]
    assert all(torch.equal(first[k], second[k]) for k in first)  # the fixed features are fixed
    assert all(torch.equal(v, buffers[k]) for k, v in encoder.named_buffers())

    names = [n for n, _ in encoder.named_parameters()]
    apply_freeze(encoder, {"until": names[len(names) // 3]})  # a frozen prefix, the rest trains
    model.train()
    frozen = [
        m
        for m in encoder.modules()
        if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())
    ]
    trains = [m for m in encoder.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert frozen and trains and not any(m.training for m in frozen) and all(m.training for m in trains)
    buffers = {k: v.clone() for k, v in encoder.named_buffers()}
    _, first = _frozen_outputs(model, frozen, x)
    _, second = _frozen_outputs(model, frozen, x)
    assert first and len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))
    frozen_buffers = {f"{n}.{b}" for n, m in encoder.named_modules() if m in frozen for b, _ in m.named_buffers()}
    assert all(torch.equal(encoder.get_buffer(k), buffers[k]) for k in frozen_buffers)


def test_dropout_of_a_frozen_prefix_is_off_and_the_rest_trains(one_thread):
    encoder = build_encoder("alexnet")  # classifier: dropout, linear, relu, dropout, linear, relu
    model = TransferModel(encoder, {"label": nn.Linear(encoder.out_dim, 3)})
    apply_freeze(encoder, {"train": ["classifier.4"]})
    model.train()
    assert not encoder.get_submodule("classifier.0").training and not encoder.get_submodule("classifier.3").training
    assert encoder.get_submodule("classifier.4").training and encoder.get_submodule("classifier.5").training
    apply_freeze(encoder, {"until": "features"})
    model.train()  # what unfreezing does each time: the modes follow the parameters
    assert not encoder.get_submodule("features.0").training and not encoder.get_submodule("classifier.0").training
    assert encoder.get_submodule("classifier.1").training and encoder.get_submodule("classifier.3").training


# ------------------------------------------------------------------------------ train.unfreeze checked when built
def _unfreeze_config(tmp_path, unfreeze, freeze="all", epochs=2):
    raw = tiny_config(
        make_folder(tmp_path / "data", per_class=(2, 1), size=16),
        tmp_path / "runs",
        **{"train.epochs": epochs, "model.freeze": freeze, "train.unfreeze": unfreeze},
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "unfreeze, freeze, words",
    [
        (
            [{"epoch": 1, "modules": ["stage5"]}],
            "all",
            [
                "train.unfreeze[0].modules pattern 'stage5' matches no encoder parameter",
                "did you mean stage4",
                "top-level modules: stage1, stage2, stage3, stage4",
            ],
        ),
        (
            [{"epoch": 1, "modules": ["stage4"]}],
            {"until": "stage3"},
            [
                "train.unfreeze[0]: 'stage4' already trains at epoch 1 "
                "(model.freeze {'until': 'stage3'} leaves it trainable)"
            ],
        ),
        (
            [{"epoch": 1, "modules": ["stage4"]}, {"epoch": 0, "modules": ["stage*"]}],
            "all",
            ["train.unfreeze[0]: 'stage4' already trains at epoch 1 (train.unfreeze[1] unfreezes it at epoch 0)"],
        ),
        (
            [{"epoch": 2, "modules": ["stage4"]}],
            "all",
            ["train.unfreeze[0]: epoch 2 never starts", "train.epochs is 2", "from 0 to 1"],
        ),
        ([{"epoch": 0, "modules": []}], "all", ["train.unfreeze[0]: modules is empty"]),
    ],
)
def test_bad_unfreeze_events_are_refused_when_the_run_is_built(unfreeze, freeze, words, tmp_path, capsys):
    refused(capsys, ["train", _unfreeze_config(tmp_path, unfreeze, freeze)], *words, runs=tmp_path / "runs")


def test_check_unfreeze_accepts_what_the_hook_does():
    enc = build_encoder("resnet18")
    apply_freeze(enc, {"until": "layer3"})
    check_unfreeze(
        enc,
        [
            UnfreezeCfg(epoch=3, modules=["layer*"]),
            UnfreezeCfg(epoch=1, modules=["layer2"]),
            UnfreezeCfg(epoch=2, modules=["layer3"]),
        ],
        epochs=4,
    )  # layer*: layer1 is still frozen
    with pytest.raises(
        UserError,
        match=r"train.unfreeze\[1\]: 'layer\*' already trains at epoch 3 "
        r"\(train.unfreeze\[0\] unfreezes it at epoch 2\)",
    ):
        check_unfreeze(
            enc,
            [UnfreezeCfg(epoch=2, modules=["layer1", "layer2", "layer3"]), UnfreezeCfg(epoch=3, modules=["layer*"])],
            epochs=4,
        )
