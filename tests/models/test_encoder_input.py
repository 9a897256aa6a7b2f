"""Which image sizes an encoder takes: one rule (mtl.encoders.check_input_size), derived from the architecture,
used by ``mtl train`` (refused before the run directory exists) and ``mtl summary``."""

import functools

import pytest
import torch
import yaml
from conftest import make_folder, tiny_config
from test_bad_input import refused

from mtl.cli import main
from mtl.core.errors import UserError
from mtl.models.encoders import build_encoder, check_input_size, input_size_problem

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _encoder(name: str, device: str = "cpu"):
    """One build per encoder for this module (meta: the architecture only, nothing computed)."""
    with torch.device(device):
        return build_encoder(name)


@pytest.mark.parametrize("name", ["vit_b_16", "vit_b_32"])  # maxvit_t: tests/models/test_encoders.py
def test_fixed_size_encoders_take_exactly_their_size(name):
    encoder = _encoder(name, "meta")
    assert encoder.fixed_input_size == (224, 224) and encoder.min_input_size == 224
    assert input_size_problem(encoder, 224, 224) is None
    for height, width in ((64, 64), (256, 256), (448, 448), (224, 256)):
        assert input_size_problem(encoder, height, width) == "takes only 224x224 images"


@pytest.mark.parametrize(
    "name, smallest",
    [
        ("swin_t", 32),  # torchvision's weights say min_size 224, but the architecture runs at 64 (and 32)
        ("swin_v2_t", 32),  # weights say 256; it runs at 224
        ("inception_v3", 75),
        ("alexnet", 63),
        ("resnet18", 32),  # it runs on less, but its layer4 map is 1x1 at 32
    ],
)
def test_smallest_size_is_derived_from_the_architecture(name, smallest):
    encoder = _encoder(name)
    assert encoder.fixed_input_size is None and encoder.min_input_size == smallest
    assert input_size_problem(encoder, smallest, smallest) is None
    assert input_size_problem(encoder, smallest - 1, 2 * smallest) == f"needs images of at least {smallest}x{smallest}"


def test_minimum_is_tight_where_the_model_itself_fails():
    encoder = _encoder("inception_v3").eval()
    with torch.no_grad():
        assert encoder(torch.zeros(1, 3, 75, 75))["out"].shape == (1, 2048)
        with pytest.raises(RuntimeError):
            encoder(torch.zeros(1, 3, 74, 74))
    swin = _encoder("swin_t").eval()
    with torch.no_grad():
        assert swin(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 768)  # the size mtl summary used to refuse


def test_small_cnn_needs_every_stage_map():
    encoder = build_encoder("small_cnn")
    assert encoder.min_input_size == 16
    with pytest.raises(UserError, match=r"^data.image_size=4: encoder small_cnn needs images of at least 16x16; fix$"):
        check_input_size(encoder, 4, 4, "data.image_size=4", "fix")
    check_input_size(encoder, 16, 48, "anything")
    assert build_encoder("small_cnn", widths=[8, 16]).min_input_size == 4


@pytest.mark.parametrize(
    "override, encoder, words",
    [
        (
            "data.image_size=4",
            "small_cnn",
            ["data.image_size=4: encoder small_cnn needs images of at least 16x16", "change data.image_size"],
        ),
        ("data.image_size=64", "vit_b_16", ["data.image_size=64: encoder vit_b_16 takes only 224x224 images"]),
    ],
)
def test_train_refuses_sizes_the_encoder_cannot_take(override, encoder, words, tmp_path, capsys):
    root = make_folder(tmp_path / "data", per_class=(2, 1), size=16)
    raw = tiny_config(root, tmp_path / "runs", **{"train.epochs": 1})
    raw["model"] = {"encoder": encoder}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    refused(capsys, ["train", tmp_path / "c.yaml", override, "data.resize_size=16"], *words, runs=tmp_path / "runs")


def test_data_sets_that_size_their_images_are_checked_at_that_size(tmp_path, capsys):
    raw = {
        "name": "tiny",
        "out_dir": str(tmp_path / "runs"),
        "data": {
            "name": "scenes",
            "root": str(tmp_path / "scenes"),
            "image_size": 224,
            "num_workers": 0,
            "options": {"size": 32, "train_size": 4, "val_size": 2},
        },
        "model": {"encoder": "small_cnn", "encoder_options": {"widths": [4, 4, 4, 4, 4, 4]}},  # needs 64
        "tasks": {"label": {}},
        "train": {"epochs": 1, "progress": False, "log_images": 0},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    refused(
        capsys,
        ["train", tmp_path / "c.yaml"],
        "data set scenes gives 32x32 images",
        "encoder small_cnn needs images of at least 64x64",
        "data.options",
        runs=tmp_path / "runs",
    )


def test_summary_takes_what_the_architecture_runs(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"name": "s", "model": {"encoder": "swin_t"}, "tasks": {"label": {"num_classes": 2}}})
    )
    assert main(["summary", str(path), "--input", "3,64,64", "--depth", "0"]) == 0, capsys.readouterr().err
    assert "input [3, 64, 64]" in capsys.readouterr().out


def test_summary_refuses_with_the_same_rule(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "model": {"encoder": "small_cnn"},
                "data": {"image_size": 8},
                "tasks": {"label": {"num_classes": 2}},
            }
        )
    )
    refused(
        capsys,
        ["summary", path],
        "data.image_size=8 (the default --input): encoder small_cnn needs images of at least 16x16",
    )
    refused(capsys, ["summary", path, "--input", "3,12,64"], "--input 3,12,64: encoder small_cnn needs images")
    assert main(["summary", str(path), "--input", "3,16,64"]) == 0


def test_continual_runs_check_every_stage_before_writing(tmp_path, capsys):
    pytest.importorskip("captcha")
    from test_continual import CONFIGS, tiny

    args = ["train", CONFIGS / "progressive.yaml", *tiny(tmp_path, "data.image_size=8", "data.resize_size=8")]
    refused(capsys, args, "data.image_size=8: encoder small_cnn needs images of at least 16x16", runs=tmp_path / "runs")


def test_features_of_a_config_refuse_with_the_same_rule(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "x.png")
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "f",
                "out_dir": str(tmp_path / "runs"),
                "model": {"encoder": "small_cnn"},
                "data": {"image_size": 8, "resize_size": 8},
                "tasks": {"label": {"num_classes": 2}},
            }
        )
    )
    refused(
        capsys,
        ["features", path, "--image", tmp_path / "x.png"],
        "the model's 8x8 input: encoder small_cnn needs images of at least 16x16",
        runs=tmp_path / "runs",
    )
