"""train.accumulate: N batches of b give the update of one batch of N b (a short last group too), with the same lr
schedule; a stop request mid-group resumes exactly; a non-finite batch skips its whole update; the refusals."""

import copy
import math

import pytest
import torch
from conftest import tiny_config
from test_bad_input import data, refused, write_config  # noqa: F401  (data: a fixture)
from torch import nn

from mtl.config.load import build_config
from mtl.config.schema import SchedCfg
from mtl.core.errors import UserError
from mtl.data.loaders import collate_targets
from mtl.data.mix import BatchMix
from mtl.engine.optim import build_scheduler
from mtl.engine.trainer import Hook, Trainer, updates_per_epoch
from mtl.tasks.binary import Binary
from mtl.tasks.classification import Classification
from mtl.weighting import build_weighting

pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS = 44  # batches of 8: 8 8 8 8 | 8 4 an epoch in groups of 4; batches of 32: 32 | 12 -- the same updates


class _Items(torch.utils.data.Dataset):
    def __init__(self, nan_at=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_ITEMS, 1, 4, 4, generator=g)
        if nan_at is not None:
            self.x[nan_at] = float("nan")
        self.a = torch.randint(0, 3, (N_ITEMS,), generator=g)
        self.b = torch.randint(0, 2, (N_ITEMS,), generator=g)

    def __len__(self):
        return N_ITEMS

    def __getitem__(self, i):
        return {"image": self.x[i], "a": self.a[i], "b": self.b[i]}


