"""Heads (pooled, stage-map and dense) and MTAN attention: shapes, gradients, options, how the model calls them."""

import pytest
import torch
from torch import nn

from mtl.build.model import build_model
from mtl.config.load import build_config
from mtl.core.errors import UserError
from mtl.models.encoders import build_encoder
from mtl.models.heads import DENSE, FEATURES, HEAD_INPUTS, HEADS, POOLED, call_head, head_input
from mtl.models.mtan import MTAN
from mtl.models.progressive import ProgressiveNet
from mtl.models.transfer import TransferModel
from mtl.tasks.base import build_task

torch.set_num_threads(1)

SMALL_OPTS = {"fpn": {"channels": 16}, "aspp": {"channels": 16, "rates": [1, 2, 3]}}


def head(name, encoder, out_dim=5, **options):
    return HEADS.get(name)(
        in_dim=encoder.out_dim, out_dim=out_dim, feature_info=encoder.feature_info, hidden=32, dropout=0.1, **options
    )


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return build_encoder("small_cnn", widths=[8, 16, 32, 64])


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_encoder("resnet18")


@pytest.fixture(scope="module")
def dilated_resnet50():
    torch.manual_seed(0)
    return build_encoder("resnet50", replace_stride_with_dilation=[False, True, True])


@pytest.mark.parametrize("name", ["fpn", "aspp"])
@pytest.mark.parametrize("enc", ["small_cnn", "resnet18"])
def test_dense_heads_shape_and_encoder_gradients(name, enc, request):
    encoder = request.getfixturevalue(enc)
    torch.manual_seed(0)
    h = head(name, encoder, **SMALL_OPTS[name])
    assert head_input(h) == DENSE
    encoder.zero_grad()
    x = torch.randn(2, 3, 64, 64)
    y = h(encoder(x), (64, 64))
    assert y.shape == (2, 5, 64, 64)
    y.square().mean().backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is not None for p in h.parameters())


def test_aspp_on_dilated_resnet50_odd_input(dilated_resnet50):
    info = {i["name"]: i["reduction"] for i in dilated_resnet50.feature_info}
    assert info == {"layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}
    torch.manual_seed(0)
    h = head("aspp", dilated_resnet50, out_dim=3, channels=32, rates=[12, 24, 36]).eval()
    with torch.no_grad():
        features = dilated_resnet50.eval()(torch.randn(1, 3, 65, 65))
        assert features["layer4"].shape[-2:] == (9, 9)
        assert h(features, (65, 65)).shape == (1, 3, 65, 65)
        assert head("fpn", dilated_resnet50, channels=16).eval()(features, (65, 65)).shape == (1, 5, 65, 65)


def test_dense_head_options(small_cnn):
    fpn = head("fpn", small_cnn, stages=["stage3", "stage4"], norm="bn")
    assert fpn.stage_names == ["stage3", "stage4"] and len(fpn.lateral) == 2
    assert any(isinstance(m, nn.BatchNorm2d) for m in fpn.modules())
    assert all(isinstance(m, nn.GroupNorm) for m in head("fpn", small_cnn).modules() if "Norm" in type(m).__name__)
    aspp = head("aspp", small_cnn, stage="stage3", rates=[1, 2])
    assert aspp.stage_name == "stage3"
    # defaults: 256 channels, rates 6/12/18 -> 1x1 + 3 atrous + pooling branches
    default = head("aspp", small_cnn)
    assert default.classifier.in_channels == 256 and len(default.decoder[0].convs) == 5
    assert head("fpn", small_cnn).classifier.in_channels == 128


def test_dense_heads_train_at_batch_size_one(small_cnn):
    h = head("aspp", small_cnn, **SMALL_OPTS["aspp"]).train()
    assert h(small_cnn(torch.randn(1, 3, 64, 64)), (64, 64)).shape == (1, 5, 64, 64)
    # GroupNorm groups keep >= 4 channels, so a 1x1 deepest map (16x16 input) trains at batch size 1
    with torch.no_grad():
        features = small_cnn.eval()(torch.randn(1, 3, 16, 16))
    small_cnn.train()
    assert features["stage4"].shape[-2:] == (1, 1)
    fpn = head("fpn", small_cnn, channels=16).train()
    assert fpn(features, (16, 16)).shape == (1, 5, 16, 16)


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("linear", {"channels": 3}, "it takes bias"),
        ("mlp", {"foo": 1}, "no options"),
        ("fpn", {"chanels": 3}, "channels, norm, stages"),
        ("aspp", {"rate": [1]}, "channels, norm, rates, stage"),
        ("fpn", {"stages": ["nope"]}, "unknown stage"),
        ("fpn", {"norm": "ln"}, "norm must be"),
        ("aspp", {"rates": 3}, "rates must be"),
        ("aspp", {"channels": 0}, "channels must be"),
    ],
)
def test_bad_head_options(small_cnn, name, options, match):
    with pytest.raises(UserError, match=match):
        head(name, small_cnn, **options)


