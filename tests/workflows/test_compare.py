"""delta_m on hand-made numbers, baseline files, and ``mtl compare`` (grouping over seeds, statistics, selection,
formats) on hand-written summary.json / config.yaml / metrics.jsonl / sweep.json files."""

import csv
import io
import json
import math

import pytest
import yaml

from mtl.cli import main
from mtl.core.errors import UserError
from mtl.core.stats import describe, t_cdf, t_quantile
from mtl.engine.monitor import delta_m, delta_p, load_baseline
from mtl.workflows.compare import aggregate, compare_table, run_curve, write_baseline

DIRECTIONS = {
    "seg": {"miou": True, "loss": False},
    "depth": {"abs_err": False, "loss": False},
    "normal": {"mean_angle": False, "within_11.25": True, "loss": False},
}


# --------------------------------------------------------------------------- delta-m


def test_delta_m_is_the_signed_mean_relative_change():
    base = {"seg": {"miou": 0.5}, "depth": {"abs_err": 0.4}}
    # miou +10% (better), abs_err +10% (worse): they cancel
    assert delta_m({"seg": {"miou": 0.55}, "depth": {"abs_err": 0.44}}, base, DIRECTIONS) == pytest.approx(0.0)
    # miou +10%, abs_err -20% (better): (10 + 20) / 2
    assert delta_m({"seg": {"miou": 0.55}, "depth": {"abs_err": 0.32}}, base, DIRECTIONS) == pytest.approx(15.0)
    assert delta_m({"seg": {"miou": 0.5}, "depth": {"abs_err": 0.4}}, base, DIRECTIONS) == 0.0


def test_flat_and_libmtl_delta_m_differ_when_tasks_have_different_numbers_of_metrics():
    directions = {"seg": {"miou": True}, "depth": {"abs_err": False, "rel_err": False, "delta1": True}}
    base = {"seg": {"miou": 0.5}, "depth": {"abs_err": 0.4, "rel_err": 0.2, "delta1": 0.8}}
    run = {"seg": {"miou": 0.55}, "depth": {"abs_err": 0.36, "rel_err": 0.22, "delta1": 0.88}}
    # signed relative changes in %: seg +10; depth abs_err -10% -> +10, rel_err +10% -> -10, delta1 +10% -> +10
    assert delta_m(run, base, directions) == pytest.approx((10 + 10 - 10 + 10) / 4)  # flat: 5
    assert delta_p(run, base, directions) == pytest.approx((10 + (10 - 10 + 10) / 3) / 2)  # LibMTL: 6.667
    one_each = {"seg": {"miou": 0.5}, "depth": {"abs_err": 0.4}}
    assert delta_m(run, one_each, directions) == pytest.approx(delta_p(run, one_each, directions))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "must map tasks"),
        ("seg: 0.5", "must map metrics"),
        ("seg: {miou: 0}", "non-zero number"),
        ("seg: {miou: high}", "non-zero number"),
        ("road: {miou: 0.5}", "names task 'road'"),
        ("seg: {iou: 0.5}", "no metric 'iou'"),
        ("seg: {miou: [", "not valid YAML"),
    ],
)
def test_bad_baseline_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_baseline(path, DIRECTIONS)


def test_missing_baseline_file_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="--write-baseline"):
        load_baseline(tmp_path / "none.yaml")


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantiles_match_the_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


def test_t_quantiles_match_closed_forms():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(0.975, 100000) == pytest.approx(1.959964, abs=1e-4)  # the normal limit
    assert t_cdf(-1.5, 3) == pytest.approx(1 - t_cdf(1.5, 3))


def test_describe_gives_mean_sample_std_and_t_interval():
    s = describe([0.5, 0.6, 0.7])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.6), pytest.approx(0.1))  # sum of squares 0.02 / (3 - 1)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half))
    one = describe([0.5])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 0.5, None, None, None)


# --------------------------------------------------------------------------- hand-written runs


def phase(tasks):
    return {"loss": 1.0, "tasks": tasks}


