"""Layer-wise lr decay: every encoder parameter's depth follows the forward order; the scales BEiT defines reach the
optimizer, compose with lr_mult, no-decay groups, unfreezing and the schedule."""

import pytest
import torch
import torchvision
from conftest import make_folder, tiny_config
from test_bad_input import refused
from torch import nn

from mtl.config.schema import OptimCfg, SchedCfg, UnfreezeCfg
from mtl.core.errors import UserError
from mtl.engine.optim import build_optimizer, build_scheduler
from mtl.models.encoders import _AUX_HEADS, _drop_classifier, build_encoder
from mtl.models.freezing import apply_freeze
from mtl.models.layer_depth import encoder_scales, layer_depths, model_scales
from mtl.models.transfer import TransferModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(name):
    """A small model of family ``name`` with torchvision's parameter names; None: the named model itself."""
    M = torchvision.models
    if name == "densenet121":
        return M.DenseNet(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8)
    if name == "efficientnet_v2_s":
        setting, last = M.efficientnet._efficientnet_conf("efficientnet_v2_s")
        for s in setting:
            s.num_layers = 1
        return M.EfficientNet(setting, dropout=0.0, last_channel=last)
    if name == "convnext_tiny":
        C = M.convnext.CNBlockConfig
        return M.ConvNeXt([C(8, 16, 2), C(16, 16, 1), C(16, 16, 1), C(16, None, 2)])
    if name == "vit_b_16":
        return M.VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=1, hidden_dim=8, mlp_dim=8)
    if name == "swin_t":
        return M.SwinTransformer([4, 4], 8, [2, 1, 1, 2], [1, 1, 1, 1], [2, 2])
    if name == "maxvit_t":
        return M.MaxVit((64, 64), 8, 2, [8, 8, 8, 8], [1, 2, 1, 1], head_dim=4, stochastic_depth_prob=0.0)
    return None


# one model of each family: small builds at 32 pixels (inception_v3: its smallest input, 75), the big classifiers
# of vgg and alexnet on the meta device
FAMILIES = [
    ("resnet18", 32),
    ("vgg11_bn", "meta"),
    ("alexnet", "meta"),
    ("squeezenet1_1", 32),
    ("densenet121", 32),
    ("mobilenet_v2", 32),
    ("mobilenet_v3_small", 32),
    ("efficientnet_b0", 32),
    ("efficientnet_v2_s", 32),
    ("mnasnet0_5", 32),
    ("regnet_y_400mf", 32),
    ("convnext_tiny", 32),
    ("shufflenet_v2_x0_5", 32),
    ("googlenet", 32),
    ("inception_v3", 75),
    ("vit_b_16", 32),
    ("swin_t", 32),
    ("maxvit_t", 64),
]


def _forward_depths(model: nn.Module, depths: dict, x: torch.Tensor) -> list:
    """The depths of the parameters in the order the forward pass calls the modules that own them (an order
    independent of the registration order the depths are numbered in)."""
    by_id = {id(p): depths[n] for n, p in model.named_parameters()}
    seen = []

    def record(module, args):
        seen.extend(by_id[id(p)] for p in module.parameters(recurse=False))

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_pre_hook(record) for m in owners]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name, side", FAMILIES)
def test_depths_follow_the_forward_order_and_cover_every_parameter(name, side):
    device = "meta" if side == "meta" else "cpu"
    kwargs = {"aux_logits": False, "init_weights": False} if name in _AUX_HEADS else {}
    with torch.device(device):
        model = _tiny(name) or torchvision.models.get_model(name, weights=None, **kwargs)
    _drop_classifier(model, name)  # the encoder's parameters: torchvision's, less the classifier layer
    params = list(model.named_parameters())
    depths, last = layer_depths(name, params)
    assert set(depths) == {n for n, _ in params}
    assert last >= 3 and set(depths.values()) >= set(range(last + 1))  # a stem and every block 1..L
    size = 224 if device == "meta" else side
    order = _forward_depths(model, depths, torch.zeros(1, 3, size, size, device=device))
    assert order == sorted(order)
    assert order[0] == 0


def test_small_cnn_depths_and_the_beit_scales():
    enc = build_encoder("small_cnn", widths=[4, 8, 8], blocks=2)
    depths, last = layer_depths("small_cnn", list(enc.named_parameters()))
    assert last == 5  # 3 stages x 2 conv blocks, the first one the stem
    assert {n.rsplit(".", 2)[0] for n, d in depths.items() if d == 0} == {"stage1.0"}
    assert depths["stage3.1.0.weight"] == last
    scales = encoder_scales(enc, 0.5)
    params = dict(enc.named_parameters())
    assert scales[id(params["stage1.0.0.weight"])] == 0.5**6  # stem: decay ** (L + 1)
    assert scales[id(params["stage2.0.0.weight"])] == 0.5**4  # block 2
    assert scales[id(params["stage3.1.0.weight"])] == 0.5  # last block: decay


def test_vit_follows_beit_stem_blocks_and_final_norm():
    with torch.device("meta"):
        vit = torchvision.models.vit_b_16()
    depths, last = layer_depths("vit_b_16", list(vit.named_parameters()))
    assert last == 12
    assert [depths[n] for n in ("class_token", "conv_proj.weight", "encoder.pos_embedding")] == [0, 0, 0]
    assert depths["encoder.layers.encoder_layer_0.ln_1.weight"] == 1
    assert depths["encoder.layers.encoder_layer_11.mlp.3.bias"] == 12
    assert depths["encoder.ln.weight"] == 13  # BEiT: what follows the blocks takes the heads' scale


