"""Bad input, end to end through the ``mtl`` CLI (in-process).

The rule: bad input gets one line that says what is wrong and how to fix it, exit code 2, no traceback, and
nothing already written is lost. Unreadable single images inside an otherwise fine data set are skipped with
one warning and counted. Every row of the README's "Bad input" table is a test (here, unless the row names
another file); the fuzz tests at the end feed random files, random YAML documents and random overrides and
accept only success or a UserError.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import COLORS, make_folder, tiny_config
from PIL import Image

import mtl.workflows.train  # noqa: F401  (imported before any test drops privileges: main() imports it lazily)
from mtl.cli import main
from mtl.config.load import build_config, load_config, parse_override
from mtl.config.schema import Config
from mtl.core.errors import UserError
from mtl.core.runtime import select_device
from mtl.data.decoded import _decode_file
from mtl.data.folder import folder
from mtl.data.image_files import load_rgb
from mtl.engine.monitor import load_baseline
from mtl.models.encoders import build_encoder

WIDTHS = [8, 16, 16, 32]  # tiny_config's small_cnn
PER_CLASS = (4, 2)  # train, val images per class: 12 train and 6 val images


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", per_class=PER_CLASS, size=16)


def write_config(tmp_path: Path, root: Path, name: str = "c.yaml", **overrides) -> Path:
    """tiny_config (one epoch) as a YAML file in ``tmp_path``; its runs go to ``tmp_path/runs``."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_config(root, tmp_path / "runs", **{"train.epochs": 1, **overrides})))
    return path


def refused(capsys, args, *words: str, runs: Path | None = None) -> str:
    """Run the CLI; it must exit 2 with one ``mtl: error:`` line holding ``words``, no traceback, no run dir."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("mtl: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    if runs is not None:
        assert not runs.exists(), "a refused run left a run directory behind"
    return lines[0]


def trained(capsys, args, runs: Path) -> tuple[dict, list[str]]:
    """Run the CLI; it must exit 0 with one run. Returns its summary and the non-empty stderr lines."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    (run_dir,) = [p for p in (runs / "tiny").iterdir() if p.is_dir()]
    return json.loads((run_dir / "summary.json").read_text()), [line for line in err.splitlines() if line.strip()]


