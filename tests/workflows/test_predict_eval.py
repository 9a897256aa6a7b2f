"""``mtl predict`` and ``mtl eval`` on tiny trained runs, the confusion matrices in TensorBoard, clean errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, make_folder, tiny_config
from PIL import Image
from test_multitask import scenes_config

from mtl.build.data import build_dataset
from mtl.cli import main
from mtl.config.load import build_config
from mtl.workflows.runs import load_model
from mtl.workflows.train import run


def _events(run_dir, eval_split=None):
    """TensorBoard data of the training run, or of the latest ``mtl eval --split eval_split``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    suffix = f".eval_{eval_split}" if eval_split else None
    training = [p for p in files if ".eval_" not in p.name and not p.name.endswith(".test")]  # .test: the test split's
    path = [p for p in files if p.name.endswith(suffix)][-1] if suffix else training[-1]
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("colour")
    summary = run(
        build_config(tiny_config(make_folder(tmp / "colors"), tmp / "runs", **{"train.epochs": 3})), quiet=True
    )
    return Path(summary["run_dir"]), summary


@pytest.fixture(scope="module")
def scenes_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scenes")
    cfg = scenes_config(tmp, "train.epochs=1", "train.log_images=4", "train.log_graph=true")
    summary = run(cfg, quiet=True)
    images = tmp / "images"
    images.mkdir()
    val = build_dataset(cfg.data, "val", train=False)
    for i in range(3):
        Image.fromarray(val.tensors["images"][i].permute(1, 2, 0).numpy()).save(images / f"scene{i}.png")
    return Path(summary["run_dir"]), summary, images


def _clear_images(folder: Path) -> dict:
    """One flat image per colour class, in nested folders; returns file -> class."""
    truth = {}
    for name, rgb in COLORS.items():
        d = folder / "nested" / name
        d.mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), rgb, dtype=np.uint8)).save(d / f"{name}.png")
        truth[str(d / f"{name}.png")] = name
    return truth


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_files_and_folders_topk_csv_and_grid(colour_run, tmp_path, capsys):
    run_dir, _ = colour_run
    truth = _clear_images(tmp_path / "in")
    single = make_folder(tmp_path / "more", per_class=(1, 0)) / "train" / "red" / "0.png"
    assert main(["predict", str(run_dir), str(tmp_path / "in"), str(single), "--topk", "3"]) == 0
    out = capsys.readouterr().out
    rows = _read_csv(run_dir / "predictions" / "predictions.csv")  # the default output folder
    assert len(rows) == 4 and rows[-1]["path"] == str(single)
    assert list(rows[0]) == ["path", "label_top1", "label_p1", "label_top2", "label_p2", "label_top3", "label_p3"]
    for row in rows:
        p = [float(row[f"label_p{k}"]) for k in (1, 2, 3)]
        assert p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-5
        assert sorted(row[f"label_top{k}"] for k in (1, 2, 3)) == ["blue", "green", "red"]
    for row in rows[:3]:
        assert row["label_top1"] == truth[row["path"]], row
    assert (run_dir / "predictions" / "predictions.png").is_file()
    assert "label" in out.splitlines()[0] and f"{rows[0]['label_top1']} (" in out and "4 images" in out

    out_dir = tmp_path / "top1"
    assert main(["predict", str(run_dir), str(single), "--topk", "1", "--out", str(out_dir)]) == 0
    (row,) = _read_csv(out_dir / "predictions.csv")
    assert set(row) == {"path", "label_top1", "label_p1"} and row["label_top1"] == "red"