class _Tiny(nn.Module):
    """No BatchNorm (with it, micro-batches are normalised by their own statistics); ``on_forward`` is called with
    the number of forward passes so far."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 1)})
        self.calls, self.on_forward = 0, None

    def forward(self, x):
        self.calls += 1
        if self.on_forward is not None:
            self.on_forward(self.calls)
        h = self.encoder(x)
        return {t: head(h) for t, head in self.heads.items()}

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_parameters(self):
        return self.heads.parameters()


class _Record(Hook):
    def __init__(self):
        self.lrs, self.saved = [], {}

    def after_step(self, trainer, losses):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    def on_interrupt(self, trainer, state):
        self.saved.update(copy.deepcopy(state))


def _trainer(batch_size, accumulate=1, weighting="static", epochs=3, nan_at=None, **options):
    torch.manual_seed(0)
    model = _Tiny()
    tasks = {"a": Classification("a", "a", 3), "b": Binary("b", "b", 1, weight=0.5)}
    w = build_weighting(weighting, list(tasks), [t.weight for t in tasks.values()])
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        _Items(nan_at),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate_targets({"a": "a", "b": "b"}),
    )
    optimizer = torch.optim.SGD(
        [{"params": list(model.parameters())}, {"params": list(w.parameters()) or [torch.zeros(0)]}],
        lr=0.2,
        momentum=0.9,
        weight_decay=1e-3,
    )
    steps = updates_per_epoch(len(loader), 1, accumulate)
    scheduler = build_scheduler(optimizer, SchedCfg(name="cosine", warmup_epochs=1), epochs, steps)
    record = _Record()
    options = {"grad_clip": 0.5, **options}  # small enough to clip: clipping acts on the whole update's gradient
    trainer = Trainer(
        model,
        tasks,
        {"train": loader},
        optimizer,
        scheduler,
        epochs=epochs,
        device=torch.device("cpu"),
        progress=False,
        generator=generator,
        seed=3,
        weighting=w,
        hooks=[record],
        accumulate=accumulate,
        **options,
    )
    return trainer, record


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()] + [
        p.detach().clone() for p in trainer.weighting.parameters()
    ]


@pytest.mark.parametrize("weighting", ["static", "uncertainty", "dwa"])
def test_four_batches_of_8_update_as_one_batch_of_32(weighting):
    big, big_record = _trainer(32, weighting=weighting)
    small, small_record = _trainer(8, accumulate=4, weighting=weighting)
    big.fit()
    small.fit()
    assert big.global_step == small.global_step == 6  # 2 updates an epoch: of 32 and 12 items, 4 and 2 batches
    assert small_record.lrs == pytest.approx(big_record.lrs, rel=1e-12)
    assert len(set(small_record.lrs)) > 3  # warmup then cosine: the schedule moved
    start = _params(_trainer(32, weighting=weighting)[0])
    for a, b, s in zip(_params(big), _params(small), start):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, s) for a, s in zip(_params(big), start))
    for e in range(3):
        assert small.history[e]["train"]["loss"] == pytest.approx(big.history[e]["train"]["loss"], rel=1e-5)
    if weighting == "dwa":  # its weights moved in the third epoch, the same in both
        assert small.history[2]["weights"] == pytest.approx(big.history[2]["weights"], rel=1e-5)
        assert small.history[2]["weights"]["a"] != 1.0


@pytest.mark.parametrize("stop_at", [2, 5, 7])  # forward passes: mid-group, in the short last group, next epoch
def test_a_stop_mid_group_takes_effect_at_its_end_and_resumes_exactly(stop_at):
    mix = BatchMix(seed=3)  # the mixing draws resume too
    whole, _ = _trainer(8, accumulate=4, epochs=2, mix=mix)
    whole.fit()
    stopped, record = _trainer(8, accumulate=4, epochs=2, mix=mix)
    stopped.model.on_forward = lambda calls: stopped.request_stop() if calls == stop_at else None
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    group_end = {2: 4, 5: 6, 7: 4}[stop_at]  # batches of the epoch taken when the group ended
    assert record.saved["partial"]["step"] == group_end
    assert record.saved["global_step"] == {2: 1, 5: 2, 7: 3}[stop_at]
    resumed, _ = _trainer(8, accumulate=4, epochs=2, mix=mix)
    resumed.load_state_dict(record.saved)
    resumed.fit()
    for a, b in zip(_params(whole), _params(resumed)):
        assert torch.equal(a, b)
    assert resumed.global_step == whole.global_step
    assert [h["train"] for h in resumed.history] == [h["train"] for h in whole.history]


def test_a_non_finite_batch_skips_its_whole_update():
    trainer, record = _trainer(8, accumulate=4, epochs=1, nonfinite="skip", nan_at=range(N_ITEMS))
    trainer.fit()  # every item is nan: every update is skipped, and no weight moves
    start = _params(_trainer(8)[0])
    assert trainer.skipped_steps == 2 and trainer.global_step == 0 and len(record.lrs) == 2
    assert all(torch.equal(a, b) for a, b in zip(_params(trainer), start))

    one_bad, _ = _trainer(8, accumulate=4, epochs=1, nonfinite="skip")
    one_bad.model.on_forward = lambda calls: _poison(one_bad.model) if calls == 2 else None
    one_bad.fit()
    assert one_bad.skipped_steps == 1 and one_bad.global_step == 1  # the first group skipped, the short one taken


def _poison(model):
    with torch.no_grad():
        model.heads["a"].bias.fill_(float("nan"))
    model.on_forward = lambda calls: _heal(model) if calls == 5 else None


def _heal(model):
    with torch.no_grad():
        model.heads["a"].bias.zero_()


@pytest.mark.parametrize("weighting, why", [("rlw", "draws its weights anew"), ("pcgrad", "task gradients")])
def test_weightings_that_are_not_affine_in_the_losses_are_refused(weighting, why):
    with pytest.raises(UserError, match=why):
        _trainer(8, accumulate=2, weighting=weighting)
    _trainer(8, accumulate=1, weighting=weighting)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"train.accumulate": 0}, ["train.accumulate", ">= 1"]),
        ({"train.accumulate": 2, "weighting.name": "rlw"}, ["train.accumulate=2", "RLW", "weighting.name=equal"]),
        ({"train.accumulate": 2, "continual.methods": ["ewc"]}, ["train.accumulate is not supported with continual"]),
    ],
    ids=["zero", "rlw", "continual"],
)
def test_refusals_exit_2_in_one_line(overrides, words, data, tmp_path, capsys):  # noqa: F811
    refused(capsys, ["train", write_config(tmp_path, data, **overrides)], *words, runs=tmp_path / "runs")


def test_a_run_with_mix_and_accumulation_counts_updates_per_epoch(color_folder, tmp_path):
    from mtl.workflows.train import run

    overrides = {"train.epochs": 1, "train.accumulate": 2, "data.mix": {}, "train.log_images": 0}
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **overrides))
    summary = run(cfg, quiet=True)
    batches = math.ceil(48 / 8)  # make_folder: 16 train images of each of 3 classes
    assert summary["steps_per_epoch"] == updates_per_epoch(batches, 1, 2) == 3
    assert math.isfinite(summary["final"]["train"]["loss"]) and 0 <= summary["final"]["train"]["acc"] <= 1
