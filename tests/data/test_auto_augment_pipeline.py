"""data.auto_augment and data.random_erasing end to end: both pipelines, seeding, torchrun sharding, exact resume
mid-epoch, evaluation untouched, bad keys refused in one line."""

from itertools import islice
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2 as v2
import yaml
from conftest import sigterm_at_step, tiny_config

from mtl.build.data import build_data
from mtl.cli import main
from mtl.config.load import build_config
from mtl.core.checkpoint import load_checkpoint
from mtl.data.batch_autoaugment import OPS
from mtl.data.batches import DeviceBatches
from mtl.data.device_augment import BatchAugment
from mtl.data.transforms import build_transforms
from mtl.workflows.train import resume_run, run

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = {
    "trivial": {"data.auto_augment": "trivial"},
    "randaugment": {"data.auto_augment": "randaugment", "data.auto_augment_options": {"magnitude": 15}},
    "augmix": {"data.auto_augment": "augmix", "data.random_erasing": 0.5},
    "erasing": {"data.random_erasing": 1.0},
}


def loaders_of(folder, tmp_path, **overrides):
    cfg = build_config(tiny_config(folder, tmp_path / "runs", **{"data.cache_size": 32, **overrides}), {})
    return build_data(cfg, torch.device("cpu"))[2]


def epoch(loader, seed, batches=2):
    loader.generator.manual_seed(seed)
    return [b["image"] for b in islice(loader, batches)]


def test_batched_train_batches_are_augmented_and_seeded_and_evaluation_is_untouched(color_folder, tmp_path):
    plain = loaders_of(color_folder, tmp_path)
    for keys in KEYS:
        loaders = loaders_of(color_folder, tmp_path, **KEYS[keys])
        train = loaders["train"]
        assert isinstance(train, DeviceBatches) and train.augment.train
        one, two, other = epoch(train, 3), epoch(train, 3), epoch(train, 4)
        assert all(torch.equal(a, b) for a, b in zip(one, two)), keys
        assert not all(torch.equal(a, b) for a, b in zip(one, other)), keys
        # the same crops (theta is drawn first), changed by the policy / erasing
        assert not all(torch.allclose(a, b, atol=0.02) for a, b in zip(one, epoch(plain["train"], 3))), keys
        for a, b in zip(islice(loaders["val"], 2), plain["val"]):
            assert torch.equal(a["image"], b["image"]), keys
        assert loaders["val"].augment.auto_augment is None and loaders["val"].augment.random_erasing is None


def test_every_process_takes_its_share_of_the_global_batch_draws(color_folder, tmp_path):
    train = loaders_of(color_folder, tmp_path, **KEYS["augmix"])["train"]

    def batches(rank, world):
        shard = DeviceBatches(
            train.store,
            train.augment,
            batch_size=8,
            shuffle=True,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(5),
            rank=rank,
            world=world,
        )
        return [b["image"] for b in islice(shard, 2)]

    for whole, *shares in zip(batches(0, 1), batches(0, 2), batches(1, 2)):
        for rank, share in enumerate(shares):
            assert torch.allclose(share, whole[rank::2], atol=1e-6)


