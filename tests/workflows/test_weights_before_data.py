"""A weights file that is missing, unreadable or does not fit is refused in one line before any image is decoded and
before anything is written; building the data draws nothing from the global random generators, so building the
encoder first leaves every initialisation as it was."""

import random

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from conftest import make_folder, tiny_config

from mtl.build.data import build_data
from mtl.cli import main
from mtl.config.load import build_config
from mtl.core.runtime import seed_everything
from mtl.data import batches
from mtl.models.encoders import build_encoder

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = {"widths": [8, 16, 16, 32]}  # tiny_config's small_cnn


class Decoding(Exception):
    """Raised where the data's images would first be decoded."""


def test_bad_weights_are_refused_before_decoding_or_writing(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=(4, 2))
    raw = tiny_config(data, tmp_path / "runs", **{"data.cache_budget_gb": 0})  # decoded images would go to a file
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "garbage.pth").write_bytes(b"not weights")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    torch.save(build_encoder("small_cnn", **OPTIONS).state_dict(), tmp_path / "good.pth")
    before = sorted(p for p in tmp_path.rglob("*"))
    for weights, words in [
        ("missing.pth", "does not exist"),
        ("garbage.pth", "could not read weights file"),
        ("other.pth", "do not fit encoder small_cnn"),
    ]:
        with pytest.MonkeyPatch.context() as mp:
            calls = _watch(mp)
            assert main(["train", str(tmp_path / "c.yaml"), f"model.weights={tmp_path / weights}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mtl: error:") and "\n" not in err and words in err, err
        assert calls == [], calls  # no image touched
        assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written: no run, no decoded-image cache

    with pytest.MonkeyPatch.context() as mp:  # the same run with weights that fit goes on to decode the images
        calls = _watch(mp)
        with pytest.raises(Decoding):
            main(["train", str(tmp_path / "c.yaml"), f"model.weights={tmp_path / 'good.pth'}"])
    assert calls[-1].startswith("decode_images")


def _watch(mp: pytest.MonkeyPatch) -> list:
    """Every image decoded (the batched store; it then raises Decoding) or opened (PIL) from here on."""
    calls = []

    def decode(paths, *args, **kwargs):
        calls.append(f"decode_images({len(paths)} files)")
        raise Decoding

    real_open = PIL.Image.open

    def image_open(fp, *args, **kwargs):
        calls.append(f"Image.open({fp})")
        return real_open(fp, *args, **kwargs)

    mp.setattr(batches, "decode_images", decode)
    mp.setattr(PIL.Image, "open", image_open)
    return calls


@pytest.mark.parametrize(
    "overrides",
    [
        {"data.augment": "random_resized_crop", "data.val_split": 0.3},
        {"data.pipeline": "items", "data.augment": "random_resized_crop", "data.auto_augment": "trivial"},
    ],
    ids=["batched", "items"],
)
def test_building_the_data_draws_nothing_from_the_global_generators(tmp_path, overrides):
    cfg = build_config(tiny_config(make_folder(tmp_path / "data", per_class=(4, 2)), tmp_path / "runs", **overrides))
    seed_everything(3, False)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    build_data(cfg, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
