"""timm encoders (``model.encoder: timm/<name>``): a contract over a set of timm families, checked against timm's own
feature extraction, pooling and layer-decay grouping; weights from files and the Hugging Face cache, offline; the
refusals without timm and without cached weights; one short run."""

import sys

import pytest
import torch
import yaml
from conftest import tiny_config

from mtl.build.model import config_encoder
from mtl.cli import main
from mtl.config.load import build_config
from mtl.core.errors import UserError
from mtl.models.encoders import build_encoder
from mtl.models.freezing import apply_freeze
from mtl.models.heads import create_head
from mtl.models.layer_depth import encoder_scales

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

# one member of each kind: a ResNet, a ConvNeXt, an EfficientNet-style MobileNetV3, a RegNet, a fixed-size ViT
FAMILIES = {
    "timm/resnet18": {},
    "timm/convnext_atto": {},
    "timm/mobilenetv3_small_050": {},
    "timm/regnetx_002": {},
    "timm/vit_tiny_patch16_224": {"img_size": 32},  # a 2x2 patch grid keeps it quick
}
SIDE = 32


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Each family built once through mtl's config path, seeded, in eval mode."""
    root, built = tmp_path_factory.mktemp("timm"), {}
    for name, options in FAMILIES.items():
        cfg = build_config(
            tiny_config(root, root / "runs", **{"model.encoder": name, "model.encoder_options": options})
        )
        torch.manual_seed(0)
        built[name] = config_encoder(cfg).eval()
    return built


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def _own(state: dict, key: str) -> torch.Tensor:
    """The encoder's tensor for a key of timm's features_only wrapper (which may prefix "model." or flatten
    "stages.0" to "stages_0")."""
    for k in (key, key.removeprefix("model."), key.replace("_", ".", 1)):
        if k in state:
            return state[k]
    raise KeyError(key)


@pytest.mark.parametrize("name", FAMILIES)
def test_stage_maps_and_pooled_features_are_timms(encoders, name):
    encoder, arch, options = encoders[name], name.removeprefix("timm/"), FAMILIES[name]
    x = _x()
    with torch.no_grad():
        features = encoder(x)
    # pooled: timm's own forward of the same architecture without a classifier, with the encoder's state dict loaded
    # by timm's names (strict: every name is timm's)
    pooled = timm.create_model(arch, num_classes=0, **options).eval()
    pooled.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        want = pooled(x)
    assert features["out"].shape == (2, encoder.out_dim) == want.shape
    torch.testing.assert_close(features["out"], want, rtol=1e-4, atol=1e-5)

    # stage maps: timm's features_only extractor at the same feature_info entries, with the encoder's weights
    stages = [f["name"] for f in encoder.feature_info]
    timm_modules = [f["module"] for f in encoder.timm_feature_info]
    indices = [timm_modules.index(s) for s in stages]
    extractor = timm.create_model(arch, features_only=True, out_indices=indices, **options).eval()
    extractor.load_state_dict({k: _own(encoder.state_dict(), k) for k in extractor.state_dict()})
    with torch.no_grad():
        maps = extractor(x)
    assert extractor.feature_info.channels() == [f["channels"] for f in encoder.feature_info]
    assert extractor.feature_info.reduction() == [f["reduction"] for f in encoder.feature_info]
    assert list(features)[:-1] == stages
    for stage, info, m in zip(stages, encoder.feature_info, maps):
        assert features[stage].shape == (2, info["channels"], SIDE // info["reduction"], SIDE // info["reduction"])
        torch.testing.assert_close(features[stage], m, rtol=1e-4, atol=1e-5)
    # the stages: the last timm feature at each reduction from 4 up
    reductions = [f["reduction"] for f in encoder.feature_info]
    assert reductions == sorted(set(r for r in (f["reduction"] for f in encoder.timm_feature_info) if r >= 4))


def test_input_sizes_and_dense_heads(encoders):
    vit, resnet = encoders["timm/vit_tiny_patch16_224"], encoders["timm/resnet18"]
    assert vit.fixed_input_size == (32, 32) and vit.min_input_size == 32
    assert resnet.fixed_input_size is None and resnet.min_input_size == 32  # its largest reduction
    head = create_head("fpn", in_dim=resnet.out_dim, out_dim=5, feature_info=resnet.feature_info, hidden=0, dropout=0)
    with torch.no_grad():
        assert head(resnet(_x()), (SIDE, SIDE)).shape == (2, 5, SIDE, SIDE)


@pytest.mark.parametrize(
    ("name", "spec", "frozen_tops"),
    [
        ("timm/resnet18", {"until": "layer2"}, {"conv1", "bn1", "layer1", "layer2"}),
        ("timm/convnext_atto", {"train": ["stages.3", "head"]}, {"stem", "stages.0", "stages.1", "stages.2"}),
        ("timm/vit_tiny_patch16_224", ["patch_embed", "blocks.0"], {"patch_embed", "blocks.0"}),
    ],
)
def test_freezing_by_timm_module_names(encoders, name, spec, frozen_tops):
    encoder = encoders[name]
    try:
        apply_freeze(encoder, spec)
        frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
        want = {n for n, _ in encoder.named_parameters() if any(n.startswith(t + ".") for t in frozen_tops)}
        assert frozen == want and want
    finally:
        apply_freeze(encoder, "none")


@pytest.mark.parametrize("name", ["timm/resnet18", "timm/convnext_atto", "timm/vit_tiny_patch16_224"])
def test_layer_decay_scales_are_timms(encoders, name):
    encoder, arch = encoders[name], name.removeprefix("timm/")
    reference = timm.create_model(arch, num_classes=10, **FAMILIES[name])  # with its classifier, as timm fine-tunes
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(reference, layer_decay=0.75)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    want = {n: scale_of[id(p)] for n, p in reference.named_parameters()}
    got = {n: encoder_scales(encoder, 0.75)[id(p)] for n, p in encoder.named_parameters()}
    assert got == pytest.approx({n: want[n] for n in got}, rel=1e-12)
    assert min(got.values()) < 0.75**5  # the stem is many blocks deep


def _classifier_state(arch: str = "mobilenetv3_small_050") -> dict:
    torch.manual_seed(3)
    return timm.create_model(arch, num_classes=7).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_local_weights_file_loads_without_its_classifier(tmp_path, suffix):
    state = _classifier_state()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    encoder = build_encoder("timm/mobilenetv3_small_050", weights=str(path))
    own = encoder.state_dict()
    assert {k for k in state if k not in own} == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(own[k], state[k]) for k in own)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf" / "hub"


