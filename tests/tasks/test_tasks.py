"""Task types: losses, on-device metric sums and their epoch metrics, checked against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtl.core.errors import UserError
from mtl.tasks.base import TASK_TYPES, build_task, num_outputs_required, probabilities, task_options

torch.set_num_threads(1)


def _task(type_, num_classes=None, **options):
    return build_task("t", type=type_, target="y", num_classes=num_classes, **options)


def _metrics(task, pred, target):
    return task.compute(task.update(task.init_state("cpu"), pred, target))


def _example(type_, gen, b=6):
    """A task of each type with a random batch (prediction, target) including ignored/invalid entries."""
    if type_ == "classification":
        return _task(type_, 7), torch.randn(b, 7, generator=gen), torch.randint(0, 7, (b,), generator=gen)
    if type_ == "binary":
        return _task(type_), torch.randn(b, 1, generator=gen), torch.randint(0, 2, (b,), generator=gen)
    if type_ == "multilabel":
        return _task(type_, 4), torch.randn(b, 4, generator=gen), (torch.rand(b, 4, generator=gen) < 0.4).float()
    if type_ == "regression":
        return _task(type_, 2), torch.randn(b, 2, generator=gen), torch.randn(b, 2, generator=gen)
    if type_ == "segmentation":
        target = torch.randint(-1, 3, (b, 5, 4), generator=gen)
        return _task(type_, 3), torch.randn(b, 3, 5, 4, generator=gen), target
    if type_ == "depth":
        target = torch.rand(b, 1, 5, 4, generator=gen) * 5 * (torch.rand(b, 1, 5, 4, generator=gen) > 0.3)
        return _task(type_), torch.rand(b, 1, 5, 4, generator=gen) * 5, target
    assert type_ == "normals"
    target = F.normalize(torch.randn(b, 3, 5, 4, generator=gen), dim=1)
    target = target * (torch.rand(b, 1, 5, 4, generator=gen) > 0.3)
    return _task(type_), torch.randn(b, 3, 5, 4, generator=gen), target


TYPES = ["classification", "binary", "multilabel", "regression", "segmentation", "depth", "normals"]


def test_registry_covers_every_type():
    assert sorted(TASK_TYPES.names()) == sorted(TYPES)
    assert {t for t in TYPES if TASK_TYPES.get(t).dense} == {"segmentation", "depth", "normals"}


@pytest.mark.parametrize("type_", TYPES)
def test_contract(type_):
    task, pred, target = _example(type_, torch.Generator().manual_seed(0))
    assert task.metric_directions["loss"] is False and task.primary in task.metric_directions
    state = task.init_state("cpu")
    assert state.dtype == torch.float64 and state.dim() == 1 and not state.any()
    metrics = _metrics(task, pred, target)
    assert set(metrics) == set(task.metric_directions) - {"loss"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    empty = task.compute(task.init_state("cpu"))  # no data at all: finite values, no division by zero
    assert set(empty) == set(metrics) and all(math.isfinite(v) for v in empty.values())
    loss = task.loss(pred, target)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("type_", TYPES)
def test_update_is_additive(type_):
    gen = torch.Generator().manual_seed(1)
    task, p1, t1 = _example(type_, gen, b=5)
    _, p2, t2 = _example(type_, gen, b=3)
    two = task.update(task.update(task.init_state("cpu"), p1, t1), p2, t2)
    once = task.update(task.init_state("cpu"), torch.cat([p1, p2]), torch.cat([t1, t2]))
    torch.testing.assert_close(two, once, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("type_", TYPES)
def test_bf16_predictions(type_):
    task, pred, target = _example(type_, torch.Generator().manual_seed(2))
    half = pred.bfloat16()
    loss = task.loss(half, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, task.loss(half.float(), target))
    state = task.update(task.init_state("cpu"), half, target)
    assert state.dtype == torch.float64
    assert all(math.isfinite(v) for v in task.compute(state).values())


def test_classification_topk_and_accuracy():
    task = _task("classification", 7)
    assert task.out_dim == 7 and "top5" in task.metric_directions and task.primary == "acc"
    # the true class is ranked 1st, 3rd, 5th and 6th
    pred = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3]]).repeat(4, 1)
    target = torch.tensor([0, 2, 4, 5])
    assert _metrics(task, pred, target) == pytest.approx({"acc": 0.25, "top5": 0.75})
    torch.testing.assert_close(task.loss(pred, target), F.cross_entropy(pred, target))
    assert task.correct(pred, target).item() == 1
    top2 = _task("classification", 7, topk=2)
    assert _metrics(top2, pred, target) == pytest.approx({"acc": 0.25, "top2": 0.25})
    small = _task("classification", 5)  # top-5 of 5 classes is always right: not reported
    assert "top5" not in small.metric_directions and "top5" not in _metrics(small, pred[:3, :5], target[:3])
    smooth = _task("classification", 7, label_smoothing=0.1)
    torch.testing.assert_close(smooth.loss(pred, target), F.cross_entropy(pred, target, label_smoothing=0.1))


def test_binary_accuracy_f1_and_loss():
    task = _task("binary", 2)
    assert task.out_dim == 1
    pred = torch.tensor([[2.0], [1.0], [-1.0], [-3.0], [0.5]])
    target = torch.tensor([1, 0, 1, 0, 1])  # tp 2, fp 1, fn 1, tn 1
    assert _metrics(task, pred, target) == pytest.approx({"acc": 0.6, "f1": 4 / 6})
    torch.testing.assert_close(task.loss(pred, target), F.binary_cross_entropy_with_logits(pred[:, 0], target.float()))
    smooth = _task("binary", label_smoothing=0.2)
    soft = target.float() * 0.8 + 0.1
    torch.testing.assert_close(smooth.loss(pred, target), F.binary_cross_entropy_with_logits(pred[:, 0], soft))
    assert probabilities(task, pred).shape == (5, 2)


def _exact_ap(score, label):
    order = torch.argsort(score, descending=True)
    hits = label[order].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return ((precision * hits).sum() / hits.sum()).item()


def test_multilabel_map_matches_exact_ap():
    gen = torch.Generator().manual_seed(3)
    n, k = 3000, 5
    target = (torch.rand(n, k, generator=gen) < torch.tensor([0.05, 0.2, 0.4, 0.6, 0.0])).float()
    scale = torch.tensor([0.3, 1.0, 3.0, 8.0, 1.0])  # from barely separated to saturated sigmoid scores
    pred = torch.randn(n, k, generator=gen) * scale + target * scale * 1.5 - 1
    task = _task("multilabel", k)
    state = task.init_state("cpu")
    for chunk in range(0, n, 700):
        state = task.update(state, pred[chunk : chunk + 700], target[chunk : chunk + 700])
    exact = sum(_exact_ap(pred[:, j], target[:, j]) for j in range(4)) / 4  # label 4 has no positives
    assert task.compute(state)["map"] == pytest.approx(exact, abs=0.01)


def test_multilabel_counts_by_hand():
    task = _task("multilabel", 3)
    assert task.primary == "map"
    pred = torch.tensor([[2.0, -2, 1], [-2.0, 1, 1], [3.0, -1, -1]])
    target = torch.tensor([[1.0, 0, 0], [0.0, 1, 0], [1.0, 1, 0]])
    # label 0: tp 2; label 1: tp 1, fn 1; label 2: fp 2 -> 6 of 9 right
    m = _metrics(task, pred, target)
    assert m["acc"] == pytest.approx(6 / 9)
    assert m["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["map"] == pytest.approx(1.0)  # every positive outranks every negative of its label
    weighted = _task("multilabel", 3, pos_weight=[1.0, 2.0, 3.0])
    torch.testing.assert_close(
        weighted.loss(pred, target),
        F.binary_cross_entropy_with_logits(pred, target, pos_weight=torch.tensor([1.0, 2.0, 3.0])),
    )
    with pytest.raises(UserError, match="pos_weight"):
        _task("multilabel", 3, pos_weight=[1.0, 2.0])
    assert probabilities(task, pred).shape == (3, 3)


def test_regression_errors_and_losses():
    task = _task("regression", num_outputs=2)
    assert task.out_dim == 2 and task.primary == "mae" and task.metric_directions["mae"] is False
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 4.0], [1.0, 0.0]])  # errors 0, 2, 1, 0
    assert _metrics(task, pred, target) == pytest.approx({"mae": 0.75, "rmse": math.sqrt(5 / 4)})
    torch.testing.assert_close(task.loss(pred, target), torch.tensor(1.25))
    torch.testing.assert_close(_task("regression", 2, loss="l1").loss(pred, target), torch.tensor(0.75))
    torch.testing.assert_close(_task("regression", 2, loss="smooth_l1").loss(pred, target), torch.tensor(2 / 4))
    assert _task("regression").out_dim == 1
    with pytest.raises(UserError, match="mse"):
        _task("regression", loss="huber")


def _logits(labels, c):
    return F.one_hot(labels, c).permute(0, 3, 1, 2).float() * 5


def test_segmentation_perfect_and_known_confusion():
    task = _task("segmentation", 3)
    target = torch.tensor([[[0, 0, 1], [1, 2, -1]]])
    assert _metrics(task, _logits(target.clamp(min=0), 3), target) == pytest.approx({"miou": 1.0, "pixel_acc": 1.0})
    pred = torch.tensor([[[0, 1, 1], [2, 2, 0]]])  # last pixel is ignored whatever it predicts
    # confusion (target rows): 0 -> [1, 1, 0]; 1 -> [0, 1, 1]; 2 -> [0, 0, 1]
    # IoU: 0: 1/2, 1: 1/3, 2: 1/2; class 3 of a 4-class task never occurs and is left out
    four = _task("segmentation", 4)
    m = _metrics(four, _logits(pred, 4), target)
    assert m == pytest.approx({"miou": (1 / 2 + 1 / 3 + 1 / 2) / 3, "pixel_acc": 3 / 5})


def test_segmentation_ignores_pixels_in_loss_and_metrics():
    gen = torch.Generator().manual_seed(4)
    task = _task("segmentation", 3)
    pred = torch.randn(2, 3, 4, 4, generator=gen)
    target = torch.randint(0, 3, (2, 4, 4), generator=gen)
    target[0, :2] = -1
    torch.testing.assert_close(task.loss(pred, target), F.cross_entropy(pred, target, ignore_index=-1))
    valid = target >= 0
    assert task.update(task.init_state("cpu"), pred, target).sum().item() == valid.sum().item()
    everything_ignored = torch.full_like(target, -1)
    assert task.loss(pred, everything_ignored).item() == 0.0
    assert task.compute(task.update(task.init_state("cpu"), pred, everything_ignored)) == {
        "miou": 0.0,
        "pixel_acc": 0.0,
    }
    other = _task("segmentation", 3, ignore_index=255)
    torch.testing.assert_close(other.loss(pred, target.masked_fill(~valid, 255)), task.loss(pred, target))


def test_depth_errors_skip_invalid_pixels():
    task = _task("depth")
    assert task.out_dim == 1 and task.dense
    pred = torch.tensor([1.0, 3.0, 7.0, 2.0]).view(1, 1, 2, 2)
    target = torch.tensor([2.0, 0.0, 5.0, 0.0]).view(1, 1, 2, 2)  # two invalid pixels
    # valid errors: |1-2| = 1 (rel 1/2), |7-5| = 2 (rel 2/5)
    assert _metrics(task, pred, target) == pytest.approx({"abs_err": 1.5, "rel_err": (0.5 + 0.4) / 2})
    torch.testing.assert_close(task.loss(pred, target), torch.tensor(1.5))
    nothing = torch.zeros_like(target)
    assert task.loss(pred, nothing).item() == 0.0
    assert _metrics(task, pred, nothing) == {"abs_err": 0.0, "rel_err": 0.0}


def test_normals_known_angles():
    task = _task("normals")
    assert task.out_dim == 3 and task.primary == "mean_angle"
    z, x = torch.tensor([0.0, 0, 1]), torch.tensor([1.0, 0, 0])
    # 8 pixels: 4 right, 4 off by 90 degrees, 2 more invalid (zero target) with a wrong prediction
    target = torch.stack([z] * 8 + [torch.zeros(3)] * 2).T.reshape(1, 3, 2, 5)
    pred = torch.stack([z * 2] * 4 + [x * 3] * 4 + [x] * 2).T.reshape(1, 3, 2, 5)
    m = _metrics(task, pred, target)
    assert m["mean_angle"] == pytest.approx(45.0, abs=1e-4)
    assert m["within_11.25"] == m["within_22.5"] == m["within_30"] == pytest.approx(0.5)
    assert 0 <= m["median_angle"] <= 90.25
    torch.testing.assert_close(task.loss(pred, target), torch.tensor(0.5))
    torch.testing.assert_close(task.predict(pred).norm(dim=1), torch.ones(1, 2, 5))


def test_normals_median_and_thresholds_against_exact():
    gen = torch.Generator().manual_seed(5)
    task = _task("normals")
    target = F.normalize(torch.randn(4, 3, 16, 16, generator=gen), dim=1)
    pred = target + 0.4 * torch.randn(4, 3, 16, 16, generator=gen)
    cos = (F.normalize(pred, dim=1) * target).sum(1).clamp(-1, 1)
    angles = torch.rad2deg(torch.acos(cos)).flatten().double()
    m = _metrics(task, pred, target)
    assert m["median_angle"] == pytest.approx(angles.median().item(), abs=0.25)
    assert m["mean_angle"] == pytest.approx(angles.mean().item(), abs=1e-4)
    for t in (11.25, 22.5, 30):
        assert m[f"within_{t:g}"] == pytest.approx((angles < t).double().mean().item(), abs=1e-9)


def test_build_task_output_sizes_and_errors():
    sizes = {"classification": 4, "binary": 1, "multilabel": 4, "regression": 4, "segmentation": 4}
    for type_, out_dim in sizes.items():
        assert _task(type_, 4 if type_ != "binary" else 2).out_dim == out_dim
    assert _task("depth").out_dim == 1 and _task("normals").out_dim == 3
    assert [t for t in TYPES if num_outputs_required(t)] == ["classification", "multilabel", "segmentation"]
    assert task_options("regression") == ["loss"] and task_options("depth") == []
    with pytest.raises(UserError, match="needs num_classes"):
        _task("segmentation")
    with pytest.raises(UserError, match="unknown option.*ignore_index.*label_smoothing, topk"):
        _task("classification", 3, ignore_index=3)
    with pytest.raises(UserError, match="takes none"):
        _task("depth", loss="l1")
    with pytest.raises(UserError, match="label_smoothing"):
        _task("classification", 3, label_smoothing=1.5)
    with pytest.raises(UserError, match="num_classes"):
        _task("normals", 2)
    with pytest.raises(UserError, match="unknown task type"):
        _task("detection", 3)
    task = build_task("a", type="classification", target="lbl", num_classes=3, weight=0.5, classes=["x", "y", "z"])
    assert (task.name, task.target, task.weight, task.classes, task.type_name) == (
        "a",
        "lbl",
        0.5,
        ["x", "y", "z"],
        "classification",
    )


# --- every registered type answers every question mtl asks about it (mtl/tasks/base.py, Task) --------------------


def _item_target(task, gen, h=6, w=5):
    """One item's target for ``task`` (dense: (C, H, W) or (H, W) labels; image-level: a scalar or vector)."""
    _, _, batch_target = _example(task.type_name, gen, b=1)
    if not task.dense:
        return batch_target[0]
    if task.type_name == "segmentation":
        return torch.randint(-1, task.out_dim, (h, w), generator=gen)
    return torch.rand(task.out_dim, h, w, generator=gen) + 0.5


