"""Encoder contract: stage maps + pooled "out", honest attributes, torchvision parameter names."""

import copy
import functools
import re

import pytest
import torch
import torchvision
from torch import nn

from mtl.build.model import build_model
from mtl.config.load import build_config
from mtl.core.errors import UserError
from mtl.models.encoders import (
    ENCODERS,
    build_encoder,
    input_size_problem,
    stage_nodes,
    tokens_to_map,
    torchvision_names,
)
from mtl.models.weights import fit_state_dict
from mtl.tasks.base import build_task

# (model, a torchvision parameter name the encoder keeps, one it must drop)
TORCHVISION = [
    ("resnet18", "layer4.0.conv1.weight", "fc.weight"),
    ("resnet34", "layer4.2.conv2.weight", "fc.weight"),
    ("resnet50", "layer4.2.conv3.weight", "fc.weight"),
    ("alexnet", "classifier.4.weight", "classifier.6.weight"),
    ("vgg16", "classifier.3.weight", "classifier.6.weight"),
    ("squeezenet1_0", "features.12.expand3x3.weight", "classifier.1.weight"),
    ("densenet161", "features.denseblock4.denselayer24.conv2.weight", "classifier.weight"),
    ("inception_v3", "Mixed_7c.branch_pool.conv.weight", "AuxLogits.fc.weight"),
    ("googlenet", "inception5b.branch4.1.conv.weight", "aux1.fc1.weight"),
    ("shufflenet_v2_x1_0", "conv5.0.weight", "fc.weight"),
    ("mobilenet_v2", "features.18.1.weight", "classifier.1.weight"),
    ("resnext50_32x4d", "layer3.5.conv2.weight", "fc.weight"),
    ("wide_resnet50_2", "layer1.0.downsample.0.weight", "fc.weight"),
    ("mnasnet1_0", "layers.14.weight", "classifier.1.weight"),
    ("mobilenet_v3_small", "classifier.0.weight", "classifier.3.weight"),
    ("mobilenet_v3_large", "features.16.0.weight", "classifier.3.weight"),
    ("efficientnet_b0", "features.8.0.weight", "classifier.1.weight"),
    ("convnext_tiny", "features.7.2.layer_scale", "classifier.2.weight"),
    ("vit_b_16", "encoder.layers.encoder_layer_11.mlp.0.weight", "heads.head.weight"),
    ("regnet_y_400mf", "trunk_output.block4.block4-0.proj.0.weight", "fc.weight"),  # stages found by shape
]
INPUT_SIZE = {"inception_v3": 299, "vit_b_16": 224}  # inception pads little, so its maps are far from H/r when small


pytestmark = pytest.mark.usefixtures("one_thread")