def jpeg_bytes(seed: int = 0, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------- images: skipped or converted


def test_corrupt_and_truncated_images_are_skipped_and_counted(data, tmp_path, capsys):
    red = data / "train" / "red"
    (red / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    whole = jpeg_bytes()
    (red / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    summary, err = trained(capsys, ["train", write_config(tmp_path, data)], tmp_path / "runs")
    assert summary["skipped_images"] == 2 and summary["train_size"] == 12 and summary["val_size"] == 6
    assert len(err) == 1, err  # one warning, one line, naming the files
    assert err[0].startswith("mtl: warning: skipped 2 of 14 train images") and "corrupt.jpg" in err[0]
    assert "truncated.jpg" in err[0]


def _grey(path: Path) -> tuple:
    Image.new("L", (20, 20), 120).save(path.with_suffix(".png"))
    return (120, 120, 120)


def _cmyk_jpeg(path: Path) -> tuple:
    Image.new("CMYK", (20, 20), (0, 160, 140, 30)).save(path.with_suffix(".jpg"), quality=95)
    return Image.new("CMYK", (1, 1), (0, 160, 140, 30)).convert("RGB").getpixel((0, 0))


def _png16(path: Path) -> tuple:
    image = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    image.save(path.with_suffix(".png"))
    assert Image.open(path.with_suffix(".png")).mode == "I;16"
    return (156, 156, 156)  # 40000 / 256: rescaled, not clipped at 255


def _rgba(path: Path) -> tuple:
    Image.new("RGBA", (20, 20), (40, 200, 60, 128)).save(path.with_suffix(".png"))
    return tuple(round(255 + (c - 255) * 128 / 255) for c in (40, 200, 60))  # over white


def _palette_transparent(path: Path) -> tuple:
    image = Image.new("P", (20, 20), 0)  # index 0 everywhere, and index 0 is transparent
    image.putpalette([0, 0, 0, 40, 200, 60] + [0] * 762)
    image.save(path.with_suffix(".png"), transparency=0)
    return (255, 255, 255)  # transparency becomes white, not black


@pytest.mark.parametrize(
    "make",
    [_grey, _cmyk_jpeg, _png16, _rgba, _palette_transparent],
    ids=["L", "CMYK-jpeg", "I;16-png", "RGBA-png", "P-transparency-png"],
)
def test_other_image_modes_are_converted_and_train(make, data, tmp_path, capsys):
    for name in COLORS:
        expected = make(data / "train" / name / "odd")
    (odd,) = (data / "train" / "red").glob("odd.*")
    for rgb in (np.asarray(load_rgb(str(odd))), _decode_file(str(odd), 8)[0]):  # per-item and batched decoders
        assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3
        assert np.abs(rgb.reshape(-1, 3).astype(int) - expected).max() <= 6, (rgb[0, 0], expected)
    summary, err = trained(capsys, ["train", write_config(tmp_path, data)], tmp_path / "runs")
    assert summary["skipped_images"] == 0 and summary["train_size"] == 15 and not err


# --------------------------------------------------------------------------- data layout


def _empty_class(root: Path) -> str:
    shutil.rmtree(root / "train" / "red")
    (root / "train" / "red").mkdir()
    return f"class folder(s) {root / 'train' / 'red'} hold no images"


def _empty_split(root: Path) -> str:
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    return f"no class folders in {root / 'val'}"


def _missing_root(root: Path) -> str:
    shutil.rmtree(root)
    return f"data root {root} does not exist or is not a folder"


def _root_is_a_file(root: Path) -> str:
    shutil.rmtree(root)
    root.write_text("not a folder")
    return f"data root {root} does not exist or is not a folder"


def _mismatched_classes(root: Path) -> str:
    (root / "val" / "red").rename(root / "val" / "purple")
    return "in train but not in val: red; in val but not in train: purple"


@pytest.mark.parametrize(
    "damage",
    [_empty_class, _empty_split, _missing_root, _root_is_a_file, _mismatched_classes],
    ids=["empty-class-folder", "empty-split-folder", "missing-root", "root-is-a-file", "mismatched-classes"],
)
def test_bad_data_layout_is_refused(damage, data, tmp_path, capsys):
    config = write_config(tmp_path, data)
    words = damage(data)
    line = refused(capsys, ["train", config], words, runs=tmp_path / "runs")
    assert any(hint in line for hint in ("add images", "put each class", "set data.root", "same class folders"))


def test_fashion_mnist_without_its_files_is_refused(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(
        capsys,
        ["train", write_config(tmp_path, data), "data.name=fashion_mnist", f"data.root={empty}"],
        "Fashion-MNIST files not found",
        "train-images-idx3-ubyte",
        str(empty),
        "apt-get install",
        "data.options.download=true",
        runs=tmp_path / "runs",
    )


def test_wrong_class_count_is_refused(data, tmp_path, capsys):
    refused(
        capsys,
        ["train", write_config(tmp_path, data), "tasks.label.num_classes=7"],
        "tasks.label.num_classes is 7 but the data has 3 classes (blue, green, red)",
        "fix num_classes",
        runs=tmp_path / "runs",
    )


# --------------------------------------------------------------------------- configs and overrides


def _nested_unknown_key(tmp_path: Path, root: Path) -> tuple:
    raw = tiny_config(root, tmp_path / "runs")
    raw["tasks"] = {"label": {"head": {"name": "mlp", "hiden": 16}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return [tmp_path / "c.yaml"], ["unknown config key 'tasks.label.head.hiden'", "c.yaml", "did you mean hidden"]


def _wrong_type(tmp_path: Path, root: Path) -> tuple:
    return [write_config(tmp_path, root), "train.epochs=three"], [
        "'train.epochs'",
        "must be an integer",
        "'three'",
        "command-line overrides",
    ]


def _override_unknown_key(tmp_path: Path, root: Path) -> tuple:
    return [write_config(tmp_path, root), "optim.lrr=0.1"], [
        "unknown config key 'optim.lrr'",
        "command-line overrides",
        "did you mean lr",
    ]


def _override_unknown_section(tmp_path: Path, root: Path) -> tuple:
    return [write_config(tmp_path, root), "optimizer.lr=0.1"], [
        "unknown config key 'optimizer'",
        "(set in command-line overrides)",
        "optim",
    ]


def _yaml_syntax_error(tmp_path: Path, root: Path) -> tuple:
    (tmp_path / "c.yaml").write_text("name: tiny\ntrain: {epochs: 1\noptim: {lr: 0.1}\n")
    return [tmp_path / "c.yaml"], ["cannot parse config", "line 3, column 6", "fix the YAML"]


def _not_a_mapping(tmp_path: Path, root: Path) -> tuple:
    (tmp_path / "c.yaml").write_text("- name: tiny\n- train: {epochs: 1}\n")
    return [tmp_path / "c.yaml"], ["must be a mapping of keys to values, not a list"]


def _missing_config(tmp_path: Path, root: Path) -> tuple:
    return [tmp_path / "nope.yaml"], [f"config file not found: {tmp_path / 'nope.yaml'}"]


def _base_cycle(tmp_path: Path, root: Path) -> tuple:
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    return [tmp_path / "a.yaml"], ["a.yaml inherits from itself through _base_"]


def _missing_base(tmp_path: Path, root: Path) -> tuple:
    (tmp_path / "c.yaml").write_text("_base_: gone.yaml\nname: tiny\n")
    return [tmp_path / "c.yaml"], [f"config file not found: {tmp_path / 'gone.yaml'} (a _base_ of"]


def _alias_cycle(tmp_path: Path, root: Path) -> tuple:
    (tmp_path / "c.yaml").write_text("name: tiny\ndata: &d {options: *d}\n")
    return [tmp_path / "c.yaml"], ["contains itself through a YAML alias"]


@pytest.mark.parametrize(
    "case",
    [
        _nested_unknown_key,
        _wrong_type,
        _override_unknown_key,
        _override_unknown_section,
        _yaml_syntax_error,
        _not_a_mapping,
        _missing_config,
        _base_cycle,
        _missing_base,
        _alias_cycle,
    ],
    ids=lambda f: f.__name__.strip("_").replace("_", "-"),
)
def test_bad_config_is_refused(case, data, tmp_path, capsys):
    args, words = case(tmp_path, data)
    refused(capsys, ["train", *args], *words, runs=tmp_path / "runs")


@pytest.mark.parametrize("item", ["train.epochs", "=3", "a..b=1", "train.epochs=[1,"])
def test_bad_override_syntax_is_refused(item, data, tmp_path, capsys):
    refused(
        capsys,
        ["train", write_config(tmp_path, data), item],
        f"bad override {item!r}",
        "key.sub=value" if "[" not in item else "not valid YAML",
        runs=tmp_path / "runs",
    )


# --------------------------------------------------------------------------- runs, weights and checkpoints


def test_missing_run_dir_is_refused(data, tmp_path, capsys):
    config = write_config(tmp_path, data)
    missing = tmp_path / "runs" / "x"
    refused(capsys, ["train", missing / "config.yaml"], f"config file not found: {missing / 'config.yaml'}")
    refused(
        capsys,
        ["train", config, f"model.weights=run:{missing}"],
        f"run:{missing}: no such run directory",
        runs=tmp_path / "runs",
    )
    refused(capsys, ["train", "--resume", missing], f"cannot resume {missing}", "is it a run directory?")
    weights = tmp_path / "encoder.pt"
    torch.save(build_encoder("small_cnn", widths=WIDTHS).state_dict(), weights)
    refused(
        capsys,
        ["train", config, f"model.weights=run:{weights}"],
        "is a file, not a run directory",
        f"model.weights={weights} (without run:)",
        runs=tmp_path / "runs",
    )


@pytest.fixture
def world_readable_tmp():
    """A temporary folder that user nobody can read: a test that drops root's rights still reaches its files."""
    old_umask = os.umask(0o022)
    folder = Path(tempfile.mkdtemp(prefix="mtl-bad-input-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        os.umask(old_umask)
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def unreadable(path: Path):
    """``chmod 000 path`` for the block; as root, who reads everything, also act as user nobody meanwhile."""
    path.chmod(0)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            try:
                os.seteuid(65534)
            except OSError:
                pytest.skip("running as root without the right to drop to user nobody")
        if os.access(path / "config.yaml", os.F_OK, effective_ids=os.access in os.supports_effective_ids):
            pytest.skip(f"{path} stays readable after chmod 000 on this file system")
        yield
    finally:
        if as_root:
            os.seteuid(0)
        path.chmod(0o755)


def test_unreadable_run_dir_is_refused(world_readable_tmp, capsys):
    tmp = world_readable_tmp
    root = make_folder(tmp / "data", per_class=PER_CLASS, size=16)
    config = write_config(tmp, root)
    run = tmp / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config.read_text())
    torch.save({"model": build_encoder("small_cnn", widths=WIDTHS).state_dict()}, run / "checkpoints" / "best.pt")
    with unreadable(run):
        first = main(["train", str(run / "config.yaml")])
        err_config = capsys.readouterr().err
        second = main(["train", str(config), f"model.weights=run:{run}"])
        err_weights = capsys.readouterr().err
    for code, err, words in (
        (first, err_config, f"cannot read config {run / 'config.yaml'}: permission denied"),
        (second, err_weights, f"run:{run}: permission denied reading {run}"),
    ):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("mtl: error: ") and words in lines[0] and "readable" in lines[0], lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # the old run is untouched
    assert not (tmp / "runs").exists()


def test_weights_file_that_is_not_a_torch_file_is_refused(data, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    refused(
        capsys,
        ["train", write_config(tmp_path, data), f"model.weights={junk}"],
        f"could not read weights file {junk}: it is not a PyTorch file",
        "torch.save",
        runs=tmp_path / "runs",
    )
    assert junk.stat().st_size == 1000


def test_damaged_and_pickled_weights_files_are_refused(data, tmp_path, capsys):
    config = write_config(tmp_path, data)
    good = tmp_path / "good.pt"
    torch.save(build_encoder("small_cnn", widths=WIDTHS).state_dict(), good)
    truncated, empty, module = tmp_path / "truncated.pt", tmp_path / "empty.pt", tmp_path / "module.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty.write_bytes(b"")
    torch.save(torch.nn.Linear(2, 2), module)
    refused(capsys, ["train", config, f"model.weights={truncated}"], "it is damaged or truncated")
    refused(capsys, ["train", config, f"model.weights={empty}"], "it is empty (0 bytes)")
    refused(
        capsys,
        ["train", config, f"model.weights={module}"],
        "pickled Python object",
        "state_dict()",
        runs=tmp_path / "runs",
    )


def test_weights_of_another_architecture_list_the_mismatched_keys(data, tmp_path, capsys):
    other = tmp_path / "wider.pt"
    torch.save(build_encoder("small_cnn", widths=[4, 8, 8, 16]).state_dict(), other)
    refused(
        capsys,
        ["train", write_config(tmp_path, data), f"model.weights={other}"],
        f"weights {other} do not fit encoder small_cnn",
        "shape mismatches",
        "stage1.0.0.weight (4, 3, 3, 3) in file vs (8, 3, 3, 3) in model",
        runs=tmp_path / "runs",
    )


# --------------------------------------------------------------------------- a directory where a file belongs


def test_directory_given_as_weights_file_is_refused(data, tmp_path, capsys):
    folder = tmp_path / "some_dir"
    folder.mkdir()
    refused(
        capsys,
        ["train", write_config(tmp_path, data), f"model.weights={folder}"],
        f"weights {folder} is a directory, not a file",
        f"run:{folder}",
        runs=tmp_path / "runs",
    )


def test_directory_given_as_config_is_refused(data, tmp_path, capsys):
    run = tmp_path / "old_run"
    run.mkdir()
    refused(capsys, ["train", run], f"config {run} is a directory, not a config file")
    (run / "config.yaml").write_text(write_config(tmp_path, data).read_text())
    refused(capsys, ["train", run], f"did you mean {run / 'config.yaml'}?")


def test_directory_given_to_weights_import_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    refused(capsys, ["weights", "import", tmp_path], f"{tmp_path} is a directory; give the weights file itself")


def test_directory_given_as_baseline_file_is_refused(data, tmp_path, capsys):
    refused(
        capsys,
        ["train", write_config(tmp_path, data), f"train.baseline={tmp_path}"],
        f"baseline file {tmp_path} is a directory",
    )


@pytest.mark.parametrize("override", ["train.monitor=foo", "train.baseline=missing.yaml"])
def test_bad_monitor_or_baseline_leaves_no_run_directory(override, data, tmp_path, capsys):
    refused(
        capsys,
        ["train", write_config(tmp_path, data), override],
        "train.monitor" if "monitor" in override else "baseline file",
        runs=tmp_path / "runs",
    )


def test_file_where_the_output_folder_belongs_is_refused(data, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("keep me")
    refused(capsys, ["train", write_config(tmp_path, data)], f"{blocker} is a file, but a folder is needed there")
    assert blocker.read_text() == "keep me"


# --------------------------------------------------------------------------- numbers, names, keys given twice


BAD_NUMBERS = [
    ("train.grad_clip=-1", ["'train.grad_clip'", "must be > 0", "null turns clipping off", "got -1.0"]),
    ("train.grad_clip=0", ["'train.grad_clip'", "must be > 0"]),
    ("optim.lr=-1", ["'optim.lr'", "must be > 0", "got -1.0"]),
    ("optim.lr=0", ["'optim.lr'", "must be > 0"]),
    ("optim.lr=.nan", ["'optim.lr'", "must be a finite number", "got nan"]),
    ("optim.lr=.inf", ["'optim.lr'", "must be a finite number", "got inf"]),
    ("optim.momentum=-0.9", ["'optim.momentum'", "must be >= 0"]),
    ("optim.weight_decay=-1e-4", ["'optim.weight_decay'", "must be >= 0"]),
    ("optim.betas=[0.9, 1.0]", ["'optim.betas.1'", "must be >= 0 and < 1"]),
    ("sched.gamma=-0.1", ["'sched.gamma'", "must be > 0"]),
    ("data.num_workers=-1", ["'data.num_workers'", "must be >= 0"]),
    ("train.seed=-1", ["'train.seed'", "must be >= 0 and <= 4294967295"]),
    ("train.seed=4294967296", ["'train.seed'", "must be >= 0 and <= 4294967295"]),
    ("train.device=tpu", ["train.device must be auto, cpu, cuda, cuda:N (GPU number N) or mps, got 'tpu'"]),
    ("train.device=cuda:x", ["train.device must be auto, cpu, cuda, cuda:N"]),
]


@pytest.mark.parametrize("override, words", BAD_NUMBERS, ids=[override for override, _ in BAD_NUMBERS])
def test_bad_numbers_and_devices_are_refused(override, words, data, tmp_path, capsys):
    refused(
        capsys,
        ["train", write_config(tmp_path, data), override],
        *words,
        "(set in command-line overrides)",
        runs=tmp_path / "runs",
    )


def test_device_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        UserError, match=r"train.device is 'cuda:2' but this machine has 2 CUDA GPU\(s\), numbered from 0"
    ):
        select_device("cuda:2")
    with pytest.raises(UserError, match="train.device is 'mps' but no Apple-silicon GPU"):
        select_device("mps")


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs/x", "..", "a\\b", ""], ids=repr)
def test_run_name_that_leaves_out_dir_is_refused(name, data, tmp_path, capsys):
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    refused(
        capsys,
        ["train", write_config(work, data), f"name={name or repr(name)}"],
        "name must be a plain folder name",
        f"got {name!r}",
        "set out_dir",
        runs=work / "runs",
    )
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "data" not in p.parts)
    assert written == ["deep", "deep/er", "deep/er/c.yaml"]  # nothing in out_dir, nor beside or above it


def test_stage_name_that_leaves_the_run_is_refused(data, tmp_path, capsys):
    raw = tiny_config(data, tmp_path / "runs", **{"train.epochs": 1})
    raw["stages"] = [{"name": "ok"}, {"name": "../escape"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    refused(
        capsys,
        ["train", tmp_path / "c.yaml"],
        "name must be a plain folder name",
        "'../escape'",
        "stage '../escape'",
        runs=tmp_path / "runs",
    )


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    # YAML 1.1 reads 1e-3 as text; configs read it as YAML 1.2 does, and leave text such as versions alone
    (tmp_path / "c.yaml").write_text(
        "name: 1.2.3\noptim: {lr: 1e-3, weight_decay: 5E-4, momentum: 9e-1}\n"
        "sched: {final_div_factor: 1e4}\ndata: {options: {a: 1e, b: e5, c: 1.0e-3}}\n"
    )
    cfg = build_config(*load_config(tmp_path / "c.yaml"))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == (0.001, 0.0005, 0.9)
    assert cfg.sched.final_div_factor == 10000.0 and cfg.name == "1.2.3"
    assert cfg.data.options == {"a": "1e", "b": "e5", "c": 0.001}
    cfg = build_config(*load_config(tmp_path / "c.yaml", ["optim.lr=3e-4", "optim.weight_decay=1E5"]))
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.0003, 100000.0)
    assert parse_override("x=-2.5e-4") == (["x"], -2.5e-4) and parse_override("x=+1_0e+2") == (["x"], 1000.0)
    assert parse_override("x=1.2.3") == (["x"], "1.2.3") and parse_override("x=12e") == (["x"], "12e")
    assert parse_override("x=0x1e") == (["x"], 30)  # a hex integer stays an integer
    (tmp_path / "base.yaml").write_text("label: {acc: 9e-1}\n")
    assert load_baseline(tmp_path / "base.yaml") == {"label": {"acc": 0.9}}


def _duplicate_in_file(tmp_path: Path, root: Path) -> tuple:
    text = write_config(tmp_path, root).read_text()
    first, second = text.splitlines().index("optim:") + 1, len(text.splitlines()) + 1
    (tmp_path / "c.yaml").write_text(text + "optim:\n  lr: 0.1\n  name: sgd\n")  # a second optim section, at the end
    return [tmp_path / "c.yaml"], [
        f"cannot parse config {tmp_path / 'c.yaml'}: line {second}, column 1: key 'optim' "
        f"is given twice (also on line {first})",
        "keep one",
        "fix the YAML there",
    ]


def _duplicate_nested(tmp_path: Path, root: Path) -> tuple:
    (tmp_path / "c.yaml").write_text("name: tiny\noptim:\n  lr: 0.1\n  momentum: 0.5\n  lr: 0.2\n")
    return [tmp_path / "c.yaml"], ["c.yaml: line 5, column 3: key 'optim.lr' is given twice (also on line 3)"]


def _duplicate_in_base(tmp_path: Path, root: Path) -> tuple:
    (tmp_path / "base.yaml").write_text("data: {batch_size: 4, batch_size: 8}\n")
    (tmp_path / "c.yaml").write_text("_base_: base.yaml\n")
    return [tmp_path / "c.yaml"], [
        f"config {tmp_path / 'base.yaml'} (a _base_ of",
        "line 1, column 23: key 'data.batch_size' is given twice (also on line 1)",
    ]


def _duplicate_in_override_value(tmp_path: Path, root: Path) -> tuple:
    return [write_config(tmp_path, root), "data.options={verify: true, verify: false}"], [
        "bad override",
        "key 'data.options.verify' is given twice",
    ]


@pytest.mark.parametrize(
    "case",
    [_duplicate_in_file, _duplicate_nested, _duplicate_in_base, _duplicate_in_override_value],
    ids=lambda f: f.__name__.strip("_").replace("_", "-"),
)
def test_key_given_twice_is_refused(case, data, tmp_path, capsys):
    args, words = case(tmp_path, data)
    refused(capsys, ["train", *args], *words, runs=tmp_path / "runs")


def test_yaml_merge_keys_may_still_override_merged_values(tmp_path):
    (tmp_path / "c.yaml").write_text("_anchors: &opt {name: adam, lr: 0.1}\noptim: {<<: *opt, lr: 0.01}\n")
    raw, _ = load_config(tmp_path / "c.yaml")
    assert raw["optim"] == {"name": "adam", "lr": 0.01}
    raw, _ = load_config(tmp_path / "c.yaml", ["optim.lr=0.1", "optim.lr=0.2"])  # on the command line the last wins
    assert raw["optim"]["lr"] == 0.2


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# settings to come\n", "---\n"], ids=["empty", "blank", "comment", "doc-start"]
)
def test_empty_config_file_is_refused(text, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    refused(
        capsys,
        ["train", tmp_path / "c.yaml"],
        f"config {tmp_path / 'c.yaml'} is empty (no settings in it)",
        "configs/quickstart.yaml",
        runs=tmp_path / "runs",
    )


# --------------------------------------------------------------------------- the command line, compare


@pytest.mark.parametrize(
    "args, words",
    [
        (
            [],
            [
                "mtl needs a command: train, sweep, summary, features, predict, eval, compare, lr-find, weights",
                "(see mtl --help)",
            ],
        ),
        (["weights"], ["mtl weights needs a command: import, list"]),
        (["trian"], ["invalid choice: 'trian'", "(see mtl --help)"]),
        (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    ],
    ids=["no-command", "no-weights-action", "unknown-command", "unknown-option"],
)
def test_command_line_mistakes_are_one_line(args, words, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's way out, with exit code 2
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtl: error: ") and all(w in lines[0] for w in words), lines


def _summary_with(path: Path, metrics: dict) -> Path:
    path.mkdir(parents=True)
    summary = {
        "weighting": "",
        "tasks": {"label": {"directions": {"acc": True, "loss": False}}},
        "best": {"val": {"tasks": {"label": metrics}}},
        "final": {"val": {"tasks": {"label": metrics}}},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_compare_refuses_unknown_metrics(tmp_path, capsys):
    run = _summary_with(tmp_path / "run", {"acc": 0.75, "loss": 0.5})
    refused(
        capsys, ["compare", run, "--metrics", "acc,nope"], "--metrics: no run reports nope", "the runs report acc, loss"
    )
    assert main(["compare", str(run), "--metrics", "loss, acc"]) == 0  # loss is shown when asked for
    table = capsys.readouterr().out.splitlines()
    assert table[2] == "| group | n | label.acc | label.loss |" and table[4].endswith("| 1 | 0.7500 | 0.5000 |")


# --------------------------------------------------------------------------- symlinks, pickles, resume


def test_symlink_loop_in_a_class_folder_is_not_followed(data, tmp_path, capsys):
    loop = data / "train" / "red" / "loop"
    try:
        os.symlink("..", loop, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks on this file system")
    summary, err = trained(capsys, ["train", write_config(tmp_path, data), "data.pipeline=items"], tmp_path / "runs")
    assert summary["train_size"] == 12 and summary["val_size"] == 6  # not 1,968 "images", other classes as red
    assert (
        len(err) == 1
        and err[0].startswith("mtl: warning: did not search 1 symlinked folder(s)")
        and str(loop) in err[0]
    )
    with pytest.warns(UserWarning, match="symlinked"):
        listed = folder(split="train", root=str(data), verify=False)
    by_class = {name: [p for p, label in listed.samples if label == i] for i, name in enumerate(listed.classes)}
    assert all(len(paths) == 4 and all(f"/{name}/" in p for p in paths) for name, paths in by_class.items())
    # a class folder that is itself a link still works; one that links to its own split is refused
    loop.unlink()
    (data / "train" / "red").rename(tmp_path / "red_elsewhere")
    os.symlink(tmp_path / "red_elsewhere", data / "train" / "red", target_is_directory=True)
    assert len(folder(split="train", root=str(data), verify=False)) == 12
    (data / "train" / "red").unlink()
    os.symlink("..", data / "train" / "red", target_is_directory=True)
    refused(
        capsys,
        ["train", write_config(tmp_path, data, name="c2.yaml")],
        f"class folder {data / 'train' / 'red'} is a link to {data.resolve()}, which holds {data / 'train'} itself",
    )


class _MakesAFolder:
    """Unpickling this (were it allowed) would create ``path``: proof that safe loading runs none of it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def _saved_object(path: Path, marker: Path) -> None:
    torch.save({"model": _MakesAFolder(marker)}, path)


def _in_a_torch_zip(path: Path, pickled: bytes) -> None:
    """A real torch.save zip whose data.pkl is replaced by ``pickled``."""
    torch.save({"a": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        parts = {name: z.read(name) for name in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, body in parts.items():
            z.writestr(name, pickled if name.endswith("data.pkl") else body)


def _global_opcode(path: Path, marker: Path) -> None:
    arg = str(marker).encode()  # protocol 2 by hand: GLOBAL os.mkdir, BINUNICODE arg, TUPLE1, REDUCE, STOP
    _in_a_torch_zip(path, b"\x80\x02cos\nmkdir\nX" + struct.pack("<I", len(arg)) + arg + b"\x85R.")


def _stack_global(path: Path, marker: Path) -> None:
    _in_a_torch_zip(path, pickle.dumps(_MakesAFolder(marker), protocol=4))


@pytest.mark.parametrize(
    "make, words",
    [
        (_saved_object, ["pickled Python object (", "mkdir)", "refuses"]),
        (_global_opcode, ["pickled Python object (os.mkdir)", "refuses"]),
        (_stack_global, ["pickled Python object", "refuses", "pickle instruction FRAME"]),
    ],
    ids=["torch.save-of-an-object", "GLOBAL-in-a-torch-zip", "protocol-4-pickle-in-a-torch-zip"],
)
def test_pickled_code_in_a_weights_file_is_refused_and_never_run(make, words, data, tmp_path, capsys):
    marker, weights = tmp_path / "was_run", tmp_path / "w.pt"
    make(weights, marker)
    line = refused(
        capsys,
        ["train", write_config(tmp_path, data), f"model.weights={weights}"],
        *words,
        "state_dict()",
        runs=tmp_path / "runs",
    )
    assert "damaged" not in line
    assert not marker.exists()


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_another_architecture_or_optimizer_is_refused(data, tmp_path, capsys):
    config = write_config(tmp_path, data)
    runs = tmp_path / "runs"
    made = {}
    for name, options in (
        ("first", ["optim.name=sgd", "train.epochs=2"]),
        ("adam", ["optim.name=adam"]),
        ("narrow", ["optim.name=sgd", "model.encoder_options.widths=[4, 8, 8, 16]"]),
    ):
        assert main(["train", str(config), f"name={name}", *options]) == 0, capsys.readouterr().err
        (made[name],) = (runs / name).iterdir()
    capsys.readouterr()
    assert len((made["first"] / "metrics.jsonl").read_text().splitlines()) == 2

    def resume_copy(case: str, edit_config=None, last_pt: Path | None = None) -> tuple:
        run = tmp_path / case
        shutil.copytree(made["first"], run)
        if edit_config:
            (run / "config.yaml").write_text(edit_config((run / "config.yaml").read_text()))
        if last_pt:
            shutil.copy(last_pt, run / "checkpoints" / "last.pt")
        return run, _files(run)

    last = "checkpoints/last.pt"
    cases = [  # an edited config.yaml, and a checkpoint copied in from another run
        (
            resume_copy("edited-optimizer", lambda t: t.replace("  name: sgd\n", "  name: adam\n")),
            "config.yaml has optim.name: adam but",
            "was saved with optim.name: sgd",
        ),
        (
            resume_copy("edited-architecture", lambda t: t.replace("  - 8\n", "  - 4\n", 1)),
            "config.yaml has model.encoder_options.widths: [4, 16, 16, 32]",
            "saved with model.encoder_options.widths: [8, 16, 16, 32]",
        ),
        (
            resume_copy(
                "copied-optimizer", last_pt=made["adam"] / last
            ),  # 1 epoch: metrics.jsonl used to be cut to 1 line
            "config.yaml has optim.name: sgd but",
            "was saved with optim.name: adam",
        ),
        (
            resume_copy("copied-architecture", last_pt=made["narrow"] / last),
            "config.yaml has model.encoder_options.widths: [8, 16, 16, 32]",
            "saved with model.encoder_options.widths: [4, 8, 8, 16]",
        ),
        (
            resume_copy("copied-best", last_pt=made["first"] / "checkpoints" / "best.pt"),
            "is not a training checkpoint (it lacks optimizer",
            "start a new run with mtl train",
        ),
    ]
    for (run, before), *words in cases:
        refused(capsys, ["train", "--resume", run], f"cannot resume {run}", *words)
        assert _files(run) == before, run  # metrics.jsonl, checkpoints and TensorBoard files untouched, none added


# --------------------------------------------------------------------------- fuzz


def _png(width: int, height: int, payload: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", payload) + chunk(b"IEND", b"")


def _bad_files(rng: random.Random) -> list[tuple[str, bytes, bool]]:
    """(suffix, bytes, surely unreadable) for ~30 files: junk, real headers + junk, truncations, huge sizes."""
    good_png = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(good_png, "PNG")
    good_png, good_jpeg = good_png.getvalue(), jpeg_bytes(rng.randrange(1000), 32)
    junk = lambda n: bytes(rng.getrandbits(8) for _ in range(n))  # noqa: E731
    files = [(".jpg", b"", True), (".png", b"", True)]
    for _ in range(4):
        files.append((rng.choice([".jpg", ".png", ".bmp", ".gif", ".webp", ".tif"]), junk(rng.randrange(1, 800)), True))
        files.append((".png", b"\x89PNG\r\n\x1a\n" + junk(rng.randrange(0, 300)), True))
        files.append((".jpg", b"\xff\xd8\xff\xe0" + junk(rng.randrange(0, 300)), True))
        files.append((".png", good_png[: rng.randrange(8, len(good_png) - 12)], True))
        files.append((".jpg", good_jpeg[: rng.randrange(4, len(good_jpeg) // 2)], True))
        flipped = bytearray(good_jpeg)
        for _ in range(3):
            flipped[rng.randrange(200, len(flipped))] = rng.getrandbits(8)
        files.append((".jpg", bytes(flipped), False))  # may still decode
    files.append((".png", _png(60000, 60000, zlib.compress(b"\0" * 100)), True))  # a decompression bomb header
    files.append((".png", _png(0, 5, b""), True))
    files.append(
        (
            ".jpg",
            b"\xff\xd8\xff\xc0\x00\x11\x08\xea\x60\xea\x60\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01" + junk(100),
            True,
        )
    )  # a JPEG frame header claiming 60000 x 60000
    files.append(
        (
            ".bmp",
            b"BM" + struct.pack("<IHHI", 1000, 0, 0, 54) + struct.pack("<IiiHH", 40, 50000, 50000, 1, 24) + junk(60),
            True,
        )
    )
    return files


@pytest.mark.parametrize(
    "options",
    [[], ["data.pipeline=items"], ["data.options.verify=false"]],
    ids=["batched", "items", "batched-unverified"],
)
def test_fuzz_bad_image_files_are_skipped_or_refused(options, tmp_path, capsys):
    rng = random.Random(1234)
    root = make_folder(tmp_path / "data", per_class=PER_CLASS, size=16)
    unreadable_files = 0
    for i, (suffix, payload, surely_bad) in enumerate(_bad_files(rng)):
        split = "train" if i % 3 else "val"
        (root / split / rng.choice(list(COLORS)) / f"fuzz{i}{suffix}").write_bytes(payload)
        unreadable_files += surely_bad
    code = main(["train", str(write_config(tmp_path, root)), *options])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
        return
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    if "verify=false" not in " ".join(options):
        assert summary["skipped_images"] >= unreadable_files
        assert all(line.startswith("mtl: warning: skipped ") for line in err.splitlines() if line.strip()), err


_VALID_KEYS = [
    "name",
    "out_dir",
    "data",
    "root",
    "options",
    "image_size",
    "batch_size",
    "augment",
    "mean",
    "classes",
    "pipeline",
    "model",
    "encoder",
    "weights",
    "freeze",
    "until",
    "train",
    "tasks",
    "label",
    "head",
    "type",
    "num_classes",
    "metrics",
    "weighting",
    "optim",
    "lr",
    "momentum",
    "lr_mult",
    "sched",
    "milestones",
    "epochs",
    "unfreeze",
    "modules",
    "epoch",
    "seed",
    "monitor",
    "stages",
    "continual",
    "methods",
    "_base_",
    "encoder_options",
    "widths",
    "loss",
    "weight",
    "grad_clip",
    "device",
    "amp",
]


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if depth < 4 and kind < 0.3:
        return {_random_key(rng): _random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}
    if depth < 4 and kind < 0.45:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return rng.choice(
        [
            lambda: rng.randrange(-5, 300),
            lambda: rng.uniform(-1, 1),
            lambda: rng.choice([True, False, None]),
            lambda: rng.choice(
                ["", "all", "none", "resnet18", "small_cnn", "folder", "layer3", "adam", "auto", "x" * 50]
            ),
            lambda: float(rng.choice(["nan", "inf", "-inf"])),
            lambda: 10 ** rng.randrange(10, 40),
            lambda: "".join(rng.choice("ab.=:[]{}-_ 0") for _ in range(rng.randrange(0, 8))),
        ]
    )()


def _random_key(rng: random.Random):
    if rng.random() < 0.75:
        return rng.choice(_VALID_KEYS)
    return rng.choice([rng.randrange(-3, 3), None, True, 1.5, "", "x.y", "ёж", "lrr", "epochs "])


def _mutate(node, rng: random.Random) -> None:
    """Replace, add or drop one entry somewhere in a valid config dict."""
    while True:
        key = rng.choice(list(node))
        if isinstance(node[key], dict) and node[key] and rng.random() < 0.6:
            node = node[key]
            continue
        action = rng.random()
        if action < 0.6:
            node[key] = _random_value(rng, 2)
        elif action < 0.8:
            node[_random_key(rng)] = _random_value(rng, 2)
        else:
            del node[key]
        return


def test_fuzz_random_yaml_configs_give_a_config_or_a_user_error(tmp_path):
    rng = random.Random(99)
    outcomes = {"config": 0, "user error": 0}
    for i in range(240):
        if i % 2:
            doc = tiny_config(Path("/data"), Path("/runs"))
            doc["tasks"] = {"label": {"head": {"name": "mlp", "hidden": 8}}}
            doc["train"]["unfreeze"] = [{"epoch": 1, "modules": ["stage4"]}]
            for _ in range(rng.randrange(1, 4)):
                _mutate(doc, rng)
        else:
            doc = _random_value(rng) if i % 10 == 0 else {_random_key(rng): _random_value(rng, 1) for _ in range(4)}
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        try:
            cfg = build_config(yaml.safe_load(text), {})
            assert isinstance(cfg, Config)
            outcomes["config"] += 1
        except UserError as e:
            assert "\n" not in str(e) and str(e), repr(e)
            outcomes["user error"] += 1
        if i % 4 == 0:  # the file entry point too, with the text sometimes cut or spliced
            if i % 8 == 0 and len(text) > 2:
                cut = rng.randrange(len(text))
                text = text[:cut] + rng.choice(["", ":", "[", "{", "- ", "&a *a", "\t", "'"]) + text[cut + 1 :]
            path = tmp_path / f"fuzz{i}.yaml"
            path.write_text(text)
            try:
                build_config(*load_config(path))
            except UserError as e:
                assert "\n" not in str(e) and str(e), repr(e)
    assert outcomes["config"] >= 5 and outcomes["user error"] >= 100, outcomes  # both sides are exercised


def test_fuzz_random_overrides_give_a_value_or_a_user_error(data, tmp_path):
    rng = random.Random(7)
    config = write_config(tmp_path, data)
    alphabet = "abceilmnoprt._=[]{}:,'\"-&*!# 019\t"
    items = [
        "train.unfreeze=&a [*a]",
        "data.options=&a {x: *a}",
        "a=" + "[" * 2000 + "]" * 2000,
        "x=!!python/none",
        "train.epochs=1e400",
        "=",
        ".",
        "a.=1",
        ".a=1",
        "a = 1",
        "tasks.label=null",
        "tasks=null",
        "data=3",
    ]
    for _ in range(300):
        if rng.random() < 0.5:
            items.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20))))
        else:
            key = ".".join(rng.choice(_VALID_KEYS) for _ in range(rng.randrange(1, 4)))
            value = yaml.safe_dump(_random_value(rng, 2), default_flow_style=True).strip().replace("\n", " ")
            items.append(f"{key}={value}")
    parsed = 0
    for item in items:
        try:
            keys, _ = parse_override(item)
            assert keys and all(isinstance(k, str) and k for k in keys)
            parsed += 1
        except UserError as e:
            assert "\n" not in str(e), repr(e)
            continue
        try:
            assert isinstance(build_config(*load_config(config, [item])), Config)
        except UserError as e:
            assert "\n" not in str(e), repr(e)
    assert parsed > 100
