"""A validation set carved from the training split (data.val_split as a fraction) and the refusals that keep the test
split held out: tiny data sets written in tmp_path."""

import warnings

import pytest
import torch
from conftest import make_folder, tiny_config
from test_data import user_error, write_mnist

from mtl.build.data import build_data, build_dataset
from mtl.config.load import build_config
from mtl.data.holdout import stratified_split

CPU = torch.device("cpu")


def base_indices(dataset) -> list:
    """The indices of ``dataset``'s items in the data set under its subsets."""
    chain = []
    while hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        chain.append(list(dataset.indices))
        dataset = dataset.dataset
    index = list(range(len(dataset)))
    for level in reversed(chain):
        index = [index[i] for i in level]
    return index


def carved(root, tmp_path, **overrides):
    cfg = build_config(tiny_config(root, tmp_path / "runs", **{"data.val_split": 0.25, **overrides}))
    return build_data(cfg, CPU)


def test_stratified_split_takes_the_rounded_share_of_each_class():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 6)  # 0.25 of each: 2.5 -> 3, 1, 1.5 -> 2
    train, val = stratified_split(labels, 0.25, seed=0)
    assert [int((labels[val] == c).sum()) for c in range(3)] == [3, 1, 2]
    assert sorted(train.tolist() + val.tolist()) == list(range(20))  # disjoint, together every item
    again, other = stratified_split(labels, 0.25, seed=0)[1], stratified_split(labels, 0.25, seed=1)[1]
    assert torch.equal(again, val) and not torch.equal(other, val)


def test_carved_split_is_disjoint_stratified_and_fixed_by_split_seed_only(tmp_path):
    root = make_folder(tmp_path / "colors", per_class=(16, 4))
    _, ds, _, _, info = carved(root, tmp_path)
    train, val = base_indices(ds["train"]), base_indices(ds["val"])
    assert sorted(train + val) == list(range(48)) and not set(train) & set(val)
    assert torch.bincount(ds["val"].labels).tolist() == [4, 4, 4]  # a quarter of each class's 16
    assert (info["train_size"], info["val_size"]) == (36, 12)
    assert base_indices(carved(root, tmp_path, **{"train.seed": 7})[1]["val"]) == val
    assert base_indices(carved(root, tmp_path, **{"data.split_seed": 1})[1]["val"]) != val


def test_carved_items_get_eval_transforms_and_the_rest_train_transforms(tmp_path):
    root = make_folder(tmp_path / "colors", per_class=(16, 4))
    cfg = build_config(tiny_config(root, tmp_path, **{"data.val_split": 0.25, "data.pipeline": "items"}))
    _, ds, _, _, _ = build_data(cfg, CPU)
    eval_view = build_dataset(cfg.data, "train", train=False)
    for i, base in enumerate(base_indices(ds["val"])[:3]):
        assert torch.equal(ds["val"][i]["image"], eval_view[base]["image"])
    first = base_indices(ds["train"])[0]
    assert not torch.equal(ds["train"][0]["image"], eval_view[first]["image"])  # flips and crops: augmented


def test_both_pipelines_validate_on_the_same_carved_images(tmp_path):
    root = make_folder(tmp_path / "colors", per_class=(16, 4))
    _, items_ds, items, _, _ = carved(root, tmp_path, **{"data.pipeline": "items"})
    _, batched_ds, batched, _, info = carved(root, tmp_path, **{"data.pipeline": "batched"})
    assert info["pipeline"].startswith("batched") and base_indices(batched_ds["val"]) == base_indices(items_ds["val"])
    assert batched["val"].augment.train is False and batched["train"].augment.train is True
    # the whole training split evaluated through the batched pipeline: the carved rows are the validation batches
    _, _, whole, _, _ = build_data(
        build_config(tiny_config(root, tmp_path, **{"data.val_split": "train", "data.pipeline": "batched"})), CPU
    )
    every = torch.cat([b["image"] for b in whole["val"]])
    got = torch.cat([b["image"] for b in batched["val"]])
    assert torch.allclose(got, every[base_indices(batched_ds["val"])], atol=1e-5)
    assert torch.cat([b["targets"]["label"] for b in batched["val"]]).tolist() == batched_ds["val"].labels.tolist()
    # validation stores the evaluation views of its own files only; training the cache_size squares of the split
    assert batched["val"].store.view == (32, 32) and len(batched["val"].store.images) == len(batched_ds["val"])
    assert batched["train"].store.view is None and len(batched["train"].store.images) == 48