def test_predict_skips_unreadable_images(colour_run, tmp_path, capsys):
    run_dir, _ = colour_run
    _clear_images(tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(run_dir), str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 0
    assert "skipped 1 of 4 images" in capsys.readouterr().err
    assert len(_read_csv(tmp_path / "o" / "predictions.csv")) == 3
    assert main(["predict", str(run_dir), str(tmp_path / "in" / "broken.png")]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_predict_multitask_writes_overlays_per_dense_task(scenes_run, tmp_path):
    run_dir, _, images = scenes_run
    out = tmp_path / "out"
    assert main(["predict", str(run_dir), str(images), "--out", str(out), "--topk", "2"]) == 0
    rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 3
    assert {"seg_overlay", "depth_overlay", "normal_overlay", "label_top1", "label_p2"} <= set(rows[0])
    for row in rows:
        for task in ("seg", "depth", "normal"):
            with Image.open(row[f"{task}_overlay"]) as im:
                assert im.mode == "RGB" and im.size[0] == im.size[1] > 0
        assert row["label_top1"] in ("sphere", "box", "cylinder")
    assert sorted(p.name for p in out.glob("scene0_*.png")) == [
        "scene0_depth.png",
        "scene0_normal.png",
        "scene0_seg.png",
    ]
    assert (out / "predictions.png").is_file()
    # images saved from the validation set are read back at the run's own input size (32x32 here, not the
    # config's image_size 224): the predictions equal the model's on the data set's own tensors
    loaded = load_model(run_dir)
    assert loaded.input_size == [32, 32]
    from mtl.config.load import dump_config

    dump_config(loaded.cfg, tmp_path / "scenes.yaml")  # from a config: the size of the data set's images
    assert load_model(tmp_path / "scenes.yaml", weights=False).input_size == [32, 32]
    val = build_dataset(loaded.cfg.data, "val", train=False)
    with torch.no_grad():
        logits = loaded.model(torch.stack([val[i]["image"] for i in range(3)]))["label"]
    classes = loaded.classes["label"]
    assert [row["label_top1"] for row in rows] == [classes[i] for i in logits.argmax(1).tolist()]
    # the training run logged overlays of the dense tasks and the label's confusion matrix
    images_logged = _events(run_dir).Tags()["images"]
    assert {"val/overlay_seg", "val/overlay_depth", "val/overlay_normal", "val/confusion_label"} <= set(images_logged)


def test_eval_reproduces_the_best_validation_metrics(colour_run, capsys):
    run_dir, summary = colour_run
    assert "val/confusion_label" in _events(run_dir).Tags()["images"]  # logged by training
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    best = summary["best"]["val"]
    assert metrics["size"] == summary["val_size"] == 24
    assert metrics["tasks"]["label"]["acc"] == best["acc"] == metrics["acc"]
    assert metrics["tasks"]["label"]["loss"] == pytest.approx(best["tasks"]["label"]["loss"], rel=1e-5)
    cm = torch.tensor(metrics["confusion"]["label"]["matrix"])
    assert metrics["confusion"]["label"]["classes"] == ["blue", "green", "red"]
    assert cm.shape == (3, 3) and cm.sum() == 24 and cm.trace() / cm.sum() == pytest.approx(best["acc"])
    assert (run_dir / "eval" / "val" / "confusion_label.png").is_file()
    assert "true \\ predicted" in out and "blue" in out and "acc" in out
    acc = _events(run_dir, "val")
    assert acc.Scalars("eval/val/label/acc")[-1].value == pytest.approx(best["acc"])
    assert "eval/val/confusion_label" in acc.Tags()["images"]

    assert main(["eval", str(run_dir), "--split", "train"]) == 0  # another split of the same data set
    train = json.loads((run_dir / "eval" / "train" / "metrics.json").read_text())
    assert train["size"] == 48 and sum(map(sum, train["confusion"]["label"]["matrix"])) == 48


def test_model_graph_only_when_asked(scenes_run, colour_run):
    from tensorboard.compat.proto.graph_pb2 import GraphDef

    acc = _events(scenes_run[0])
    assert acc.Tags()["graph"]
    graph = (
        GraphDef.FromString(acc.Graph().SerializeToString()) if not isinstance(acc.Graph(), GraphDef) else acc.Graph()
    )
    ops = {node.op for node in graph.node}
    assert any("conv" in op.lower() for op in ops), sorted(ops)[:20]
    assert not _events(colour_run[0]).Tags()["graph"]  # train.log_graph defaults to false


def test_eval_multitask_scores_every_task(scenes_run):
    run_dir, summary, _ = scenes_run
    assert main(["eval", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    best = summary["best"]["val"]["tasks"]
    assert set(metrics["tasks"]) == {"seg", "depth", "normal", "label"} and list(metrics["confusion"]) == ["label"]
    for task, values in best.items():
        for name, value in values.items():
            assert metrics["tasks"][task][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, name)
    assert sum(map(sum, metrics["confusion"]["label"]["matrix"])) == 8


def test_confusion_image_scales_to_many_classes():
    from mtl.engine.visualize import confusion_image, confusion_text

    small = confusion_image(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], "title")
    assert small.dtype == torch.uint8 and small.shape[0] == 3
    big = confusion_image(torch.randint(0, 9, (120, 120)), [f"class{i}" for i in range(120)])
    assert big.shape[0] == 3 and max(big.shape[1:]) < 1000
    assert confusion_text(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"]).splitlines()[1].split() == ["cat", "3", "1"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["predict", "{tmp}/missing", "{img}"], "does not exist"),
        (["eval", "{tmp}/missing"], "does not exist"),
        (["predict", "{run}", "{tmp}/empty"], "no image files found"),
        (["predict", "{run}", "{tmp}/nothing.png"], "does not exist"),
        (["predict", "{run}", "{img}", "--topk", "0"], "--topk"),
        (["eval", "{run}", "--split", "test"], "test"),
        (["eval", "{run}", "--split", "../up"], "--split"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, words, colour_run, tmp_path, capsys):
    run_dir, _ = colour_run
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    args = [a.format(tmp=tmp_path, run=run_dir, img=img) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and words in err and "\n" not in err and "Traceback" not in err


def test_eval_and_predict_bars_stay_out_of_a_redirected_log(colour_run, tmp_path):
    import subprocess
    import sys

    run_dir, _ = colour_run
    folder = run_dir.parents[2] / "colors"  # 72 images: more than one predict batch
    for args in (["eval", str(run_dir)], ["predict", str(run_dir), str(folder), "--out", str(tmp_path / "p")]):
        done = subprocess.run([sys.executable, "-m", "mtl", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "it/s" not in done.stderr and "batch/s" not in done.stderr and "%|" not in done.stderr, done.stderr