def _torchvision_keys(name: str, removed: tuple[str, ...]) -> set[str]:
    aux = {"aux_logits": True, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    with torch.device("cpu" if name.startswith("regnet") else "meta"):  # regnet's builder computes with tensors
        model = torchvision.models.get_model(name, weights=None, **aux)
    return {k for k in model.state_dict() if not k.startswith(tuple(f"{m}." for m in removed))}


def _check_contract(encoder: nn.Module, size: int) -> None:
    assert isinstance(encoder.out_dim, int) and isinstance(encoder.min_input_size, int) and encoder.name
    assert size >= encoder.min_input_size
    info = encoder.feature_info
    assert info and all(set(f) == {"name", "channels", "reduction"} for f in info)
    reductions = [f["reduction"] for f in info]
    assert reductions == sorted(reductions)

    features = encoder(torch.randn(2, 3, size, size))
    assert list(features) == [f["name"] for f in info] + ["out"]
    assert features["out"].shape == (2, encoder.out_dim)
    for f in info:
        fmap = features[f["name"]]
        assert fmap.dim() == 4 and fmap.shape[:2] == (2, f["channels"]), f["name"]
        expected = size / f["reduction"]
        for side in fmap.shape[2:]:
            assert abs(side - expected) <= max(1.0, 0.25 * expected), (f["name"], tuple(fmap.shape), f["reduction"])
    assert nn.Linear(encoder.out_dim, 5)(features["out"]).shape == (2, 5)

    encoder.eval()  # min_input_size must be honest: it runs and every map is at least 1x1
    with torch.no_grad():
        smallest = encoder(torch.randn(1, 3, encoder.min_input_size, encoder.min_input_size))
    assert all(v.shape[-1] >= 1 and v.shape[-2] >= 1 for k, v in smallest.items() if k != "out")


@pytest.mark.parametrize("name,kept,dropped", TORCHVISION, ids=[t[0] for t in TORCHVISION])
def test_torchvision_encoder_contract(name: str, kept: str, dropped: str) -> None:
    encoder = build_encoder(name)
    assert encoder.name == name
    _check_contract(encoder, INPUT_SIZE.get(name, max(64, encoder.min_input_size)))
    keys = set(encoder.state_dict())
    assert kept in keys and dropped not in keys
    assert keys == _torchvision_keys(name, encoder.removed_modules)  # exactly torchvision's names, minus the head


def test_small_cnn_contract() -> None:
    encoder = build_encoder("small_cnn")
    assert "small_cnn" in ENCODERS.names()
    _check_contract(encoder, 32)
    assert [f["reduction"] for f in encoder.feature_info] == [2, 4, 8, 16]
    assert "stage4.0.0.weight" in dict(encoder.named_parameters())


def test_small_cnn_options_and_backward() -> None:
    encoder = build_encoder("small_cnn", widths=(8, 16), blocks=1)
    assert encoder.out_dim == 16 and encoder.min_input_size == 4 and len(encoder.feature_info) == 2
    _check_contract(encoder, 48)
    encoder.train()
    encoder(torch.randn(4, 3, 32, 32))["out"].sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    with pytest.raises(UserError, match="widths"):
        build_encoder("small_cnn", widths=())
    with pytest.raises(UserError, match="small_cnn"):
        build_encoder("small_cnn", width=(8, 16))


def test_stage_nodes_table_and_fallback() -> None:
    assert stage_nodes("resnet101") == ("layer1", "layer2", "layer3", "layer4")
    assert stage_nodes("vit_l_32") == ("conv_proj", "encoder")
    assert stage_nodes("regnet_y_400mf") is None  # found by shape instead


def test_train_eval_and_deepcopy_keep_state() -> None:
    encoder = build_encoder("mobilenet_v3_small")
    x = torch.randn(2, 3, 64, 64)
    encoder.train()
    assert not torch.equal(encoder(x)["out"], encoder(x)["out"])  # dropout in the kept classifier part
    encoder.eval()
    reference = encoder(x)["out"]
    assert torch.equal(reference, encoder(x)["out"])

    encoder.get_submodule("features.0.1").train()  # mixed modes, as freezing might leave them
    info = encoder.feature_info  # dry run must not disturb the modes
    assert not encoder.training and encoder.get_submodule("features.0.1").training
    assert not encoder.get_submodule("features.1").training

    copied = copy.deepcopy(encoder)
    assert (copied.name, copied.out_dim, copied.min_input_size, copied.feature_info) == (
        encoder.name,
        encoder.out_dim,
        encoder.min_input_size,
        info,
    )
    assert not copied.training and copied.get_submodule("features.0.1").training
    assert not copied.get_submodule("features.1").training
    encoder.get_submodule("features.0.1").eval()
    copied.get_submodule("features.0.1").eval()
    assert torch.equal(copied(x)["out"], reference)
    copied.train()
    assert copied.get_submodule("features.1").training


def test_tokens_to_map() -> None:
    tokens = torch.arange(2 * 7 * 3).reshape(2, 7, 3)  # class token + a 2x3 grid of 3 channels
    fmap = tokens_to_map(tokens, torch.empty(2, 5, 2, 3))
    assert fmap.shape == (2, 3, 2, 3)
    assert torch.equal(fmap[1, :, 1, 2], tokens[1, 1 + 1 * 3 + 2])


def test_unknown_encoder_and_bad_kwargs() -> None:
    with pytest.raises(UserError, match="resnet18"):
        build_encoder("resnet81")
    with pytest.raises(UserError, match="resnet18"):
        build_encoder("resnet18", no_such_option=1)


@functools.lru_cache(maxsize=None)
def _on_meta(name: str) -> tuple[nn.Module, nn.Module]:
    """(mtl encoder, torchvision model) built on the meta device: architectures, names and shapes, no compute."""
    with torch.device("meta"):
        return build_encoder(name), torchvision.models.get_model(name, weights=None)


def test_maxvit_loads_torchvision_state_dicts_and_has_its_size() -> None:
    encoder, tv = _on_meta("maxvit_t")
    state = tv.state_dict()
    own = encoder.state_dict()
    assert set(own) == set(state) - {"classifier.5.weight"}  # the buffers keep their names (no _tensor_constant*)
    assert sum(k.endswith("relative_position_index") for k in own) == 22
    fit_state_dict(encoder, state, source="torchvision", model_name="maxvit_t")  # strict: keys and shapes
    cfg = build_config({"model": {"encoder": "maxvit_t"}, "tasks": {"label": {"num_classes": 1000}}})
    task = build_task("label", type="classification", target="label", num_classes=1000, weight=1.0, classes=[])
    model = build_model(cfg, encoder, {"label": task})
    head = model.heads["label"][-1]
    assert head.bias is None and head.weight.shape == state["classifier.5.weight"].shape  # bias-free, as torchvision's
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tv.parameters()) == 30_919_624


