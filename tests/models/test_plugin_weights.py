"""A plugin encoder given the whole network's weights file: the classifier it does not have is found and skipped
(one warning naming it) without ``removed_modules``; any other extra key is still refused in one line."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mtl.core.errors import UserError
from mtl.models.encoders import ENCODERS, build_encoder

NAME = "test_ported_net"


class PortedNet(nn.Module):
    """A third-party network registered as a plugin encoder: its feature layers, without its classifier."""

    removed: tuple = ()

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 1))
        self.out_dim = 8
        if self.removed:
            self.removed_modules = self.removed

    def forward(self, x):
        return {"out": self.features(x).mean(dim=(2, 3))}


class FullNet(PortedNet):
    """The network the weights file was saved from: the same features, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 10))


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setitem(ENCODERS._entries, NAME, PortedNet)
    return PortedNet


def _saved(tmp_path: Path, state: dict, name: str = "full.pth") -> Path:
    torch.save(state, tmp_path / name)
    return tmp_path / name


def _full_state() -> dict:
    torch.manual_seed(0)
    return FullNet().state_dict()


def _loaded_features(encoder: nn.Module, state: dict) -> bool:
    return all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())


def test_the_files_classifier_is_skipped_with_one_warning(tmp_path, plugin):
    state = _full_state()
    with pytest.warns(UserWarning) as caught:
        encoder = build_encoder(NAME, weights=str(_saved(tmp_path, state)))
    (warning,) = caught
    text = str(warning.message)
    assert "skipped 2 keys (classifier.1.weight, classifier.1.bias) of module classifier" in text, text
    assert "removed_modules" in text
    assert _loaded_features(encoder, state)

    ordered = dict(sorted(state.items()))  # keys in sorted order (a safetensors file): the position says nothing
    with pytest.warns(UserWarning, match="of module classifier,"):
        assert _loaded_features(build_encoder(NAME, weights=str(_saved(tmp_path, ordered, "sorted.pth"))), state)


def test_removed_modules_skips_them_silently(tmp_path, plugin, monkeypatch):
    monkeypatch.setattr(PortedNet, "removed", ("classifier",))
    state = _full_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _loaded_features(build_encoder(NAME, weights=str(_saved(tmp_path, state))), state)


def _refused(path: Path, *fragments: str) -> None:
    with pytest.raises(UserError) as info, warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped on the way to the refusal
        build_encoder(NAME, weights=str(path))
    message = str(info.value)
    assert "\n" not in message and "do not fit encoder test_ported_net" in message
    for fragment in fragments:
        assert fragment in message, message


def test_other_extra_keys_are_still_refused(tmp_path, plugin):
    state = _full_state()
    classifier = {k: v for k, v in state.items() if k.startswith("classifier")}
    features = {k: v for k, v in state.items() if not k.startswith("classifier")}
    cases = {
        "not last": {**classifier, **features},  # and not sorted either
        "inside a module the encoder has": {**features, "features.9.weight": torch.zeros(10, 8)},
        "two modules": {**state, "aux.fc.weight": torch.zeros(10, 8)},
        "not a linear layer": {**features, "norm_out.weight": torch.ones(8)},
    }
    assert list(cases["not last"]) != sorted(cases["not last"])
    for name, bad in cases.items():
        extra = [k for k in bad if k not in features]
        _refused(_saved(tmp_path, bad, f"{name}.pth"), "unexpected key", extra[0])

    missing = {k: v for k, v in state.items() if k != "features.3.bias"}  # a file of another network
    _refused(_saved(tmp_path, missing, "missing.pth"), "missing key (features.3.bias)", "unexpected keys (classifier")