def test_identity_ops_give_the_crop_rounded_to_uint8_and_erasing_zeroes_its_box():
    x = torch.randint(0, 256, (3, 3, 20, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    raw = dict(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    plain = BatchAugment(train=True, **raw)
    augmented = BatchAugment(train=True, auto_augment="trivial", random_erasing=1.0, **raw)
    theta = plain.theta(torch.tensor([[20, 24]] * 3), torch.Generator().manual_seed(1))
    draws = {
        "aa_op": torch.full((3, 1), OPS.index("Identity")),
        "aa_magnitude": torch.zeros(3, 1, dtype=torch.float64),
        "erase": torch.tensor([[0, 0, 0, 0], [2, 3, 4, 5], [0, 0, 16, 1]]),
    }
    out = augmented(x, theta=theta, draws=draws)
    expected = (plain(x, theta=theta) * 255).round() / 255
    expected[1, :, 2:6, 3:8] = 0
    expected[2, :, :, 0:1] = 0
    close = (out - expected).abs() < 1e-6
    assert close.float().mean() > 0.95 and (out - expected).abs().max() < 1 / 255 + 1e-6  # ties of half levels
    assert (out[1, :, 2:6, 3:8] == 0).all() and (out[2, :, :, 0] == 0).all() and close[0].float().mean() > 0.95


def test_the_per_item_pipeline_follows_torchvisions_preset_order():
    train = build_transforms(
        train=True, image_size=16, auto_augment="augmix", auto_augment_options={"severity": 5}, random_erasing=0.25
    ).transforms
    kinds = [type(t) for t in train]
    assert kinds == [
        v2.ToImage,
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        v2.RGB,
        v2.AugMix,
        v2.ToDtype,
        v2.Normalize,
        v2.RandomErasing,
    ]
    assert train[4].severity == 5 and train[4].mixture_width == 3 and train[-1].p == 0.25 and train[-1].value == [0]
    randaugment = build_transforms(train=True, auto_augment="randaugment", auto_augment_options={"num_ops": 1})
    (policy,) = [t for t in randaugment.transforms if isinstance(t, v2.RandAugment)]
    assert (policy.num_ops, policy.magnitude, policy.num_magnitude_bins) == (1, 9, 31)
    evaluation = build_transforms(train=False, auto_augment="trivial", random_erasing=0.5).transforms
    assert not any(isinstance(t, (v2.TrivialAugmentWide, v2.RandomErasing)) for t in evaluation)
    image = torch.randint(0, 256, (1, 20, 20), dtype=torch.uint8)  # grey: replicated before the policy
    assert build_transforms(train=True, image_size=16, auto_augment="trivial")(image).shape == (3, 16, 16)


def runs_config(folder, out, pipeline):
    keys = {**KEYS["randaugment"], "data.random_erasing": 0.5, "data.pipeline": pipeline, "data.cache_size": 32}
    keys.update({"train.epochs": 1, "train.deterministic": True, "train.log_images": 0})
    return build_config(tiny_config(folder, out, **keys), {})


def test_a_run_stopped_mid_epoch_resumes_with_the_same_draws(color_folder, tmp_path, monkeypatch):

    def config(out):
        return runs_config(color_folder, out, "batched")

    whole = run(config(tmp_path / "a"), quiet=True)

    sigterm_at_step(monkeypatch, 3)  # the real handler: stop after this step
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "b"), quiet=True)
    monkeypatch.undo()
    (run_dir,) = list((tmp_path / "b" / "tiny").iterdir())
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["partial"]["step"] == 3
    resumed = resume_run(str(run_dir))
    assert resumed["final"]["train"] == whole["final"]["train"]
    wa = load_checkpoint(Path(whole["run_dir"]) / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_per_item_pipeline_trains_with_the_keys(color_folder, tmp_path):
    summary = run(runs_config(color_folder, tmp_path / "runs", "items"), quiet=True)
    assert summary["epochs"] == 1 and summary["final"]["train"]["loss"] > 0


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.auto_augment=autoaugment", "data.auto_augment must be null or one of trivial, randaugment, augmix"),
        ("data.auto_augment_options={magnitude: 3}", "needs a data.auto_augment policy"),
        ("data.random_erasing=1.5", "data.random_erasing"),
        ("data.name=scenes", "changes the images but not the targets of data set 'scenes'"),
    ],
)
def test_bad_keys_exit_2_in_one_line_before_anything_is_written(color_folder, tmp_path, capsys, override, words):
    cfg_path = tmp_path / "c.yaml"
    raw = tiny_config(color_folder, tmp_path / "runs", **{"data.auto_augment": "trivial"})
    if override.startswith("data.auto_augment_options"):
        raw["data"]["auto_augment"] = None
    if override == "data.name=scenes":
        raw["data"].pop("root")
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_path), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and words in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()