def test_downsampling_between_blocks_starts_the_next_stage():
    with torch.device("meta"):
        swin = torchvision.models.swin_t()
    depths, _ = layer_depths("swin_t", list(swin.named_parameters()))
    assert depths["features.2.reduction.weight"] == depths["features.3.0.norm1.weight"]
    assert depths["features.1.1.norm1.weight"] + 1 == depths["features.2.norm.weight"]


def test_vgg_bn_norm_joins_its_conv():
    with torch.device("meta"):
        vgg = torchvision.models.vgg11_bn()
    depths, _ = layer_depths("vgg11_bn", list(vgg.named_parameters()))
    assert depths["features.0.weight"] == depths["features.1.bias"] == 0
    assert depths["features.4.weight"] == depths["features.5.weight"] == 1
    assert depths["features.8.weight"] == 2


def _p(module, name):
    return module.get_parameter(name)


def resnet_model():
    torch.manual_seed(0)
    enc = build_encoder("resnet18")
    return TransferModel(enc, {"label": nn.Linear(enc.out_dim, 3)})


def _lrs(opt):
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


def test_optimizer_lrs_compose_layer_scale_lr_mult_and_no_decay_groups():
    model = resnet_model()
    cfg = OptimCfg(lr=0.1, weight_decay=1e-4, layer_decay=0.5, lr_mult={"encoder.layer4": 0.1})
    opt = build_optimizer(model, cfg, model_scales(model, 0.5))
    lrs = _lrs(opt)
    enc = model.encoder
    assert lrs[id(_p(enc, "conv1.weight"))] == pytest.approx(0.1 * 0.5**9)  # stem, L = 8 blocks
    assert lrs[id(_p(enc, "bn1.bias"))] == pytest.approx(0.1 * 0.5**9)
    assert lrs[id(_p(enc, "layer1.0.conv1.weight"))] == pytest.approx(0.1 * 0.5**8)
    assert lrs[id(_p(enc, "layer4.1.conv2.weight"))] == pytest.approx(0.1 * 0.5 * 0.1)  # last block x lr_mult
    assert lrs[id(_p(enc, "layer4.0.bn1.weight"))] == pytest.approx(0.1 * 0.5**2 * 0.1)
    assert lrs[id(model.heads.label.weight)] == pytest.approx(0.1)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(_p(enc, "layer1.0.bn1.weight")) in no_decay and id(_p(enc, "layer1.0.conv1.weight")) not in no_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_ratios_hold_through_the_schedule_and_for_unfrozen_layers():
    from mtl.engine.hooks import UnfreezeHook

    model = resnet_model()
    apply_freeze(model.encoder, {"until": "layer3"})
    cfg = OptimCfg(lr=0.1, layer_decay=0.5)
    opt = build_optimizer(model, cfg, model_scales(model, 0.5))
    sched = build_scheduler(opt, SchedCfg(name="cosine"), epochs=4, steps_per_epoch=2)
    for _ in range(3):
        opt.step()
        sched.step()
    factor = sched.lr_lambdas[0](3)
    enc = model.encoder
    lrs = _lrs(opt)
    assert lrs[id(_p(enc, "layer4.1.conv1.weight"))] == pytest.approx(0.1 * 0.5 * factor)
    assert lrs[id(_p(enc, "layer4.0.conv1.weight"))] / lrs[id(model.heads.label.weight)] == pytest.approx(0.25)

    class T:  # the parts of a Trainer the hook uses
        optimizer, scheduler, epoch = opt, sched, 1

    T.model = model
    UnfreezeHook(model.encoder, [UnfreezeCfg(epoch=1, modules=["layer3", "conv1"], lr_mult=0.1)], cfg).before_epoch(T)
    lrs = _lrs(opt)
    assert lrs[id(_p(enc, "layer3.1.conv1.weight"))] == pytest.approx(0.1 * 0.1 * 0.5**3 * factor)
    assert lrs[id(_p(enc, "conv1.weight"))] == pytest.approx(0.1 * 0.1 * 0.5**9 * factor)
    for _ in range(2):
        opt.step()
        sched.step()
    lrs, factor = _lrs(opt), sched.lr_lambdas[0](5)
    assert lrs[id(_p(enc, "layer3.0.conv1.weight"))] == pytest.approx(0.1 * 0.1 * 0.5**4 * factor)
    assert lrs[id(model.heads.label.weight)] == pytest.approx(0.1 * factor)


def test_unknown_encoder_families_are_refused():
    with pytest.raises(UserError, match="optim.layer_decay needs the encoder's block structure.*not my_net"):
        layer_depths("my_net", [])


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"model.arch": "cross_stitch"}, ["optim.layer_decay is not supported with model.arch=cross_stitch"]),
        ({"optim.layer_decay": 0}, ["optim.layer_decay"]),
        ({"optim.layer_decay": 1.5}, ["optim.layer_decay"]),
    ],
)
def test_bad_layer_decay_configs_are_refused_before_anything_is_written(overrides, words, tmp_path, capsys):
    import yaml

    root = make_folder(tmp_path / "data", per_class=(4, 2))
    cfg = tiny_config(root, tmp_path / "runs", **{"optim.layer_decay": 0.7, **overrides})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    refused(capsys, ["train", str(path)], *words, runs=tmp_path / "runs")