def test_dense_head_needs_feature_info():
    with pytest.raises(UserError, match="feature_info"):
        HEADS.get("fpn")(in_dim=8, out_dim=2, feature_info=None, hidden=0, dropout=0.0)


def test_pooled_heads_unchanged():
    lin = HEADS.get("linear")(in_dim=8, out_dim=3, feature_info=None, hidden=512, dropout=0.0)
    assert head_input(lin) == POOLED and list(lin.state_dict()) == ["0.weight", "0.bias"]
    lin_drop = HEADS.get("linear")(in_dim=8, out_dim=3, dropout=0.2)
    assert list(lin_drop.state_dict()) == ["1.weight", "1.bias"]
    mlp = HEADS.get("mlp")(in_dim=8, out_dim=3, hidden=16)
    assert head_input(mlp) == POOLED and list(mlp.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert isinstance(mlp, nn.Sequential) and mlp[2].p == 0.5
    x = torch.randn(4, 8)
    assert lin(x).shape == mlp(x).shape == (4, 3)
    # a checkpoint of the plain nn.Sequential heads loads as before
    lin.load_state_dict(nn.Sequential(nn.Linear(8, 3)).state_dict())


def test_mtan_structure_and_masks(small_cnn):
    torch.manual_seed(0)
    mtan = MTAN(small_cnn.feature_info, ["a", "b"])
    assert mtan.out_dim == 64 and mtan.feature_info == small_cnn.feature_info
    features = small_cnn(torch.randn(2, 3, 64, 64))
    out = mtan(features)
    assert set(out) == {"a", "b"}
    for task in out:
        assert set(out[task]) == {"stage1", "stage2", "stage3", "stage4", "out"}
        for name, v in features.items():
            if name != "out":
                assert out[task][name].shape == v.shape
        assert out[task]["out"].shape == (2, 64)
    assert not torch.allclose(out["a"]["stage4"], out["b"]["stage4"])
    masks = mtan.masks(features)
    for task in masks:
        for name, m in masks[task].items():
            assert m.shape == features[name].shape
            assert bool(((m > 0) & (m < 1)).all())
            assert torch.allclose(out[task][name], m * features[name])


def test_mtan_stage_subset_passes_others_through(small_cnn):
    mtan = MTAN(small_cnn.feature_info, ["a"], stages=["stage2", "stage3"])
    assert mtan.out_dim == 32
    features = small_cnn(torch.randn(2, 3, 64, 64))
    out = mtan(features)["a"]
    assert out["stage1"] is features["stage1"] and out["stage4"] is features["stage4"]
    assert out["out"].shape == (2, 32)
    with pytest.raises(UserError, match="stage names"):
        MTAN(small_cnn.feature_info, ["a"], stages=["layer9"])


def test_mtan_task_parameters_only_get_their_task_gradient(small_cnn):
    torch.manual_seed(0)
    mtan = MTAN(small_cnn.feature_info, ["a", "b"])
    out = mtan(small_cnn(torch.randn(2, 3, 64, 64)))
    a_params, b_params = list(mtan.task_parameters("a")), list(mtan.task_parameters("b"))
    assert len(a_params) + len(b_params) == len(list(mtan.parameters()))
    assert not {id(p) for p in a_params} & {id(p) for p in b_params}
    out["a"]["out"].sum().backward()
    assert all(p.grad is not None for p in a_params) and sum(p.grad.abs().sum() for p in a_params) > 0
    assert all(p.grad is None for p in b_params)
    with pytest.raises(UserError, match="no task"):
        mtan.task_parameters("c")


def test_mtan_with_heads_trains_a_step(small_cnn):
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", widths=[8, 16, 32, 64])
    mtan = MTAN(encoder.feature_info, ["label", "seg"])
    common = {"in_dim": mtan.out_dim, "feature_info": mtan.feature_info, "hidden": 0, "dropout": 0.0}
    heads = nn.ModuleDict(
        {"label": HEADS.get("linear")(out_dim=3, **common), "seg": HEADS.get("fpn")(out_dim=4, channels=16, **common)}
    )
    params = [*encoder.parameters(), *mtan.parameters(), *heads.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    x, label, seg = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]), torch.randint(0, 4, (4, 64, 64))
    losses = []
    for _ in range(3):
        per_task = mtan(encoder(x))
        loss = nn.functional.cross_entropy(
            heads["label"](per_task["label"]["out"]), label
        ) + nn.functional.cross_entropy(heads["seg"](per_task["seg"], (64, 64)), seg)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_grid_head_keeps_position():
    """Two images with the same content in different columns pool to the same vector under global pooling,
    but to different inputs of the grid head's linear layer."""
    grid = HEADS.get("grid")(
        in_dim=4, out_dim=3, feature_info=[{"name": "s", "channels": 4, "reduction": 1}], bins=[1, 4]
    )
    assert head_input(grid) == FEATURES
    a, b = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
    a[..., :2], b[..., -2:] = 1.0, 1.0  # the same blob, left vs right
    assert torch.equal(a.mean((2, 3)), b.mean((2, 3)))
    assert not torch.allclose(grid({"s": a}), grid({"s": b}))
    assert grid({"s": torch.randn(2, 4, 3, 13)}).shape == (2, 3)