def fake_run(path, tasks, weighting="", *, final=None, config=None, epochs=None, test=None, best_epoch=1):
    """A run folder: summary.json (best = ``tasks``, final = ``final`` or ``tasks``), and optionally config.yaml,
    metrics.jsonl (``epochs``: the val tasks of each epoch) and a test entry ``{"best": tasks, "last": tasks}``."""
    path.mkdir(parents=True)
    names = set(tasks) | set(final or {})
    summary = {
        "weighting": weighting,
        "tasks": {t: {"directions": DIRECTIONS[t]} for t in names},
        "final": {"epoch": len(epochs or [0]), "val": phase(final or tasks)},
        "best": {"epoch": best_epoch, "val": phase(tasks)},
    }
    if test is not None:
        summary["test"] = {k: phase(v) for k, v in test.items()}
        summary["protocol"] = {"select": "val", "val": "carved", "test": "test"}
    (path / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    if epochs is not None:
        lines = [{"epoch": i + 1, "train": phase(v), "val": phase(v)} for i, v in enumerate(epochs)]
        (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def config(seed=0, weighting="equal", lr=0.01, name="scenes", tasks=("seg", "depth")):
    return {
        "name": name,
        "out_dir": f"runs_{name}",
        "tasks": {t: {"weight": 1.0} for t in tasks},
        "weighting": {"name": weighting, "options": {}},
        "optim": {"name": "adam", "lr": lr},
        "train": {"seed": seed, "epochs": 3},
    }


def test_runs_differing_only_in_seed_name_and_folder_are_grouped_and_labelled_by_what_differs(tmp_path):
    miou = {("equal", 0): 0.50, ("equal", 1): 0.60, ("equal", 2): 0.70, ("pcgrad", 0): 0.40, ("pcgrad", 1): 0.44}
    for (w, seed), m in miou.items():
        cfg = config(seed, w, name=f"run{seed}")  # the name and out_dir differ too: still one group
        fake_run(tmp_path / "runs" / w / f"s{seed}", {"seg": {"miou": m, "loss": 1.0}}, w, config=cfg)
    agg = aggregate([tmp_path / "runs"])
    assert [(g.label, len(g.runs)) for g in agg.groups] == [("weighting.name=equal", 3), ("weighting.name=pcgrad", 2)]
    equal, pcgrad = (g.stats["seg.miou"] for g in agg.groups)
    assert equal.values == [0.5, 0.6, 0.7] and [r.seed for r in agg.groups[0].runs] == [0, 1, 2]
    assert (equal.mean, equal.std) == (pytest.approx(0.6), pytest.approx(0.1))
    assert equal.ci_high - equal.mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert (pcgrad.mean, pcgrad.std) == (pytest.approx(0.42), pytest.approx(0.04 / math.sqrt(2)))
    assert pcgrad.ci_high - pcgrad.mean == pytest.approx(12.706205 * 0.04 / math.sqrt(2) / math.sqrt(2), rel=1e-5)


def test_two_differing_keys_make_the_label_and_one_config_is_labelled_by_its_name(tmp_path):
    fake_run(tmp_path / "a", {"seg": {"miou": 0.5}}, config=config(0, "equal", lr=0.01))
    fake_run(tmp_path / "b", {"seg": {"miou": 0.5}}, config=config(0, "pcgrad", lr=0.1))
    fake_run(tmp_path / "c", {"seg": {"miou": 0.5}}, config=config(0, "pcgrad", lr=0.1, tasks=("seg",)))
    labels = [g.label for g in aggregate([tmp_path]).groups]  # keys in the order of config.yaml (here sorted)
    assert labels == [
        "optim.lr=0.01 weighting.name=equal",
        "optim.lr=0.1 weighting.name=pcgrad",
        "optim.lr=0.1 tasks.depth=null weighting.name=pcgrad",
    ]
    d = fake_run(
        tmp_path / "d",
        {"seg": {"miou": 0.5}},
        config={**config(0, "pcgrad", lr=0.1), "tasks": {"seg": {"weight": 1.0}, "depth": {"weight": 2.0}}},
    )
    assert [g.label for g in aggregate([tmp_path / "b", tmp_path / "c", d]).groups] == [
        "tasks.depth.weight=1.0",
        "tasks.depth=null",
        "tasks.depth.weight=2.0",
    ]
    assert [g.label for g in aggregate([tmp_path / "a"]).groups] == ["scenes"]


def test_staged_runs_give_one_group_per_stage(tmp_path):
    for seed, (a, b) in enumerate([(0.5, 0.7), (0.6, 0.9)]):
        root = tmp_path / f"staged{seed}"
        root.mkdir()
        (root / "config.yaml").write_text(yaml.safe_dump(config(seed)))
        stages = [
            {
                "name": n,
                "tasks": {"seg": {"directions": DIRECTIONS["seg"]}},
                "best": {"val": phase({"seg": {"miou": v}})},
            }
            for n, v in (("head", a), ("full", b))
        ]
        (root / "summary.json").write_text(json.dumps({"run_dir": str(root), "stages": stages}))
    groups = aggregate([tmp_path]).groups
    assert [(g.label, g.stats["seg.miou"].values) for g in groups] == [
        ("scenes stage=head", [0.5, 0.6]),
        ("scenes stage=full", [0.7, 0.9]),
    ]
    assert str(groups[0].runs[0].dir).endswith("staged0/head")


def write_sweep(folder, runs):
    """A sweep folder as `mtl sweep` writes it; ``runs``: (point, seed, status, miou or None)."""
    points = {"lr_0.001": "optim.lr=0.001", "lr_0.01": "optim.lr=0.01"}
    manifest = {
        "version": 1,
        "config": "c.yaml",
        "seeds": [0, 1, 2],
        "grid": {"optim.lr": [0.001, 0.01]},
        "points": [{"id": i, "label": lab, "overrides": [lab]} for i, lab in points.items()],
        "runs": [],
    }
    for point, seed, status, miou in runs:
        manifest["runs"].append({"point": point, "seed": seed, "dir": f"{point}/seed{seed}", "status": status})
        if miou is not None:
            fake_run(folder / point / f"seed{seed}", {"seg": {"miou": miou}}, config=config(seed))
    (folder / "sweep.json").write_text(json.dumps(manifest))


def test_a_sweep_is_grouped_by_its_points_and_runs_not_done_are_named(tmp_path):
    sweep = tmp_path / "sweep"
    write_sweep(
        sweep,
        [
            ("lr_0.001", 0, "done", 0.5),
            ("lr_0.001", 1, "done", 0.7),
            ("lr_0.001", 2, "failed", None),
            ("lr_0.01", 0, "done", 0.4),
            ("lr_0.01", 1, "pending", None),
        ],
    )
    agg = aggregate([sweep])
    assert [(g.label, g.stats["seg.miou"].values, [r.seed for r in g.runs]) for g in agg.groups] == [
        ("optim.lr=0.001", [0.5, 0.7], [0, 1]),
        ("optim.lr=0.01", [0.4], [0]),
    ]
    assert agg.notes == [f"left out: {sweep / 'lr_0.001/seed2'} (failed), {sweep / 'lr_0.01/seed1'} (pending)"]
    table = compare_table([str(sweep)]).splitlines()
    assert (
        table[4]
        == f"| optim.lr=0.001 | 2 | 0.6000 ± 0.1414 [{0.6 - 12.706205 * 0.1:.4f}, {0.6 + 12.706205 * 0.1:.4f}] |"
    )
    assert table[5] == "| optim.lr=0.01 | 1 | 0.4000 |"
    assert "n = 1: the value of a single run, no ± or interval" in table


def test_the_same_run_given_twice_counts_once_and_repeated_seeds_are_noted(tmp_path):
    a = fake_run(tmp_path / "runs" / "a", {"seg": {"miou": 0.5}}, config=config(0))
    fake_run(tmp_path / "runs" / "b", {"seg": {"miou": 0.6}}, config=config(0))
    agg = aggregate([tmp_path / "runs", a])
    assert len(agg.groups) == 1 and agg.groups[0].stats["seg.miou"].values == [0.5, 0.6]
    assert agg.notes == ["scenes: several runs with seed 0 (not independent seeds)"]


# --------------------------------------------------------------------------- selection and reporting


def test_selection_best_last_and_last_k(tmp_path):
    epochs = [{"seg": {"miou": v}} for v in (0.3, 0.8, 0.5, 0.6)]
    best, last = {"seg": {"miou": 0.8}}, {"seg": {"miou": 0.6}}
    run = fake_run(tmp_path / "r", best, final=last, config=config(), epochs=epochs, best_epoch=2)

    def value(select):
        agg = aggregate([run], select)
        return agg.groups[0].stats["seg.miou"].mean, agg.protocol

    assert value("best")[0] == 0.8
    assert value("best")[1].startswith("selection: best epoch on validation (train.monitor); reported: validation;")
    assert value("last")[0] == 0.6 and value("final")[0] == 0.6  # final: the old --which name
    assert value("last:2")[0] == pytest.approx((0.5 + 0.6) / 2)
    assert value("last:4")[0] == pytest.approx((0.3 + 0.8 + 0.5 + 0.6) / 4)
    assert value("last:2")[1].startswith("selection: mean over the last 2 epochs; reported: validation;")
    with pytest.raises(UserError, match="has 4 epochs with validation metrics; give K <= 4"):
        aggregate([run], "last:5")
    for bad in ("worst", "last:0", "last:x", "best:2"):
        with pytest.raises(UserError, match="--select must be best, last or last:K"):
            aggregate([run], bad)


def test_test_metrics_are_reported_only_when_every_run_has_them_and_never_for_last_k(tmp_path):
    val = {"seg": {"miou": 0.8}}
    test = {"best": {"seg": {"miou": 0.7}}, "last": {"seg": {"miou": 0.65}}}
    epochs = [{"seg": {"miou": 0.8}}]
    a = fake_run(tmp_path / "a", val, config=config(0), epochs=epochs, test=test)
    b = fake_run(tmp_path / "b", val, config=config(1), epochs=epochs, test=test)
    agg = aggregate([a, b])
    assert agg.reported == "test" and agg.groups[0].stats["seg.miou"].values == [0.7, 0.7]
    assert "reported: test split (test), evaluated once;" in agg.protocol
    assert aggregate([a, b], "last").groups[0].stats["seg.miou"].values == [0.65, 0.65]
    on_val = aggregate([a, b], "last:1")
    assert on_val.reported == "val" and on_val.groups[0].stats["seg.miou"].values == [0.8, 0.8]
    c = fake_run(tmp_path / "c", val, config=config(2))  # no test split: the whole table reports validation
    mixed = aggregate([a, b, c])
    assert mixed.reported == "val" and mixed.groups[0].stats["seg.miou"].values == [0.8, 0.8, 0.8]


def test_run_curve_reads_metrics_jsonl(tmp_path):
    run = fake_run(tmp_path / "r", {"seg": {"miou": 0.5}}, epochs=[{"seg": {"miou": v}} for v in (0.3, 0.5)])
    assert run_curve(run, "seg", "miou") == [(1, 0.3), (2, 0.5)]
    assert run_curve(run, "seg", "miou", phase="train") == [(1, 0.3), (2, 0.5)]
    with pytest.raises(UserError, match="no val values of seg.iou; it has: seg.miou"):
        run_curve(run, "seg", "iou")


# --------------------------------------------------------------------------- delta-m in the table, baselines


def test_delta_m_is_computed_per_run_then_over_seeds_in_both_conventions(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("seg: {miou: 0.5}\ndepth: {abs_err: 0.4}\n")
    # seed 0: miou +10%, abs_err -20% -> flat (10 + 20) / 2 = 15; seed 1: miou +20%, abs_err 0% -> 10
    fake_run(tmp_path / "runs" / "s0", {"seg": {"miou": 0.55}, "depth": {"abs_err": 0.32}}, config=config(0))
    fake_run(tmp_path / "runs" / "s1", {"seg": {"miou": 0.6}, "depth": {"abs_err": 0.4}}, config=config(1))
    fake_run(tmp_path / "runs" / "seg", {"seg": {"miou": 0.6}}, config=config(0, tasks=("seg",)))
    agg = aggregate([tmp_path / "runs"], baseline=base)
    both = agg.groups[0]
    assert both.stats["delta_m_flat"].values == [pytest.approx(15.0), pytest.approx(10.0)]
    assert both.stats["delta_m_libmtl"].values == [pytest.approx(15.0), pytest.approx(10.0)]  # one metric per task
    assert both.stats["delta_m_flat"].std == pytest.approx(5 / math.sqrt(2))
    assert "delta_m_flat" not in agg.groups[1].stats  # the single-task run lacks the depth baseline
    assert agg.notes == [f"Δm n/a for runs without every task and metric of the baseline: {tmp_path / 'runs' / 'seg'}"]
    table = compare_table([str(tmp_path / "runs")], str(base)).splitlines()
    assert table[0].endswith("; Δm per run against the baseline, then over seeds (+ = better than the baseline)")
    assert table[2] == "| group | n | seg.miou | depth.abs_err | Δm % (flat) | Δm % (LibMTL Δp) |"
    half = 12.706205 * (5 / math.sqrt(2)) / math.sqrt(2)
    assert table[4].endswith(f"| +12.50 ± 3.54 [{12.5 - half:+.2f}, {12.5 + half:+.2f}] |")
    assert table[5].endswith("| 1 | 0.6000 |  | n/a | n/a |")


def test_write_baseline_averages_seeds_and_refuses_a_task_from_two_groups(tmp_path):
    seg = [
        fake_run(tmp_path / "seg" / f"s{i}", {"seg": {"miou": m, "loss": 1.0}}, config=config(i, tasks=("seg",)))
        for i, m in enumerate((0.5, 0.6))
    ]
    dep = fake_run(
        tmp_path / "depth" / "s0", {"depth": {"abs_err": 0.4, "loss": 0.3}}, config=config(0, tasks=("depth",))
    )
    out = tmp_path / "base.yaml"
    base = write_baseline([tmp_path / "seg", dep], out)
    assert base == {"seg": {"miou": pytest.approx(0.55)}, "depth": {"abs_err": 0.4}}
    assert load_baseline(out, DIRECTIONS) == base
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert f"# seg: n=2: {seg[0]}, {seg[1]}" in header and f"# depth: n=1: {dep}" in header
    assert "# reported: val" in header
    other = fake_run(tmp_path / "other", {"seg": {"miou": 0.9}}, config=config(0, lr=0.1, tasks=("seg",)))
    with pytest.raises(UserError, match=r"task 'seg' is in both groups 'optim.lr=0.01' and 'optim.lr=0.1'"):
        write_baseline([tmp_path / "seg", other], tmp_path / "refused.yaml")
    assert not (tmp_path / "refused.yaml").exists()


def test_metric_names_with_dots_stay_whole(tmp_path, capsys):
    """normal.within_11.25 is task normal, metric within_11.25, in the baseline, --metrics and the table."""
    runs = [
        fake_run(tmp_path / "n" / f"s{i}", {"normal": {"mean_angle": 20.0 + i, "within_11.25": 0.4}}, config=config(i))
        for i in range(2)
    ]
    base = write_baseline(runs, tmp_path / "b.yaml")
    assert base == {"normal": {"mean_angle": pytest.approx(20.5), "within_11.25": pytest.approx(0.4)}}
    assert main(["compare", *runs, "--metrics", "within_11.25"]) == 0
    assert "| normal.within_11.25 |" in capsys.readouterr().out


def test_a_baseline_from_validation_is_refused_for_a_table_on_test(tmp_path):
    out = tmp_path / "base.yaml"
    write_baseline([fake_run(tmp_path / "seg", {"seg": {"miou": 0.5}})], out)
    run = fake_run(
        tmp_path / "r",
        {"seg": {"miou": 0.5}},
        test={"best": {"seg": {"miou": 0.4}}, "last": {"seg": {"miou": 0.4}}},
        epochs=[{"seg": {"miou": 0.5}}],
    )
    with pytest.raises(UserError, match="holds validation metrics but the runs report test metrics"):
        aggregate([run], baseline=out)
    write_baseline([run], tmp_path / "test.yaml")
    assert "# reported: test" in (tmp_path / "test.yaml").read_text()
    with pytest.raises(UserError, match="holds test metrics but the runs report validation metrics"):
        aggregate([tmp_path / "seg"], baseline=tmp_path / "test.yaml")
    assert aggregate([run], "last:1", baseline=out).reported == "val"


# --------------------------------------------------------------------------- formats and the command line


def test_csv_and_json_carry_the_statistics_and_per_seed_values(tmp_path, capsys):
    for seed, m in enumerate((0.5, 0.6, 0.7)):
        fake_run(tmp_path / "runs" / f"s{seed}", {"seg": {"miou": m, "loss": 1.0}}, config=config(seed))
    assert main(["compare", str(tmp_path / "runs"), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# selection: best epoch on validation (train.monitor)")
    rows = list(
        csv.DictReader(io.StringIO("".join(line + "\n" for line in out.splitlines() if not line.startswith("#"))))
    )
    assert [r["column"] for r in rows] == ["seg.miou"]
    row = rows[0]
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert (row["group"], row["n"], row["values"], row["seeds"]) == ("scenes", "3", "0.5;0.6;0.7", "0;1;2")
    assert [float(row[k]) for k in ("mean", "std", "ci_low", "ci_high")] == pytest.approx(
        [0.6, 0.1, 0.6 - half, 0.6 + half], rel=1e-5
    )
    assert main(["compare", str(tmp_path / "runs"), "--format", "json", "--metrics", "miou,loss"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reported"] == "val" and data["protocol"].startswith("selection: best epoch")
    group = data["groups"][0]
    assert group["n"] == 3 and [r["seed"] for r in group["runs"]] == [0, 1, 2]
    assert group["stats"]["seg.miou"]["values"] == [0.5, 0.6, 0.7] and group["stats"]["seg.loss"]["std"] == 0.0
    assert group["stats"]["seg.miou"]["ci_low"] == pytest.approx(0.6 - half, rel=1e-5)


def test_command_line_selection_options_and_refusals(tmp_path, capsys):
    run = fake_run(tmp_path / "r", {"seg": {"miou": 0.8}}, final={"seg": {"miou": 0.6}}, config=config())
    assert main(["compare", run, "--which", "final"]) == 0
    assert capsys.readouterr().out.splitlines()[4] == "| scenes | 1 | 0.6000 |"
    assert main(["compare", run, "--which", "final", "--select", "best"]) == 2
    assert "--which final and --select best disagree" in capsys.readouterr().err
    assert main(["compare", run, "--select", "worst"]) == 2
    assert "--select must be best, last or last:K (the mean over the last K epochs, K >= 1); got 'worst'" in (
        capsys.readouterr().err
    )
    assert main(["compare", run, "--select", "last:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtl: error: ") and "has no metrics.jsonl" in err[0]
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_unfinished_and_continual_runs_in_a_folder_are_named_not_counted(tmp_path):
    fake_run(tmp_path / "runs" / "done", {"seg": {"miou": 0.5}}, config=config())
    (tmp_path / "runs" / "running" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "running" / "config.yaml").write_text(yaml.safe_dump(config(1)))
    (tmp_path / "runs" / "cl").mkdir()
    (tmp_path / "runs" / "cl" / "summary.json").write_text(json.dumps({"tasks": ["a", "b"], "methods": {}}))
    agg = aggregate([tmp_path / "runs"])
    assert [len(g.runs) for g in agg.groups] == [1]
    cl, running = tmp_path / "runs" / "cl", tmp_path / "runs" / "running"
    assert agg.notes == [
        f"left out: {cl} (a continual run: see its results.md), {running} (no summary.json: unfinished?)"
    ]
    with pytest.raises(UserError, match="is a continual run"):
        aggregate([cl])


def test_time_option_gives_ms_per_step_over_seeds_and_the_ratio_to_the_first_group(tmp_path, capsys):
    # (train seconds per epoch, steps per epoch) of each run: equal 10 and 12 ms/step, pcgrad 25 and 27 ms/step
    timings = {("equal", 0): (1.0, 100), ("equal", 1): (1.2, 100), ("pcgrad", 0): (2.5, 100), ("pcgrad", 1): (2.7, 100)}
    for (w, seed), (train_s, steps) in timings.items():
        path = tmp_path / "runs" / w / f"s{seed}"
        fake_run(path, {"seg": {"miou": 0.5}}, w, config=config(seed, w))
        summary = json.loads((path / "summary.json").read_text())
        summary.update(steps_per_epoch=steps, time={"mean_train_epoch_s": train_s})
        summary["memory"] = {"peak_mib": 100.0 if w == "equal" else 150.0 + seed}
        (path / "summary.json").write_text(json.dumps(summary))
    agg = aggregate([tmp_path / "runs"], timing=True)
    step = {g.label: g.stats["step_ms"] for g in agg.groups}
    assert step["weighting.name=equal"].mean == pytest.approx(11.0) and step[
        "weighting.name=pcgrad"
    ].mean == pytest.approx(26.0)
    assert step["weighting.name=equal"].std == pytest.approx(math.sqrt(2))  # (1^2 + 1^2) / (2 - 1)
    assert main(["compare", str(tmp_path / "runs"), "--time"]) == 0
    out = capsys.readouterr().out
    assert "| train ms/step | × weighting.name=equal | train peak MiB | × weighting.name=equal |" in out
    row = next(line for line in out.splitlines() if line.startswith("| weighting.name=pcgrad"))
    assert row.endswith(f"| {26 / 11:.2f} | 150.5 ± 0.7 [144.1, 156.9] | {150.5 / 100:.2f} |") and "26.0 ± 1.4" in row
    assert "step_ms" not in aggregate([tmp_path / "runs"]).columns  # only with --time
    assert "features s" not in out  # no run cached features
    cached = tmp_path / "runs" / "equal" / "s0" / "summary.json"
    cached.write_text(json.dumps({**json.loads(cached.read_text()), "feature_cache_s": 3.25}))
    assert main(["compare", str(tmp_path / "runs"), "--time"]) == 0
    out = capsys.readouterr().out
    assert "| features s (once) | train ms/step |" in out and "features s (once): the seconds spent caching" in out
    row = next(line for line in out.splitlines() if line.startswith("| weighting.name=equal"))
    assert "| 3.2 (n=1) | 11.0 ± 1.4" in row  # one of the two seeds cached
    write_baseline([tmp_path / "runs" / "equal"], tmp_path / "b.yaml")  # the time column is no task
    assert set(load_baseline(tmp_path / "b.yaml")) == {"seg"}


def test_sweeps_without_a_grid_are_labelled_by_their_folder(tmp_path):
    for name, miou in (("base_seg", 0.5), ("base_other", 0.6)):
        folder = tmp_path / name
        folder.mkdir()
        fake_run(folder / "default" / "seed0", {"seg": {"miou": miou}}, config=config(0))
        manifest = {"version": 1, "config": "c.yaml", "seeds": [0], "grid": {}}
        manifest["points"] = [{"id": "default", "label": "", "overrides": []}]
        manifest["runs"] = [{"point": "default", "seed": 0, "dir": "default/seed0", "status": "done"}]
        (folder / "sweep.json").write_text(json.dumps(manifest))
    agg = aggregate([tmp_path / "base_seg", tmp_path / "base_other"])
    assert [g.label for g in agg.groups] == ["base_seg", "base_other"]