@pytest.mark.parametrize("type_", sorted(TASK_TYPES.names()))
def test_every_task_type_answers_every_question(type_):
    gen = torch.Generator().manual_seed(1)
    cls = TASK_TYPES.get(type_)
    task, pred, _ = _example(type_, gen)
    # output size: a fixed one is what build_task gives and what num_classes may say
    if cls.fixed_outputs is not None:
        assert task.out_dim == cls.fixed_outputs and cls.accepts_num_classes(cls.fixed_outputs)
    assert cls.outputs_key in ("num_classes", *task_options(type_), "num_outputs")
    # probabilities: rows of a distribution (or per-label in [0, 1]) exactly for the types that claim them
    if cls.has_probabilities:
        p = task.probabilities(pred)
        assert ((p >= 0) & (p <= 1)).all()
        if type_ != "multilabel":
            assert torch.allclose(p.sum(1), torch.ones_like(p.sum(1)), atol=1e-6)
    else:
        with pytest.raises(TypeError, match="no class probabilities"):
            task.probabilities(pred)
    if cls.confusion:
        assert not cls.dense and task.confusion_classes() >= 2
    if cls.dense:  # a picture of one prediction
        picture = task.draw(pred[0], torch.rand(3, *pred.shape[-2:], generator=gen))
        assert picture.shape == (3, *pred.shape[-2:]) and picture.min() >= 0 and picture.max() <= 1
    # target geometry: mirroring twice, resizing to the same size, cropping the whole window, zooming by 1 change
    # nothing; image-level targets never move
    target = _item_target(task, gen)
    size = tuple(target.shape[-2:]) if cls.dense else (6, 5)
    assert torch.equal(cls.flip_target(cls.flip_target(target)), target)
    assert torch.equal(cls.resize_target(target, size), target)
    assert torch.equal(cls.crop_target(target, 0, 0, *size), target)
    assert torch.equal(cls.zoom_target(target, 1.0, {"type": type_}), target)
    if not cls.dense:
        assert torch.equal(cls.flip_target(target), target) and torch.equal(cls.resize_target(target, (2, 3)), target)
        assert torch.equal(cls.crop_target(target, 1, 1, 2, 2), target)
    else:
        assert cls.resize_target(target, (3, 4)).shape[-2:] == (3, 4)
        assert cls.resize_target(target, (3, 4)).dtype == target.dtype
        assert cls.crop_target(target, 1, 2, 3, 2).shape[-2:] == (3, 2)


