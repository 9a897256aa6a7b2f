"""``mtl summary`` and ``mtl features``: parameter totals, freeze status, multitask and progressive tables, depth,
feature-map grids, clean errors."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_folder, tiny_config
from PIL import Image
from test_progressive_model import OUT, make_net
from torch import nn

from mtl.cli import main
from mtl.config.load import build_config
from mtl.core.errors import UserError
from mtl.models.encoders import build_encoder
from mtl.workflows.inspect import features_command, summary_command, summary_table
from mtl.workflows.runs import load_model
from mtl.workflows.train import run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RESNET18_LAYER4 = 8_393_728  # torchvision resnet18's layer4


def rows(table: str) -> dict:
    """name -> (type, output shape, params, trains) of the table's layer rows."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("=")) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("="))
    out = {}
    for line in lines[start:end]:
        name, kind, rest = line.split(None, 2)
        status = rest.split()[-1] if rest.split()[-1] in ("trainable", "frozen", "partly") else ""
        if status:
            rest = rest[: rest.rindex(status)].rstrip()
        shape, _, params = rest.rpartition(" ")
        out[name] = (kind, shape.strip(), int(params.replace(",", "")), status)
    return out


def totals(table: str) -> tuple:
    def value(label):
        line = next(line for line in table.splitlines() if line.startswith(label))
        return int(line.split(":")[1].replace(",", ""))

    return value("Total params"), value("Trainable params"), value("Non-trainable params")


@pytest.fixture(scope="module")
def resnet_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("r18") / "r18.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "r18",
                "model": {"encoder": "resnet18", "weights": None},
                "tasks": {"label": {"num_classes": 1000}},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    raw = tiny_config(
        make_folder(tmp / "colors", per_class=(4, 2)), tmp / "runs", **{"train.epochs": 1, "train.log_images": 0}
    )
    summary = run(build_config(raw, {}), quiet=True)
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    return Path(summary["run_dir"]), config, tmp / "colors" / "val" / "red" / "0.png", tmp


# ------------------------------------------------------------------------------------------------ summary
def test_resnet18_totals_match_torchvision(resnet_config):
    table = summary_command(str(resnet_config), [], "3,32,32", None)
    assert totals(table) == (11_689_512, 11_689_512, 0)
    r = rows(table)
    assert r["encoder.conv1"] == ("Conv2d", "[-1, 64, 16, 16]", 9408, "trainable")
    assert r["heads.label.0"] == ("Linear", "[-1, 1000]", 513_000, "trainable")
    assert r["encoder.relu"][2] == 0 and r["encoder.relu"][3] == ""
    assert sum(v[2] for v in r.values()) == 11_689_512  # own parameters only: each counted once
    assert "Input size (MB): 0.01" in table and "Params size (MB): 44.59" in table
    assert "Forward/backward pass size (MB)" in table and "Estimated Total Size (MB)" in table
    two = summary_command(str(resnet_config), ["tasks.label.num_classes=2"], "3,32,32", None)
    assert totals(two) == (11_177_538, 11_177_538, 0)


def test_overrides_may_follow_options_on_the_command_line(resnet_config, capsys):
    assert main(["summary", str(resnet_config), "--input", "3,64,64", "model.freeze=all", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "input [3, 64, 64]" in out and "Trainable params: 513,000" in out  # the 1000-class head only
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", str(resnet_config), "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_summary_names_how_inception_and_googlenet_differ_from_torchvision(resnet_config, tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "g", "model": {"encoder": "googlenet", "weights": None}, "tasks": {"label": {"num_classes": 2}}}
        )
    )
    assert main(["summary", str(path), "--input", "3,32,32", "--depth", "0"]) == 0
    title, note = capsys.readouterr().out.splitlines()[:2]
    assert title.startswith("g: encoder googlenet")
    assert note == (
        "note: googlenet is built without its auxiliary classifiers (aux1, aux2) for every model.weights, "
        "and with transform_input=True, as torchvision builds it for its ImageNet weights: inputs "
        "normalised with ImageNet's mean and std are re-normalised to [-1, 1] inside the model"
    )
    with torch.device("meta"):
        inception = build_encoder("inception_v3", transform_input=False)
    assert inception.notes == (
        "inception_v3 is built without its auxiliary classifier (AuxLogits) for every "
        "model.weights, and with transform_input=False (set in model.encoder_options)",
    )
    assert "note:" not in summary_command(str(resnet_config), [], "3,32,32", 0)


def test_freeze_specs_show_trainable_and_frozen(resnet_config):
    table = summary_command(str(resnet_config), ["tasks.label.num_classes=2", "model.freeze=all"], "3,32,32", None)
    assert totals(table) == (11_177_538, 1026, 11_176_512)  # only the 512x2 head trains
    r = rows(table)
    assert r["encoder.layer4.1.conv2"][3] == "frozen" and r["heads.label.0"][3] == "trainable"
    table = summary_command(
        str(resnet_config), ["tasks.label.num_classes=2", "model.freeze={until: layer3}"], "3,32,32", None
    )
    assert totals(table) == (11_177_538, RESNET18_LAYER4 + 1026, 11_177_538 - RESNET18_LAYER4 - 1026)
    r = rows(table)
    assert r["encoder.layer3.1.bn2"][3] == "frozen" and r["encoder.layer4.0.conv1"][3] == "trainable"