def test_labels_per_class_draws_from_the_training_part_and_classes_are_kept(tmp_path):
    root = make_folder(tmp_path / "colors", per_class=(16, 4))
    _, ds, _, _, info = carved(root, tmp_path, **{"data.labels_per_class": 5, "data.classes": ["red", "blue"]})
    train, val = base_indices(ds["train"]), base_indices(ds["val"])
    assert len(train) == 10 and not set(train) & set(val)
    assert torch.bincount(ds["train"].labels).tolist() == [5, 5] and torch.bincount(ds["val"].labels).tolist() == [4, 4]
    assert ds["val"].classes == ["red", "blue"] and info["classes"] == ["red", "blue"]


def test_a_fraction_that_empties_a_class_is_refused(tmp_path):
    root = make_folder(tmp_path / "colors", per_class=(4, 2))
    message = user_error("leaves class", carved, root, tmp_path, **{"data.val_split": 0.1})
    assert "'blue' (4 items -> 0 for validation)" in message
    user_error(r"'red' \(4 items -> 4", carved, root, tmp_path, **{"data.val_split": 0.9})


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2])
def test_a_fraction_outside_0_1_is_refused(tmp_path, value):
    raw = tiny_config(tmp_path, tmp_path, **{"data.val_split": value})
    user_error("data.val_split must be a split name or a fraction in", build_config, raw)


def test_selecting_and_reporting_on_one_split_is_refused(tmp_path):
    write_mnist(tmp_path / "fm", gz=False, n=(20, 10))
    raw = tiny_config(tmp_path / "fm", tmp_path, **{"data.name": "fashion_mnist", "data.test_split": "val"})
    user_error("data.test_split 'val' is also data.val_split", build_config, raw)
    raw["data"]["test_split"] = "test"  # val reads the test files: the same images under two names
    cfg = build_config(raw)
    message = user_error("holds the same images as data.val_split 'val'", build_data, cfg, CPU)
    assert "data.val_split: 0.1" in message


def test_selecting_on_a_test_split_warns_how_to_hold_it_out(tmp_path):
    write_mnist(tmp_path / "fm", gz=False, n=(20, 10))
    raw = tiny_config(tmp_path / "fm", tmp_path, **{"data.name": "fashion_mnist"})
    with pytest.warns(UserWarning, match="is its test split") as caught:
        build_data(build_config(raw), CPU)
    assert len(caught) == 1 and "data.val_split=0.1 data.test_split=test" in str(caught[0].message)
    raw["continual"] = {"methods": ["progressive"]}  # continual runs refuse a test split: the advice leaves it out
    with pytest.warns(UserWarning, match="is its test split") as caught:
        build_data(build_config(raw), CPU)
    assert "test_split=test" not in str(caught[0].message) and "data.val_split=0.1" in str(caught[0].message)
    del raw["continual"]
    raw["data"].update(val_split=0.5, test_split="test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, ds, _, _, info = build_data(build_config(raw), CPU)
    assert (info["train_size"], info["val_size"], info["test_size"]) == (10, 10, 10)


def test_a_fraction_of_a_multitask_data_set_is_refused(tmp_path):
    opts = dict(size=32, train_size=8, val_size=4, max_objects=2)
    raw = tiny_config(tmp_path, tmp_path, **{"data.name": "scenes", "data.options": opts, "data.val_split": 0.25})
    raw["data"]["root"] = str(tmp_path / "scenes")
    raw["tasks"] = {"seg": {}}
    message = user_error("carves validation from single-label data sets", build_data, build_config(raw), CPU)
    assert "set data.val_split to one of them" in message
