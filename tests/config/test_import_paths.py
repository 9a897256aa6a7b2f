"""File paths in a config's ``imports`` are read from the config file's folder, as ``_base_`` is (made absolute on
loading, so a run's config.yaml finds them from anywhere); module names stay module names; the command line's paths
are the current folder's; a path found only from the current folder (the old rule) still works, with a warning."""

import os
import warnings
from pathlib import Path

import pytest

from mtl.config.load import build_config, dump_config, load_config
from mtl.core import imports as imports_module
from mtl.core.errors import UserError
from mtl.core.imports import import_config_modules, import_modules
from mtl.models.heads import HEADS

PLUGIN = """from torch import nn
from mtl.plugins import HEADS

IMPORTED = globals().get("IMPORTED", 0) + 1


@HEADS.register("{name}")
def make(in_dim, out_dim, **kwargs):
    return nn.Linear(in_dim, out_dim)
"""


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Every test imports its plugin afresh and leaves no head registered behind."""
    monkeypatch.setattr(imports_module, "_imported", set())
    monkeypatch.setattr(HEADS, "_entries", dict(HEADS._entries))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_config_reads_its_plugin_files_from_its_own_folder(tmp_path, monkeypatch):
    plugin = write(tmp_path / "project" / "parts" / "heads.py", PLUGIN.format(name="head_next_to_config"))
    config = write(tmp_path / "project" / "c.yaml", "imports: [parts/heads.py, my_pkg.parts]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    raw, _ = load_config(os.path.relpath(config, elsewhere))
    assert raw["imports"] == [str(plugin), "my_pkg.parts"]  # a module name stays one
    raw["imports"] = raw["imports"][:1]
    import_config_modules(raw)
    assert "head_next_to_config" in HEADS


def test_base_files_keep_their_own_folder_and_a_run_config_finds_the_plugin_anywhere(tmp_path, monkeypatch):
    plugin = write(tmp_path / "shared" / "heads.py", PLUGIN.format(name="head_of_the_base"))
    write(tmp_path / "shared" / "base.yaml", "imports: [./heads.py]\nmodel: {encoder: small_cnn}\n")
    child = write(tmp_path / "experiments" / "child.yaml", "_base_: ../shared/base.yaml\nname: child\n")
    monkeypatch.chdir(tmp_path)
    raw, sources = load_config(child)
    assert raw["imports"] == [str(plugin)]
    run_config = tmp_path / "runs" / "child" / "20250101-000000" / "config.yaml"
    run_config.parent.mkdir(parents=True)
    dump_config(build_config(raw, sources), run_config)
    monkeypatch.chdir(run_config.parent)  # `mtl train <run>/config.yaml` and --resume, from another folder
    again, _ = load_config(run_config)
    assert again["imports"] == [str(plugin)]
    import_config_modules(again)
    assert "head_of_the_base" in HEADS


def test_command_line_paths_are_the_current_folders_and_a_file_is_imported_once(tmp_path, monkeypatch):
    plugin = write(tmp_path / "cwd" / "mine.py", PLUGIN.format(name="head_from_the_command_line"))
    config = write(tmp_path / "configs" / "c.yaml", "model: {encoder: small_cnn}\n")
    monkeypatch.chdir(plugin.parent)
    raw, _ = load_config(config, ["imports=[mine.py]"])
    assert raw["imports"] == [str(plugin)]
    import_modules(["mine.py", str(plugin), "./mine.py"])  # the --import option and a config naming the same file
    assert "head_from_the_command_line" in HEADS  # registering it twice would have been an error


def test_a_path_found_only_from_the_current_folder_works_with_a_warning(tmp_path, monkeypatch):
    plugin = write(tmp_path / "plugins" / "old.py", PLUGIN.format(name="head_by_the_old_rule"))
    config = write(tmp_path / "configs" / "c.yaml", "imports: [plugins/old.py]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="as mtl did before") as caught:
        raw, _ = load_config(config)
    (message,) = [str(w.message) for w in caught]
    assert str(tmp_path / "configs") in message and str(plugin) in message and "\n" not in message
    assert raw["imports"] == [str(plugin)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found next to the config: no warning
        write(tmp_path / "configs" / "plugins" / "old.py", PLUGIN.format(name="head_next_to_it"))
        assert load_config(config)[0]["imports"] == [str(tmp_path / "configs" / "plugins" / "old.py")]


def test_a_missing_plugin_file_or_a_path_to_no_py_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path / "configs" / "c.yaml", "imports: [gone.py]\n")
    raw, _ = load_config(config)
    with pytest.raises(UserError, match="does not exist") as info:
        import_config_modules(raw)
    assert str(tmp_path / "configs" / "gone.py") in str(info.value) and "config file's folder" in str(info.value)
    (tmp_path / "configs" / "pkg").mkdir()
    with pytest.raises(UserError, match="must name a .py file"):
        import_config_modules({"imports": [str(tmp_path / "configs" / "pkg")]})
