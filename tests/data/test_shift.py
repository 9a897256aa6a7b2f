"""``data.shift``: the pixel permutation and the rotation against independent computations, both applied alike to
every split of both pipelines (and to mtl predict's input), the config's refusals, and a continual stream of a plain
and a permuted task."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config

from mtl.build.data import _input_shift, build_data
from mtl.build.model import model_input_size
from mtl.cli import main
from mtl.config.load import build_config, load_config, task_configs
from mtl.config.stages import stage_configs
from mtl.core.errors import UserError
from mtl.data.batches import DeviceBatches
from mtl.data.loaders import in_order
from mtl.data.shift import PermutePixels, Rotate, build_shift, pixel_permutation

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).parents[2] / "configs"
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.5]


# --- the transformations ---------------------------------------------------------------------------------------------


def test_permutation_is_a_bijection_fixed_by_the_seed_and_inverted_by_its_inverse():
    perm = pixel_permutation(0, 35)
    assert sorted(perm.tolist()) == list(range(35))  # a bijection of the H*W positions
    assert torch.equal(pixel_permutation(0, 35), perm)  # the same seed, drawn again: the same permutation
    assert not torch.equal(pixel_permutation(1, 35), perm)
    images = torch.randn(4, 3, 5, 7)
    out = PermutePixels(0)(images)
    # output pixel i is input pixel perm[i], the same for every channel and image (written out position by position)
    for i, j in enumerate(perm.tolist()):
        assert torch.equal(out[..., i // 7, i % 7], images[..., j // 7, j % 7])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(35)
    restored = out.flatten(-2)[..., inverse].view(images.shape)
    assert torch.equal(restored, images)
    assert torch.equal(PermutePixels(0)(images[2]), out[2])  # one image (C, H, W) as in a batch


def _bilinear_rotation(image: np.ndarray, degrees: float, fill: list) -> np.ndarray:
    """An image (C, H, W) turned counter-clockwise about its centre, float64, one output pixel at a time: pixel
    (r, c) samples the input at the clockwise-rotated position; neighbours outside the image count as ``fill``."""
    channels, h, w = image.shape
    a = math.radians(degrees)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            dx, dy = c - cx, r - cy  # y points down: counter-clockwise on screen is x' = x cos + y sin
            x = cx + dx * math.cos(a) - dy * math.sin(a)
            y = cy + dx * math.sin(a) + dy * math.cos(a)
            x0, y0 = math.floor(x), math.floor(y)
            value = np.zeros(channels)
            for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                weight = (1 - abs(x - xx)) * (1 - abs(y - yy))
                inside = 0 <= yy < h and 0 <= xx < w
                value += weight * (image[:, yy, xx] if inside else np.asarray(fill))
            out[:, r, c] = value
    return out


def test_rotation_by_90_is_rot90_by_0_the_identity_and_by_30_a_bilinear_turn_with_black_corners():
    images = torch.randn(2, 3, 6, 6)
    shift = build_shift({"rotate": 90}, MEAN, STD)
    assert isinstance(shift, Rotate)
    torch.testing.assert_close(shift(images), torch.rot90(images, 1, dims=(-2, -1)))
    torch.testing.assert_close(build_shift({"rotate": 0}, MEAN, STD)(images), images)
    black = [-m / s for m, s in zip(MEAN, STD)]  # a 0 pixel, normalised
    expected = _bilinear_rotation(images[1].double().numpy(), 30.0, black)
    got = build_shift({"rotate": 30}, MEAN, STD)(images)[1].double()
    torch.testing.assert_close(got, torch.from_numpy(expected), atol=1e-5, rtol=1e-5)
    # rotating the normalised image equals normalising the rotated raw image with black (0) corners
    raw = torch.rand(1, 3, 6, 6)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    turned_raw = Rotate(30, [0.0, 0.0, 0.0])(raw)
    torch.testing.assert_close(Rotate(30, black)((raw - mean) / std), (turned_raw - mean) / std)


# --- both pipelines, every split -------------------------------------------------------------------------------------


def _loaders(folder, tmp_path, pipeline, shift):
    raw = tiny_config(folder, tmp_path / "runs", **{"data.pipeline": pipeline, "data.augment": "none"})
    raw["data"].update(cache_size=32, shift=shift)  # stored at the image size: both pipelines give the same images
    return build_data(build_config(raw, {}), torch.device("cpu"))[2]


def _seed(loader, seed):
    if getattr(loader, "generator", None) is not None:  # a per-item validation loader has none: it does not shuffle
        loader.generator.manual_seed(seed)


@pytest.mark.parametrize("pipeline", ["batched", "items"])
def test_train_and_val_batches_are_shifted_alike_in_both_pipelines(color_folder, tmp_path, pipeline):
    plain = _loaders(color_folder, tmp_path, pipeline, None)
    shifted = _loaders(color_folder, tmp_path, pipeline, {"permute": 3})
    assert isinstance(shifted["val"], DeviceBatches) == (pipeline == "batched")
    perm = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(3))
    for split in ("train", "val"):
        for loaders in (plain, shifted):
            _seed(loaders[split], 5)  # the same training order for both
        for a, b in zip(plain[split], shifted[split]):
            assert torch.equal(b["targets"]["label"], a["targets"]["label"])
            assert torch.equal(b["image"], a["image"].flatten(-2)[..., perm].view(a["image"].shape)), split
    # every way of reading the split sees the shifted images: in order (feature caching, reports), and single items
    # as the image grid reads them (its predictions come from these inputs)
    val = shifted["val"]
    first = next(iter(val))["image"]
    assert torch.equal(next(iter(in_order(val)))["image"], first)
    assert torch.allclose(val.collate_fn([val.dataset[i] for i in range(4)])["image"], first[:4], atol=1e-5)
    assert model_input_size(val) == [32, 32]


def test_mtl_predict_input_is_shifted_as_the_run_was(tmp_path):
    from PIL import Image

    from mtl.workflows.runs import image_tensor

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    raw = tiny_config(tmp_path, tmp_path / "runs", **{"data.image_size": 8, "data.resize_size": 8})
    plain = image_tensor(tmp_path / "a.png", build_config(raw, {}))
    raw["data"]["shift"] = {"rotate": 90}
    torch.testing.assert_close(image_tensor(tmp_path / "a.png", build_config(raw, {})), torch.rot90(plain, 1, (-2, -1)))


# --- refusals --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shift, message",
    [
        ({"permute": 1, "rotate": 30}, "exactly one of permute and rotate"),
        ({}, "exactly one of permute and rotate"),
        ({"flip": True}, "unknown key 'flip'"),
        ({"permute": 1.5}, "data.shift.permute must be an integer seed"),
        ({"permute": True}, "data.shift.permute must be an integer seed"),
        ({"permute": -1}, "data.shift.permute must be an integer seed"),
        ({"rotate": "left"}, "data.shift.rotate must be a number of degrees"),
        ({"rotate": float("inf")}, "data.shift.rotate must be a number of degrees"),
        ("permute", "must be a mapping"),
    ],
)
def test_bad_shifts_are_refused_in_one_line(tmp_path, shift, message):
    raw = tiny_config(tmp_path, tmp_path / "runs")
    raw["data"]["shift"] = shift
    with pytest.raises(UserError, match=message) as e:
        build_config(raw, {})
    assert "\n" not in str(e.value) and "data.shift" in str(e.value)


def test_a_bad_shift_on_the_command_line_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, tmp_path / "runs")))
    assert main(["train", str(config), "data.shift={rotate: 30, permute: 2}"]) == 2
    err = capsys.readouterr().err
    assert "data.shift needs exactly one of permute and rotate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_dense_targets_and_a_multi_input_tasks_own_shift_are_refused(color_folder, tmp_path):
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"data.shift": {"permute": 1}}), {})
    with pytest.raises(UserError, match="not the dense targets of task seg"):
        _input_shift(cfg, {"seg": SimpleNamespace(dense=True, type_name="segmentation")})
    both = {"a": {"data": {}}, "b": {"data": {}}}
    multi = build_config(tiny_config(color_folder, tmp_path / "runs", **{"data.shift": {"rotate": 45}, "tasks": both}))
    assert all(one.data.shift == {"rotate": 45} for one in task_configs(multi).values())  # the top level's, inherited
    own = {"a": {"data": {}}, "b": {"data": {"shift": {"permute": 1}}}}
    with pytest.raises(UserError, match="tasks.b.data.shift: a multi-input run shifts the images of every task alike"):
        build_data(build_config(tiny_config(color_folder, tmp_path / "runs", tasks=own), {}), torch.device("cpu"))


# --- the stream configs ----------------------------------------------------------------------------------------------


def test_the_stream_configs_make_five_tasks():
    shifts = {
        "continual_permuted_fmnist.yaml": [None] + [{"permute": s} for s in (1, 2, 3, 4)],
        "continual_rotated_fmnist.yaml": [{"rotate": a} for a in (0, 22.5, 45, 67.5, 90)],
        "continual_split_digits.yaml": [None] * 5,
    }
    for name, expected in shifts.items():
        raw, sources = load_config(CONFIGS / name)
        configs = stage_configs(raw, sources)
        assert [c.data.shift for c in configs] == expected, name
        assert build_config(raw, sources).continual.methods == ["progressive", "independent", "finetune", "head_only"]
    assert [c.data.classes for c in configs] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert configs[0].data.options["charset"] == "0123456789"


def test_a_continual_stream_with_a_permuted_task_trains_on_shifted_loaders(tmp_path, monkeypatch):
    from test_data_multitask import write_idx

    from mtl.workflows.continual import prepare_sequence
    from mtl.workflows.evaluate import eval_command
    from mtl.workflows.runs import load_model
    from mtl.workflows.stages import train_from_file

    root, rng = tmp_path / "fm", np.random.default_rng(0)
    root.mkdir()
    for prefix, n in (("train", 40), ("t10k", 10)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    overrides = [
        f"out_dir={tmp_path / 'runs'}",
        f"data.root={root}",
        "data.val_split=0.25",
        "train.epochs=1",
        "train.progress=false",
        "continual.methods=[finetune]",
        "model.encoder_options.widths=[8,8,8]",
        "stages=[{name: plain}, {name: permuted, data: {shift: {permute: 1}}}]",
    ]
    raw, sources = load_config(CONFIGS / "continual_permuted_fmnist.yaml", overrides)
    plain, permuted = prepare_sequence(stage_configs(raw, sources), torch.device("cpu"))
    perm = pixel_permutation(1, 28 * 28)
    for split in ("train", "val"):
        for st in (plain, permuted):
            _seed(st.loaders[split], 0)
        for a, b in zip(plain.loaders[split], permuted.loaders[split]):
            assert torch.equal(b["image"], a["image"].flatten(-2)[..., perm].view(a["image"].shape))
    monkeypatch.setattr("mtl.workflows.continual.have_matplotlib", lambda: False)  # heatmaps: test_continual's
    (summary,) = train_from_file(str(CONFIGS / "continual_permuted_fmnist.yaml"), overrides)
    assert summary["tasks"] == ["plain", "permuted"] and len(summary["methods"]["finetune"]["R"]) == 2
    # mtl eval and mtl predict rebuild a task's inputs from its stage config, which keeps the shift
    task_run = Path(summary["run_dir"]) / "finetune" / "permuted"
    assert load_model(task_run).cfg.data.shift == {"permute": 1}
    eval_command(str(task_run), "val")
    metrics = json.loads((task_run / "eval" / "val" / "metrics.json").read_text())
    assert metrics["tasks"]["permuted"]["acc"] == pytest.approx(summary["methods"]["finetune"]["R"][1][1], abs=1e-6)
