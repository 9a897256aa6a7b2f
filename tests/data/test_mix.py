"""data.mix (Mixup / CutMix): the mixed batch against hand formulas, the CutMix box and its exact lam, the loss
identity of soft targets, the distribution of the draws, and the refusals."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_bad_input import data, refused, write_config  # noqa: F401  (data: a fixture)

from mtl.data.mix import BatchMix, MixDraw, cutmix_box, mix_images
from mtl.tasks.binary import Binary
from mtl.tasks.classification import Classification
from mtl.tasks.multilabel import Multilabel

DELTA = 1e-6  # failure probability of each Hoeffding bound below


def hoeffding(n: int, width: float = 1.0) -> float:
    """The deviation of a mean of n independent values in an interval of ``width`` that holds w.p. 1 - DELTA."""
    return width * math.sqrt(math.log(2 / DELTA) / (2 * n))


def batch(b=5, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)


def test_mixup_is_the_convex_combination_with_the_flipped_batch():
    x = batch()
    lam = 0.3
    out = mix_images(x, MixDraw(lam))
    for i in range(5):  # pairs (i, B - 1 - i); the middle image of an odd batch is paired with itself
        torch.testing.assert_close(out[i], lam * x[i] + (1 - lam) * x[4 - i], rtol=0, atol=1e-15)
    assert mix_images(x, MixDraw(1.0)) is x


def test_cutmix_pastes_the_partners_box_and_leaves_the_rest():
    x = batch()
    box = (1, 4, 2, 7)
    out = mix_images(x, MixDraw(0.5, box))
    for i in range(5):
        for r in range(6):
            for c in range(7):
                inside = 1 <= r < 4 and 2 <= c < 7
                assert torch.equal(out[i, :, r, c], x[4 - i if inside else i, :, r, c])


@pytest.mark.parametrize("h, w", [(32, 32), (7, 13)])
def test_cutmix_boxes_lie_inside_and_lam_is_the_exact_area_left(h, w):
    mix = BatchMix(mixup_alpha=0, cutmix_alpha=1.0, seed=1)
    x = torch.stack([torch.zeros(1, h, w), torch.ones(1, h, w)])  # image 0's partner is all ones
    seen_clipped = False
    for position in range(200):
        draw = mix.draw(0, position, h, w)
        top, bottom, left, right = draw.box
        assert 0 <= top <= bottom <= h and 0 <= left <= right <= w
        pasted = mix_images(x, draw)[0].sum().item()  # the partner's pixels, counted
        assert draw.lam == pytest.approx(1 - pasted / (h * w), abs=1e-12)
        seen_clipped |= top == 0 or left == 0 or bottom == h or right == w
    assert seen_clipped  # boxes at the border are clipped, and lam follows the clipped area


def test_the_box_follows_timms_rand_bbox_by_hand():
    # lam 0.75: sides int(32 * 0.5) = 16 and int(20 * 0.5) = 10, 8 and 5 on either side of the centre
    assert cutmix_box(0.75, 32, 20, 10, 3) == (2, 18, 0, 8)
    assert cutmix_box(0.75, 32, 20, 30, 19) == (22, 32, 14, 20)


def test_targets_are_mixed_with_the_same_lam_and_pairs_and_metrics_see_the_larger_label():
    tasks = {"c": Classification("c", "c", 4), "b": Binary("b", "b", 1), "m": Multilabel("m", "m", 3)}
    g = torch.Generator().manual_seed(0)
    targets = {
        "c": torch.tensor([0, 3, 1, 2, 2, 0]),
        "b": torch.tensor([1, 0, 0, 1, 1, 0]),
        "m": torch.randint(0, 2, (6, 3), generator=g).float(),
    }
    x = batch(6)
    mix = BatchMix(seed=7)
    for position in range(20):
        draw = mix.draw(2, position, 6, 7)
        out, soft, shown = mix(x, targets, tasks, 2, position)
        torch.testing.assert_close(out, mix_images(x, draw), rtol=0, atol=0)
        lam = draw.lam
        for i in range(6):
            j = 5 - i
            onehot = torch.zeros(4)
            onehot[targets["c"][i]] += lam
            onehot[targets["c"][j]] += 1 - lam
            torch.testing.assert_close(soft["c"][i], onehot)
            assert soft["b"][i].item() == pytest.approx(
                lam * targets["b"][i].item() + (1 - lam) * targets["b"][j].item()
            )
            torch.testing.assert_close(soft["m"][i], lam * targets["m"][i] + (1 - lam) * targets["m"][j])
            for t in tasks:
                assert torch.equal(shown[t][i], targets[t][i if lam >= 0.5 else j])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_loss_of_mixed_targets_is_the_mix_of_the_losses(smoothing):
    g = torch.Generator().manual_seed(0)
    lam = 0.37
    y = torch.randint(0, 5, (8,), generator=g)
    pred = torch.randn(8, 5, generator=g)
    task = Classification("c", "c", 5, label_smoothing=smoothing)
    soft = lam * task.soft_target(y) + (1 - lam) * task.soft_target(y.flip(0))

    def ce(p, labels):  # written out: -sum_k q_k log softmax(p)_k with q = (1 - s) onehot + s / K, batch mean
        q = (1 - smoothing) * F.one_hot(labels, 5).double() + smoothing / 5
        return -(q * p.double().log_softmax(1)).sum(1).mean()

    expected = lam * ce(pred, y) + (1 - lam) * ce(pred, y.flip(0))
    assert task.loss(pred, soft).item() == pytest.approx(expected.item(), rel=1e-6)

    yb = torch.randint(0, 2, (8,), generator=g)
    pb = torch.randn(8, 1, generator=g)
    binary = Binary("b", "b", 1, label_smoothing=smoothing)
    softb = lam * binary.soft_target(yb) + (1 - lam) * binary.soft_target(yb.flip(0))
    mixed = lam * binary.loss(pb, yb) + (1 - lam) * binary.loss(pb, yb.flip(0))
    assert binary.loss(pb, softb).item() == pytest.approx(mixed.item(), rel=1e-6)

    ym = torch.randint(0, 2, (8, 3), generator=g).float()
    pm = torch.randn(8, 3, generator=g)
    multi = Multilabel("m", "m", 3, pos_weight=[2.0, 1.0, 0.5])
    softm = lam * ym + (1 - lam) * ym.flip(0)
    mixed = lam * multi.loss(pm, ym) + (1 - lam) * multi.loss(pm, ym.flip(0))
    assert multi.loss(pm, softm).item() == pytest.approx(mixed.item(), rel=1e-6)


def test_lam_is_beta_distributed_and_the_switches_follow_their_probabilities():
    n = 2500
    alpha = 0.4
    mixup = BatchMix(mixup_alpha=alpha, cutmix_alpha=0, seed=3)
    lams = np.array([mixup.draw(0, p, 8, 8).lam for p in range(n)])
    assert abs(lams.mean() - 0.5) <= hoeffding(n)
    # E[(lam - 1/2)^2] = Var Beta(a, a) = 1 / (4 (2a + 1)): 0.139 for a = 0.4 (0.096 for a = 0.8, uniform 0.083)
    assert abs(((lams - 0.5) ** 2).mean() - 1 / (4 * (2 * alpha + 1))) <= hoeffding(n, 0.25)

    mix = BatchMix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3, seed=5)
    draws = [mix.draw(1, p, 16, 16) for p in range(n)]
    mixed = [d for d in draws if d.box is not None or d.lam != 1.0]
    assert abs(len(mixed) / n - 0.6) <= hoeffding(n)
    assert abs(sum(d.box is not None for d in mixed) / len(mixed) - 0.3) <= hoeffding(len(mixed))


def test_draws_are_a_function_of_seed_epoch_and_batch_only():
    a, b = BatchMix(seed=1), BatchMix(seed=1)
    torch.manual_seed(0)
    first = [a.draw(e, p, 32, 32) for e in range(2) for p in range(5)]
    np.random.seed(1)
    torch.manual_seed(1)  # the global random states play no part (processes under torchrun, a resumed run)
    assert [b.draw(e, p, 32, 32) for e in range(2) for p in range(5)] == first
    assert len(set(first)) == len(first)
    assert BatchMix(seed=2).draw(0, 0, 32, 32) != first[0]


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"data.mix": {"mixup_alpha": 0, "cutmix_alpha": 0}}, ["mixup_alpha and cutmix_alpha are both 0"]),
        ({"data.mix": {"prob": 1.5}}, ["data.mix.prob", "<= 1"]),
        ({"data.mix": {}, "tasks": {"label": {"type": "regression"}}}, ["tasks.label is a regression task"]),
        ({"data.mix": {}, "train.cache_features": "on"}, ["train.cache_features=on"]),
        ({"data.mix": {}, "continual.methods": ["finetune"]}, ["data.mix is not supported with continual.methods"]),
    ],
    ids=["both-off", "prob", "regression", "cached-features", "continual"],
)
def test_refusals_exit_2_in_one_line(overrides, words, data, tmp_path, capsys):  # noqa: F811
    refused(capsys, ["train", write_config(tmp_path, data, **overrides)], *words, runs=tmp_path / "runs")