def test_maxvit_takes_exactly_the_size_it_is_built_for() -> None:
    encoder, _ = _on_meta("maxvit_t")
    assert encoder.fixed_input_size == (224, 224) and encoder.min_input_size == 224
    assert input_size_problem(encoder, 224, 224) is None
    for size in (64, 256, 448):  # its attention grids are fixed when it is built
        assert input_size_problem(encoder, size, size) == "takes only 224x224 images"


# One torchvision model per family (its smallest): building all 80 (each traced twice by torch.fx) takes minutes on
# two cores. test_every_torchvision_family_is_checked fails when torchvision brings a family missing here.
FAMILY_MEMBERS = (
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "resnet18",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "swin_t",
    "swin_v2_t",
    "vgg11_bn",
    "vit_b_32",
    "wide_resnet50_2",
)
ON_CPU = ("regnet_x_400mf", "regnet_y_400mf")  # torchvision's regnet builders compute with tensors: no meta device


def _family(name: str) -> str:
    return re.match(r"[a-z]+(?:_v\d)?", name).group()


def test_every_torchvision_family_is_checked() -> None:
    assert set(FAMILY_MEMBERS) <= set(torchvision_names())
    assert {_family(n) for n in torchvision_names()} == {_family(n) for n in FAMILY_MEMBERS}


@pytest.mark.parametrize("name", ENCODERS.names() + list(FAMILY_MEMBERS))
def test_encoder_keeps_the_contract(name: str) -> None:
    """Every registered encoder and one torchvision model per family, built with weights=None: honest declared
    attributes, and a batch of one at the smallest size it accepts gives {stage: (1, channels, h, w), ...,
    "out": (1, out_dim)}. Registered encoders and ON_CPU compute on the CPU; the others are built and run on the
    meta device (shapes, no compute)."""
    device = "cpu" if name in ENCODERS or name in ON_CPU else "meta"
    with torch.device(device):
        encoder = build_encoder(name, weights=None)
    assert isinstance(encoder.out_dim, int) and encoder.out_dim > 0
    info = encoder.feature_info  # may be empty: stage maps are optional (maxvit_t has none)
    assert isinstance(info, list) and all(set(f) == {"name", "channels", "reduction"} for f in info)
    names = [f["name"] for f in info]
    assert len(set(names)) == len(names) and "out" not in names
    assert all(isinstance(f["channels"], int) and f["channels"] > 0 for f in info)
    fixed = getattr(encoder, "fixed_input_size", None)
    assert fixed is None or (len(fixed) == 2 and all(isinstance(side, int) for side in fixed))
    assert isinstance(encoder.min_input_size, int) and encoder.min_input_size >= 1
    size = tuple(fixed) if fixed is not None else (encoder.min_input_size,) * 2
    assert input_size_problem(encoder, *size) is None

    with torch.device(device), torch.no_grad():
        features = encoder.eval()(torch.randn(1, 3, *size))
    assert isinstance(features, dict)
    assert features["out"].shape == (1, encoder.out_dim)
    for f in info:
        assert f["name"] in features, f["name"]
        fmap = features[f["name"]]
        assert fmap.dim() == 4 and fmap.shape[:2] == (1, f["channels"]), (f["name"], tuple(fmap.shape))