def test_task_type_geometry_by_hand():
    seg = torch.tensor([[0, 1], [2, 3]])
    assert torch.equal(TASK_TYPES.get("segmentation").flip_target(seg), torch.tensor([[1, 0], [3, 2]]))
    assert torch.equal(TASK_TYPES.get("segmentation").resize_target(seg, (4, 4))[::2, ::2], seg)  # nearest
    depth = torch.full((1, 2, 2), 4.0)
    assert torch.equal(TASK_TYPES.get("depth").zoom_target(depth, 2.0, {"type": "depth"}), torch.full((1, 2, 2), 2.0))
    assert torch.equal(
        TASK_TYPES.get("depth").zoom_target(depth, 2.0, {"type": "depth", "inverse": True}), torch.full((1, 2, 2), 8.0)
    )
    normal = torch.tensor([0.6, 0.0, 0.8]).view(3, 1, 1).expand(3, 1, 2).clone()
    assert torch.equal(TASK_TYPES.get("normals").flip_target(normal)[0], torch.full((1, 2), -0.6))
    binary = build_task("b", type="binary", target="y")
    assert torch.allclose(
        binary.probabilities(torch.tensor([[0.0], [math.log(3)]])), torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    )
    assert binary.confusion_classes() == 2
    with pytest.raises(UserError, match="is binary but the data has 3 classes"):
        TASK_TYPES.get("binary").check_data_classes("b", 3)