def test_default_weights_come_from_the_hugging_face_cache(empty_caches):
    # the hub cache layout: models--<org>--<name>/snapshots/<revision>/<file>, refs/main naming the revision
    repo = empty_caches / "models--timm--mobilenetv3_small_050.lamb_in1k"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    state = _classifier_state()
    from safetensors.torch import save_file

    save_file(state, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    for spec in ("DEFAULT", "lamb_in1k"):
        encoder = build_encoder("timm/mobilenetv3_small_050", weights=spec)
        assert torch.equal(encoder.state_dict()["conv_stem.weight"], state["conv_stem.weight"])


def test_missing_or_unknown_weights_fail_in_one_line(empty_caches):
    with pytest.raises(UserError) as e:
        build_encoder("timm/resnet18", weights="DEFAULT")
    msg = str(e.value)
    assert "\n" not in msg and "resnet18.a1_in1k" in msg and str(empty_caches) in msg
    assert "timm.create_model('resnet18.a1_in1k', pretrained=True)" in msg and "model.weights: /path/to/" in msg
    with pytest.raises(UserError, match=r"unknown weights 'nope' .*a1_in1k.*tv_in1k"):
        build_encoder("timm/resnet18", weights="nope")


def test_without_timm_the_encoder_is_refused_naming_the_extra(color_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(color_folder, tmp_path / "runs")))
    assert main(["train", str(cfg_path), "model.encoder=timm/resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'mtl[timm]'" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_bad_timm_names_and_options_are_refused():
    with pytest.raises(UserError, match=r"unknown timm model 'resnet181'.*timm/resnet18"):
        build_encoder("timm/resnet181")
    with pytest.raises(UserError, match="num_classes"):
        build_encoder("timm/resnet18", num_classes=10)


def test_a_short_run_with_a_timm_encoder(color_folder, tmp_path):
    overrides = {
        "model.encoder": "timm/mobilenetv3_small_050",
        "model.encoder_options": {},
        "model.freeze": {"until": "blocks.0"},
        "optim.layer_decay": 0.75,
        "train.epochs": 1,
    }
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(color_folder, tmp_path / "runs", **overrides)))
    assert main(["train", str(cfg_path)]) == 0
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert "encoder.conv_stem.weight" in best["model"] and "encoder.blocks.5.0.conv.weight" in best["model"]