def test_grid_head_defaults_to_the_deepest_stage_and_checks_options(small_cnn):
    encoder = small_cnn
    grid = head("grid", encoder, bins=3)
    assert grid.stage_name == encoder.feature_info[-1]["name"] and grid.pool.output_size == (3, 3)
    assert head("grid", encoder, stage="stage2").stage_name == "stage2"
    for bad, message in [
        ({"bins": [1]}, "bins must be"),
        ({"bins": 0}, "positive integer"),
        ({"rows": 2}, "unknown option"),
        ({"stage": "stage9"}, "unknown stage"),
    ]:
        with pytest.raises(UserError, match=message):
            head("grid", encoder, **bad)


# ---------------------------------------------------------------------------------------------------- the convention
FEATURE_INFO = [{"name": "s1", "channels": 8, "reduction": 2}, {"name": "s2", "channels": 16, "reduction": 4}]


def _features(batch=2, size=32):
    return {
        "s1": torch.randn(batch, 8, size // 2, size // 2),
        "s2": torch.randn(batch, 16, size // 4, size // 4),
        "out": torch.randn(batch, 16),
    }


@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_keeps_the_contract(name):
    """Every registered head, built with the arguments build_model gives, declares how it is called and gives
    (B, out_dim), or (B, out_dim, H, W) when dense, called that way."""
    torch.manual_seed(0)
    h = HEADS.get(name)(in_dim=16, out_dim=5, feature_info=FEATURE_INFO, hidden=8, dropout=0.1)
    kind = head_input(h)
    assert kind in HEAD_INPUTS
    y = call_head(h, kind, _features(), (32, 32))
    assert y.shape == ((2, 5, 32, 32) if kind == DENSE else (2, 5))


class LegacyDense(nn.Module):
    """A plugin head written before ``input``: ``dense = True``."""

    dense = True

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 3, 1)

    def forward(self, features, size):
        return nn.functional.interpolate(self.conv(features["s2"]), size=tuple(size))


class LegacyFeatures(nn.Module):
    """A plugin head written before ``input``: ``takes_features = True``; its submodule is called ``input``."""

    takes_features = True

    def __init__(self):
        super().__init__()
        self.input = nn.Linear(8, 3)

    def forward(self, features):
        return self.input(features["s1"].mean((2, 3)))


class LegacyBoth(LegacyDense):
    takes_features = True  # dense wins, as it did before heads declared input


class BadInput(nn.Linear):
    input = "Dense"


def test_heads_without_input_are_read_the_legacy_way():
    assert head_input(LegacyDense()) == head_input(LegacyBoth()) == DENSE
    assert head_input(LegacyFeatures()) == FEATURES  # the submodule named input is not a declaration
    assert head_input(nn.Linear(16, 3)) == POOLED
    named_input = nn.Sequential()
    named_input.input = nn.Linear(16, 3)
    assert head_input(named_input) == POOLED
    declared = LegacyDense()
    declared.input = POOLED  # a declaration (here on the instance) wins over the legacy attributes
    assert head_input(declared) == POOLED


def test_model_calls_each_head_as_it_declares():
    """TransferModel reads every head's input once and calls built-in and legacy heads as before."""

    class Features(nn.Module):
        def forward(self, x):
            return fixed

    torch.manual_seed(0)
    fixed = _features(batch=2, size=32)
    heads = {
        "pooled": HEADS.get("mlp")(in_dim=16, out_dim=4, hidden=8),
        "plain": nn.Linear(16, 2),
        "grid": HEADS.get("grid")(in_dim=16, out_dim=3, feature_info=FEATURE_INFO),
        "fpn": HEADS.get("fpn")(in_dim=16, out_dim=5, feature_info=FEATURE_INFO, channels=8),
        "legacy_dense": LegacyDense(),
        "legacy_features": LegacyFeatures(),
    }
    model = TransferModel(Features(), heads).eval()
    assert model.head_inputs == {
        "pooled": POOLED,
        "plain": POOLED,
        "grid": FEATURES,
        "fpn": DENSE,
        "legacy_dense": DENSE,
        "legacy_features": FEATURES,
    }
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
        assert torch.equal(out["pooled"], heads["pooled"](fixed["out"]))
        assert torch.equal(out["plain"], heads["plain"](fixed["out"]))
        assert torch.equal(out["grid"], heads["grid"](fixed))
        assert torch.equal(out["fpn"], heads["fpn"](fixed, (32, 32)))
        assert torch.equal(out["legacy_dense"], heads["legacy_dense"](fixed, (32, 32)))
        assert torch.equal(out["legacy_features"], heads["legacy_features"](fixed))
    assert list(model.state_dict()) == [f"heads.{t}.{k}" for t, h in heads.items() for k in h.state_dict()]


def test_an_invalid_input_is_refused_when_the_model_is_built(monkeypatch):
    message = r"head BadInput: input must be 'pooled', 'features' or 'dense', got 'Dense'; set the class attribute"
    with pytest.raises(UserError, match=message):
        head_input(BadInput(16, 3))
    with pytest.raises(UserError, match=message):
        TransferModel(build_encoder("small_cnn", widths=[8, 16]), {"label": BadInput(16, 3)})
    monkeypatch.setitem(HEADS._entries, "bad_input", lambda *, in_dim, out_dim, **kwargs: BadInput(in_dim, out_dim))
    cfg = build_config(
        {
            "model": {"encoder": "small_cnn", "encoder_options": {"widths": [8, 16]}},
            "tasks": {"label": {"num_classes": 3, "head": {"name": "bad_input"}}},
        }
    )
    task = build_task("label", type="classification", target="label", num_classes=3, weight=1.0, classes=[])
    with pytest.raises(UserError, match="tasks.label.head: " + message):
        build_model(cfg, build_encoder("small_cnn", widths=[8, 16]), {"label": task})
    with pytest.raises(UserError, match=message):
        ProgressiveNet().add_column("label", BadInput(16, 3), build_encoder("small_cnn", widths=[8, 16]))


def test_a_plugin_heads_unknown_option_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    import yaml
    from conftest import make_folder, tiny_config

    from mtl.cli import main

    def cosine_head(*, in_dim, out_dim, feature_info=None, hidden=0, dropout=0.0, scale=10.0):
        return nn.Linear(in_dim, out_dim)

    monkeypatch.setitem(HEADS._entries, "cos", cosine_head)
    cfg = tiny_config(make_folder(tmp_path / "data"), tmp_path / "runs", **{"train.epochs": 1})
    cfg["tasks"] = {"label": {"head": {"name": "cos", "options": {"scale": 2.0, "bogus": 1}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mtl: error: tasks.label.head: head 'cos': unknown option(s) bogus; it takes scale"]
    assert not (tmp_path / "runs").exists()
    cfg["tasks"]["label"]["head"]["options"] = {"scale": 2.0}  # the options it names still reach it
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