def test_depth_limits_rows_and_collapses_subtrees(resnet_config):
    table = summary_command(str(resnet_config), ["model.freeze={until: layer3}"], "3,64,64", 1)
    r = rows(table)
    assert all(name.count(".") <= 1 for name in r)
    assert r["encoder.layer4"] == ("Module", "[-1, 512, 2, 2]", RESNET18_LAYER4, "trainable")
    assert r["encoder.layer3"][1:] == ("[-1, 256, 4, 4]", 2_099_712, "frozen")
    assert r["heads.label"][1:] == ("[-1, 1000]", 513_000, "trainable")
    assert sum(v[2] for v in r.values()) == 11_689_512
    top = rows(summary_command(str(resnet_config), [], "3,64,64", 0))
    assert list(top) == ["encoder", "heads"] and top["encoder"][1].startswith("out: [-1, 512]")


def test_multitask_table_lists_every_head(tmp_path, capsys):
    args = [
        "summary",
        str(CONFIGS / "mtl_scenes.yaml"),
        f"data.root={tmp_path / 'scenes'}",
        "data.options={size: 32, train_size: 4, val_size: 2}",
        "model.encoder_options.widths=[8,16,16,32]",
        "model.freeze=all",
        "--input",
        "3,32,32",
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    r = rows(table)
    for task in ("seg", "depth", "normal", "label"):
        assert any(name.startswith(f"heads.{task}.") for name in r), task
    assert r["heads.seg.classifier"][1] == "[-1, 6, 16, 16]"
    assert r["heads.label.0"][1] == "[-1, 3]"
    assert all(v[3] == "frozen" for n, v in r.items() if n.startswith("encoder.") and v[2])
    total, trainable, frozen = totals(table)
    assert frozen == sum(v[2] for n, v in r.items() if n.startswith("encoder."))
    assert trainable == sum(v[2] for n, v in r.items() if n.startswith("heads."))


def test_progressive_net_table_shows_frozen_column():
    net = make_net(("a", "b"))
    net.train()
    modes = {n: m.training for n, m in net.named_modules()}
    table = summary_table(net, (3, 32, 32), forward=lambda x: net(x, task="b"))
    assert {n: m.training for n, m in net.named_modules()} == modes  # modes restored
    r = rows(table)
    col0 = {n: v for n, v in r.items() if n.startswith("columns.0.") and v[2]}
    col1 = {n: v for n, v in r.items() if n.startswith("columns.1.") and v[2]}
    assert col0 and all(v[3] == "frozen" for v in col0.values())
    assert col1 and all(v[3] == "trainable" for v in col1.values())
    assert r["columns.1.laterals.0"] == ("LateralAdapter", "[-1, 16, 8, 8]", 1, "trainable")  # its alpha
    assert r["columns.1.head.0"][1] == f"[-1, {OUT['b']}]"
    counts = [net.column_parameters(t)["total"] for t in ("a", "b")]
    assert totals(table) == (sum(counts), counts[1], counts[0])


def test_summary_of_a_run_and_a_bad_input(tiny_run, capsys):
    run_dir, *_ = tiny_run
    table = summary_command(str(run_dir), [], None, None)
    model = load_model(run_dir).model
    assert totals(table)[0] == sum(p.numel() for p in model.parameters())
    assert "[-1, 8, 16, 16]" in table  # stage1 at the run's image size (32)
    capsys.readouterr()
    assert main(["summary", str(run_dir), "--input", "3,x,2"]) == 2
    assert "C,H,W" in capsys.readouterr().err


QUICKSTART = ["tasks.label.num_classes=10"]  # the class count: no data rendered
HEAD = 128 * 10 + 10  # the quickstart's linear head on small_cnn's 128 features


def test_summary_of_a_staged_config_shows_its_last_stage_or_the_one_named(capsys):
    config = str(CONFIGS / "quickstart.yaml")
    assert main(["summary", config, *QUICKSTART]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("from_scratch: encoder small_cnn")
    assert lines[1] == (
        "note: stage from_scratch, the last of pretrain, fixed_features, partial, full_finetune, from_scratch "
        "(--stage NAME picks another)"
    )
    total, trainable, _ = totals("\n".join(lines))
    assert trainable == total > HEAD  # freeze: none
    fixed = summary_command(config, QUICKSTART, None, None, "fixed_features")
    assert fixed.startswith("fixed_features: encoder small_cnn") and "freeze 'all'" in fixed.splitlines()[0]
    assert fixed.splitlines()[1] == (
        "note: stage fixed_features starts from stage pretrain's trained weights: shown is its architecture, "
        "built without them"
    )
    assert totals(fixed) == (total, HEAD, total - HEAD)  # only the new head trains
    assert rows(summary_command(config, QUICKSTART, None, None, "partial"))["encoder.stage3.0.0"][3] == "trainable"
    with pytest.raises(UserError, match="stage 'partial' starts from stage 'pretrain'.*/quickstart/<time>/partial"):
        load_model(config, QUICKSTART, weights=True, stage="partial")  # a config alone has no trained stage


def test_summary_of_a_staged_run_reads_the_stages_run_and_unknown_stages_are_one_line(tiny_run, tmp_path, capsys):
    from test_bad_input import refused

    run_dir, config, *_ = tiny_run
    root = tmp_path / "staged"
    shutil.copytree(run_dir, root / "b")
    raw = yaml.safe_load(config.read_text())
    (root / "config.yaml").write_text(yaml.safe_dump({**raw, "stages": [{"name": "a"}, {"name": "b"}]}))
    table = summary_command(str(root), [], None, None)
    assert f"(run {root / 'b'})" in table.splitlines()[0]
    assert totals(table) == totals(summary_command(str(run_dir), [], None, None))
    refused(capsys, ["summary", root, "--stage", "a"], "stage a of", "has not run yet", f"--resume {root}")
    refused(capsys, ["summary", root, "--stage", "c"], "--stage c: no such stage; the stages are a, b")
    refused(capsys, ["summary", CONFIGS / "quickstart.yaml", "--stage", "c"], "pretrain, fixed_features, partial")
    refused(capsys, ["summary", config, "--stage", "a"], "--stage a:", "has no stages")


# ------------------------------------------------------------------------------------------------ features
def test_features_conv_writes_one_grid_per_convolution(tiny_run):
    run_dir, _, image, _ = tiny_run
    paths = features_command(str(run_dir), [], str(image), "conv", None, 64)
    model = load_model(run_dir).model
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(paths) == len(convs) == 8
    assert all(p.parent == run_dir / "features" and p.is_file() for p in paths)
    assert [p.name for p in paths] == [f"{i:02d}_{n}.png" for i, n in enumerate(convs)]  # forward order
    with Image.open(paths[0]) as im:  # 8 maps of 16x16 enlarged to 32x32, 3 per row, 1 px padding
        assert im.size == (3 * 33 + 1, 3 * 33 + 1)
    for p in paths:
        with Image.open(p) as im:
            assert 32 < im.size[0] < 400 and 32 < im.size[1] < 400
    few = features_command(str(run_dir), [], str(image), "conv", str(run_dir / "few"), 4)
    with Image.open(few[-1]) as im:  # 4 maps: 2 x 2
        assert im.size == (2 * 33 + 1, 2 * 33 + 1)


def test_features_globs_names_and_config(tiny_run):
    run_dir, config, image, tmp = tiny_run
    paths = features_command(str(run_dir), [], str(image), "encoder.stage*.0.0", str(tmp / "glob"), 64)
    assert [p.name for p in paths] == [f"{i:02d}_encoder.stage{i + 1}.0.0.png" for i in range(4)]
    with pytest.warns(UserWarning, match="skipped 3"):  # heads, heads.label, heads.label.0: no 4-D map
        paths = features_command(str(run_dir), [], str(image), "encoder.stage4, heads*", str(tmp / "mixed"), 64)
    assert [p.name for p in paths] == ["00_encoder.stage4.png"]
    paths = features_command(str(config), [], str(image), "encoder.stage1", None, 64)  # weights: null
    assert paths == [tmp / "runs" / "features" / "tiny" / "00_encoder.stage1.png"] and paths[0].is_file()


def test_features_errors(tiny_run, capsys):
    run_dir, _, image, tmp = tiny_run
    with pytest.raises(UserError, match="close names: .*encoder.stage1"):
        features_command(str(run_dir), [], str(image), "encoder.stage9", None, 64)
    assert main(["features", str(run_dir), "--image", str(tmp / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["features", str(run_dir), "--image", str(image), "--layers", "nothing_like_it"]) == 2
    assert "top-level modules: encoder, heads" in capsys.readouterr().err


def test_summary_of_an_architecture_counts_its_shared_and_task_owned_parameters(tiny_run):
    config = tiny_run[1]
    # the architecture only, as for one encoder: no expert reads model.weights
    overrides = ["model.arch=mmoe", "model.arch_options={num_experts: 2}", "model.weights=/nowhere/w.pth"]
    table = summary_command(str(config), overrides, None, 2)
    note = next(line for line in table.splitlines() if line.startswith("note: model.arch=mmoe"))
    r = rows(table)
    experts = r["encoder.shared.0"][2] + r["encoder.shared.1"][2]
    assert f"{experts:,} shared parameters" in note and "shared representation: the shared experts'" in note
    total = totals(table)[0]
    assert f"{total - experts:,} task-owned" in note  # gates and heads
    refused = summary_command(str(config), ["model.arch=cross_stitch"], None, 1)
    assert "shared representation: none (grad_on=representation is refused)" in refused
