"""The batched pipeline (decoded stores, device augmentation) and cached encoder features give the same
results as the per-item path and the uncached path."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from mtl.build.data import build_data
from mtl.build.experiment import build_experiment
from mtl.config.load import build_config
from mtl.core.errors import UserError
from mtl.data.batches import DeviceBatches
from mtl.engine.feature_cache import FeatureBatches, HeadsOnFeatures
from mtl.workflows.train import run


def cfg_of(folder, tmp_path, **overrides):
    return build_config(tiny_config(folder, tmp_path / "runs", **overrides), {})


def first_batches(cfg, split):
    _, _, loaders, _, info = build_data(cfg, torch.device("cpu"))
    return loaders[split], info


@pytest.mark.parametrize("augment", ["none", "random_resized_crop"])
def test_folder_uses_the_batched_pipeline_and_eval_matches_the_per_item_path(color_folder, tmp_path, augment):
    # stored at the image size, the eval geometry is the identity: both paths must give the same tensors
    batched, info = first_batches(
        cfg_of(color_folder, tmp_path, **{"data.cache_size": 32, "data.augment": augment}), "val"
    )
    items, _ = first_batches(
        cfg_of(color_folder, tmp_path, **{"data.pipeline": "items", "data.augment": augment}), "val"
    )
    assert isinstance(batched, DeviceBatches) and not isinstance(items, DeviceBatches)
    assert info["pipeline"].startswith("batched on cpu")
    assert len(batched) == len(items)
    for a, b in zip(batched, items):
        assert a["image"].shape == b["image"].shape == (8, 3, 32, 32)
        assert torch.equal(a["targets"]["label"], b["targets"]["label"])
        assert torch.allclose(a["image"], b["image"], atol=1e-5)


def test_batched_train_batches_are_augmented_and_seeded(color_folder, tmp_path):
    loader, info = first_batches(cfg_of(color_folder, tmp_path), "train")
    assert info["train_size"] == 48 and len(loader) == 6
    loader.generator.manual_seed(3)
    one = [b["image"] for b in loader]
    loader.generator.manual_seed(3)
    two = [b["image"] for b in loader]
    loader.generator.manual_seed(4)
    three = [b["image"] for b in loader]
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    assert not all(torch.equal(x, y) for x, y in zip(one, three))
    labels = torch.cat([b["targets"]["label"] for b in loader])
    assert sorted(labels.tolist()) == [0] * 16 + [1] * 16 + [2] * 16


def test_batched_pipeline_follows_class_subsets_and_few_label_subsets(color_folder, tmp_path):
    cfg = cfg_of(color_folder, tmp_path, **{"data.classes": ["red", "blue"], "data.labels_per_class": 5})
    loader, info = first_batches(cfg, "train")
    assert isinstance(loader, DeviceBatches) and info["train_size"] == 10
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["targets"]["label"] for b in batches])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5  # red -> 0, blue -> 1
    # mean colour tells the class: red has a high red channel, blue a high blue one (normalised by 0.5/0.5)
    red, blue = images[labels == 0].mean((0, 2, 3)), images[labels == 1].mean((0, 2, 3))
    assert red[0] > red[2] and blue[2] > blue[0]


def test_training_on_the_batched_pipeline_learns(color_folder, tmp_path):
    summary = run(cfg_of(color_folder, tmp_path, **{"train.epochs": 4}), quiet=True)
    assert summary["pipeline"].startswith("batched")
    assert summary["best"]["val"]["acc"] > 0.9


def test_pipeline_batched_on_a_data_set_without_batches_is_a_clear_error(tmp_path):
    pytest.importorskip("captcha")
    raw = {
        "data": {
            "name": "captcha",
            "root": str(tmp_path / "c"),
            "pipeline": "batched",
            "options": {"length": 2, "size": [24, 48], "train_size": 4, "val_size": 2},
        },
        "model": {"encoder": "small_cnn"},
        "tasks": {"char0": {}, "char1": {}},
        "out_dir": str(tmp_path),
    }
    with pytest.raises(UserError, match="data.pipeline=items"):
        build_data(build_config(raw, {}), torch.device("cpu"))


def test_scenes_batches_equal_the_per_item_path_and_train_identically(tmp_path):
    from test_multitask import scenes_config

    from mtl.data.dense_batches import DenseBatches

    batched, info = first_batches(scenes_config(tmp_path, "data.augment=none"), "train")
    items, _ = first_batches(scenes_config(tmp_path, "data.augment=none", "data.pipeline=items"), "train")
    assert isinstance(batched, DenseBatches) and info["pipeline"].startswith("batched on cpu")
    assert not isinstance(items, DenseBatches) and len(batched) == len(items) == 3
    batched.generator.manual_seed(5)
    items.generator.manual_seed(5)
    for a, b in zip(batched, items):  # same shuffled order, same tensors
        assert torch.equal(a["image"], b["image"])
        assert a["targets"].keys() == b["targets"].keys()
        for t in a["targets"]:
            assert torch.equal(a["targets"][t], b["targets"][t]), t
    one = run(scenes_config(tmp_path, "data.augment=none"), quiet=True)
    two = run(scenes_config(tmp_path, "data.augment=none", "data.pipeline=items"), quiet=True)
    assert one["final"]["train"]["loss"] == pytest.approx(two["final"]["train"]["loss"], rel=1e-5)
    for task, metrics in one["final"]["val"]["tasks"].items():
        assert metrics == pytest.approx(two["final"]["val"]["tasks"][task], rel=1e-4, abs=1e-6), task


def test_scenes_batch_flips_keep_image_and_maps_aligned(tmp_path):
    from test_multitask import scenes_config

    from mtl.build.data import build_dataset
    from mtl.data.dense_transforms import hflip

    cfg = scenes_config(tmp_path)
    ds = build_dataset(cfg.data, "val", train=False)
    rows, flip = torch.tensor([3, 0, 5, 1]), torch.tensor([True, False, True, False])
    batch = ds.gather(rows, torch.device("cpu"), {"flip": flip})
    for i, (row, f) in enumerate(zip(rows.tolist(), flip.tolist())):
        item = hflip(ds[row], ds.targets) if f else ds[row]
        for key in ("image", "seg", "depth", "normal", "label"):
            assert torch.equal(batch[key][i], item[key]), (key, i)
    assert not torch.equal(batch["seg"][0], ds[3]["seg"])  # the flip did something
    loader, _ = first_batches(scenes_config(tmp_path), "train")  # data.augment random_crop: flips in training
    assert loader.augment and not first_batches(scenes_config(tmp_path), "val")[0].augment
    loader.generator.manual_seed(0)
    flipped = torch.cat([b["targets"]["normal"] for b in loader])
    ordered = loader.in_order()  # feature caching reads augmented views of the training split in order
    views = []
    for seed in (1, 2):
        ordered.generator.manual_seed(seed)
        views.append(torch.cat([b["image"] for b in ordered]))
    assert len(views[0]) == 24 and not torch.equal(views[0], views[1])
    unaugmented, _ = first_batches(scenes_config(tmp_path, "data.augment=none"), "train")
    plain = torch.cat([b["targets"]["normal"] for b in unaugmented])
    # per channel over the epoch: mirroring keeps the y and z sums and changes x (negated on flipped scenes)
    a, b = flipped.sum((0, 2, 3)), plain.sum((0, 2, 3))
    assert torch.allclose(a[1:], b[1:], rtol=1e-4) and abs(float(a[0] - b[0])) > 1.0


def test_multi_fashion_batches_shift_like_the_per_item_path():
    from mtl.data.dense_batches import DenseBatches
    from mtl.data.dense_transforms import normalize, shift
    from mtl.data.multi_fashion import MultiFashionDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 1, 36, 36), dtype=torch.uint8, generator=g)
    left, right = torch.randint(0, 10, (10,), generator=g), torch.randint(0, 10, (10,), generator=g)
    plain, augmenting = MultiFashionDataset(images, left, right), MultiFashionDataset(images, left, right, augment=True)
    rows = torch.tensor([4, 9, 0])
    batch = plain.gather(rows, torch.device("cpu"))
    for i, row in enumerate(rows.tolist()):
        for key in ("image", "left", "right"):
            assert torch.equal(batch[key][i], plain[row][key]), key
    params = augmenting.draw(3, g)
    assert set(params) == {"top", "left"} and int(params["top"].max()) <= 4
    params = {"top": torch.tensor([0, 4, 2]), "left": torch.tensor([4, 0, 1])}
    shifted = augmenting.gather(rows, torch.device("cpu"), params)["image"]
    for i, row in enumerate(rows.tolist()):
        raw = images[row].float().div(255).expand(3, -1, -1)
        expected = normalize(shift(raw, int(params["top"][i]), int(params["left"][i]), 2), plain.mean, plain.std)
        assert torch.equal(shifted[i], expected)
    assert not torch.equal(shifted[0], batch["image"][0])
    loader = DenseBatches(
        augmenting,
        {"a": "left", "b": "right"},
        batch_size=4,
        shuffle=True,
        augment=True,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(1),
    )
    out = list(loader)
    assert [len(b["image"]) for b in out] == [4, 4, 2]
    assert sorted(torch.cat([b["targets"]["a"] for b in out]).tolist()) == sorted(left.tolist())


def frozen(folder, tmp_path, **overrides):
    return cfg_of(
        folder,
        tmp_path,
        **{"model.freeze": "all", "data.augment": "none", "train.epochs": 3, "optim.lr": 0.05, **overrides},
    )


def test_cached_features_train_the_same_heads_as_the_uncached_run(color_folder, tmp_path):
    # same shuffling generator, same features: the same heads, epoch after epoch
    cached = run(frozen(color_folder, tmp_path / "a"), quiet=True)
    plain = run(frozen(color_folder, tmp_path / "b", **{"train.cache_features": "off"}), quiet=True)
    assert "features cached once" in cached["pipeline"] and "cached" not in plain["pipeline"]
    assert cached["feature_cache_s"] > 0 and "feature_cache_s" not in plain  # recorded apart from s/epoch
    for phase in ("train", "val"):
        assert cached["final"][phase]["loss"] == pytest.approx(plain["final"][phase]["loss"], rel=1e-4, abs=1e-5)
    a = torch.load(f"{cached['run_dir']}/checkpoints/best.pt", weights_only=True)["model"]
    b = torch.load(f"{plain['run_dir']}/checkpoints/best.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and any(k.startswith("encoder.") for k in a)  # the checkpoint is the whole model
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_cached_features_on_the_per_item_path_are_the_encoder_outputs_in_data_set_order(color_folder, tmp_path):
    from mtl.build.experiment import _speed_up

    cfg = frozen(color_folder, tmp_path, **{"data.pipeline": "items"})
    exp = build_experiment(cfg)
    model, loaders = _speed_up(cfg, exp)
    assert isinstance(model, HeadsOnFeatures)
    for split in ("train", "val"):
        ds = exp.datasets[split]
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        exp.model.eval()
        with torch.no_grad():
            expected = exp.model.encode(images)["out"]
        assert torch.allclose(loaders[split].views[0], expected, atol=1e-5)
        assert loaders[split].targets["label"].tolist() == [int(ds[i]["label"]) for i in range(len(ds))]


def test_caching_features_says_so_in_two_lines_when_it_lasts_and_is_silent_when_quick(
    color_folder, tmp_path, capsys, monkeypatch
):
    from mtl.build.experiment import _speed_up
    from mtl.engine import feature_cache

    cfg = frozen(color_folder, tmp_path)
    monkeypatch.setattr(feature_cache, "ANNOUNCE_AFTER_S", 60.0)  # far longer than these 72 images take
    exp = build_experiment(cfg)
    capsys.readouterr()
    _speed_up(cfg, exp)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(feature_cache, "ANNOUNCE_AFTER_S", 0.0)  # every caching counts as long
    _speed_up(cfg, exp)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "caching encoder features of 48 train, 24 val images (once; the heads then train on them)"
    assert err[1].startswith("cached encoder features in ") and err[1].endswith(" s") and len(err) == 2
    assert exp.info["feature_cache_s"] > 0


def test_feature_views_cache_several_augmented_views(color_folder, tmp_path):
    cfg = frozen(
        color_folder,
        tmp_path,
        **{"data.augment": "random_resized_crop", "train.cache_features": "on", "train.feature_views": 2},
    )
    from mtl.build.experiment import _speed_up

    exp = build_experiment(cfg)
    model, loaders = _speed_up(cfg, exp)
    assert isinstance(model, HeadsOnFeatures) and isinstance(loaders["train"], FeatureBatches)
    views = loaders["train"].views
    assert views.shape == (2, 48, exp.model.encoder.out_dim) and loaders["val"].views.shape[0] == 1
    assert not torch.allclose(views[0], views[1])  # two different random crops
    first = torch.cat([b["image"] for b in loaders["train"]])
    second = torch.cat([b["image"] for b in loaders["train"]])
    assert first.shape == second.shape == (48, exp.model.encoder.out_dim)
    assert not torch.equal(first.sort(0).values, second.sort(0).values)  # epoch 2 reads the other view


def test_cache_features_on_with_a_training_encoder_is_a_clear_error(color_folder, tmp_path):
    cfg = cfg_of(color_folder, tmp_path, **{"train.cache_features": "on"})
    with pytest.raises(UserError, match="cannot be cached: the encoder trains"):
        run(cfg, quiet=True)


def test_channels_last_is_on_by_default_and_computes_the_same(color_folder, tmp_path):
    """auto means on, on CPUs too; off turns it off. The two formats compute the same function up to rounding
    (compared on one forward and backward pass: after training, rounding differences would have grown)."""
    auto = run(cfg_of(color_folder, tmp_path / "a", **{"train.epochs": 1}), quiet=True)
    off = run(cfg_of(color_folder, tmp_path / "b", **{"train.channels_last": "off", "train.epochs": 1}), quiet=True)
    assert auto["channels_last"] and not off["channels_last"]
    exp = build_experiment(cfg_of(color_folder, tmp_path / "c"))
    x = next(iter(exp.loaders["train"]))["image"]
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        exp.model.zero_grad()
        exp.model.to(memory_format=fmt)
        out = exp.model(x.contiguous(memory_format=fmt))["label"]
        out.square().sum().backward()
        results.append((out.detach(), torch.cat([p.grad.reshape(-1) for p in exp.model.parameters()])))
    (out_a, grad_a), (out_b, grad_b) = results
    assert torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-5 * float(out_a.abs().max()))
    assert float((grad_a - grad_b).norm() / grad_a.norm()) < 1e-4


def test_compiled_model_trains_and_its_checkpoint_loads_uncompiled(color_folder, tmp_path):
    from mtl.workflows.evaluate import eval_command
    from mtl.workflows.runs import load_model

    summary = run(cfg_of(color_folder, tmp_path, **{"train.epochs": 2, "train.compile": True}), quiet=True)
    state = torch.load(f"{summary['run_dir']}/checkpoints/best.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in state)  # plain keys: any mtl command reads the run
    assert load_model(summary["run_dir"]).model.heads["label"] is not None
    eval_command(summary["run_dir"], "val")
    metrics = json.loads((Path(summary["run_dir"]) / "eval" / "val" / "metrics.json").read_text())
    assert metrics["tasks"]["label"]["acc"] == pytest.approx(summary["best"]["val"]["acc"], abs=1e-6)
