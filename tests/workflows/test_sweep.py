"""``mtl sweep``: grid expansion, refusal before writing, real sweeps (local, --jobs 2, submitit_local), resume, and
``mtl train --run-dir``. The runs are subprocesses of tiny small_cnn trainings (1 epoch on 16-pixel images)."""

import json
import shutil
import sys

import pytest
import yaml
from conftest import make_folder, tiny_config
from test_bad_input import refused

from mtl.cli import main
from mtl.core.errors import UserError
from mtl.core.rundir import lock_run_dir
from mtl.workflows import launchers
from mtl.workflows.sweep import check_empty_dir, plan_sweep, split_values

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"train.epochs": 1, "data.image_size": 16, "data.resize_size": 16, "train.log_images": 0}


def _config(tmp, **extra) -> str:
    root = tmp / "colors"
    if not root.is_dir():
        make_folder(root, per_class=(4, 2), size=16)
    raw = tiny_config(root, tmp / "runs", **{**TINY, **extra})
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _manifest(sweep_dir):
    return json.loads((sweep_dir / "sweep.json").read_text())


# --------------------------------------------------------------------------- the grid, without running anything


def test_top_level_commas_split_and_brackets_braces_quotes_do_not():
    assert split_values("0.001,3e-3") == ["0.001", "3e-3"]
    assert split_values("[1,2],[3, 4]") == ["[1,2]", "[3, 4]"]
    assert split_values("{until: layer3, x: 1},all") == ["{until: layer3, x: 1}", "all"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("[1,2]") == ["[1,2]"]


def test_grid_order_types_and_bracket_lists(tmp_path):
    plan = plan_sweep(
        _config(tmp_path),
        ["optim.lr=1e-3,0.003", "weighting.name=equal,pcgrad", "data.mean=[0.4,0.4,0.4]", "train.epochs=2"],
        "0,1",
        {},
    )
    m = plan["manifest"]
    assert m["version"] == 1 and m["seeds"] == [0, 1]
    assert m["grid"] == {"optim.lr": [0.001, 0.003], "weighting.name": ["equal", "pcgrad"]}
    assert type(m["grid"]["optim.lr"][0]) is float  # 1e-3 is a number, as in configs
    # the first axis is the outermost; one-valued arguments (a bracketed list too) are set for every run
    assert [p["label"] for p in m["points"]] == [
        "optim.lr=1e-3 weighting.name=equal",
        "optim.lr=1e-3 weighting.name=pcgrad",
        "optim.lr=0.003 weighting.name=equal",
        "optim.lr=0.003 weighting.name=pcgrad",
    ]
    assert m["points"][1]["overrides"] == ["optim.lr=1e-3", "weighting.name=pcgrad"]
    assert len({p["id"] for p in m["points"]}) == 4 and all("/" not in p["id"] for p in m["points"])
    assert [(r["point"], r["seed"]) for r in m["runs"]][:3] == [
        (m["points"][0]["id"], 0),
        (m["points"][0]["id"], 1),
        (m["points"][1]["id"], 0),
    ]
    assert m["runs"][3]["dir"] == f"{m['points'][1]['id']}/seed1" and {r["status"] for r in m["runs"]} == {"pending"}
    assert plan["config"]["data"]["mean"] == [0.4, 0.4, 0.4] and plan["config"]["train"]["epochs"] == 2


def test_yaml_sweep_section_and_command_line_merge(tmp_path):
    path = _config(
        tmp_path,
        sweep={
            "seeds": [3, 4, 5],
            "grid": {"optim.lr": [0.001, 0.003], "data.std": [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]},
            "jobs": 2,
        },
    )
    m = plan_sweep(path, [], None, {})["manifest"]
    assert m["seeds"] == [3, 4, 5] and m["launcher"]["jobs"] == 2 and m["launcher"]["launcher"] == "local"
    assert m["points"][1]["overrides"] == ["optim.lr=0.001", "data.std=[0.25, 0.25, 0.25]"]
    # the command line replaces the YAML's values of an axis (in place), adds axes, and its seeds and jobs win
    m = plan_sweep(path, ["optim.lr=0.01", "weighting.name=equal,famo"], "7", {"jobs": 1})["manifest"]
    assert m["seeds"] == [7] and m["launcher"]["jobs"] == 1
    assert m["grid"] == {
        "optim.lr": [0.01],
        "data.std": [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]],
        "weighting.name": ["equal", "famo"],
    }
    assert len(m["points"]) == 4 and m["points"][0]["label"].startswith("optim.lr=0.01 data.std=")
    # no grid and no seeds: one run with the config's own train.seed
    m = plan_sweep(_config(tmp_path / "plain", **{"train.seed": 9}), [], None, {})["manifest"]
    assert [(p["id"], p["label"]) for p in m["points"]] == [("default", "")]
    assert m["runs"] == [{"point": "default", "seed": 9, "dir": "default/seed9", "status": "pending"}]


@pytest.mark.parametrize(
    "args, words",
    [
        (["optim.lrr=0.1,0.2"], ["optim.lrr", "did you mean"]),
        (["optim.lr=0.1,abc"], ["sweep point optim.lr=abc, seed 0", "optim.lr", "a number"]),
        (["optim.lr=0.1,0.1"], ["optim.lr", "twice"]),
        (["--seeds", "0,x"], ["--seeds", "0,1,2"]),
        (["--seeds", "0,-1"], ["seed -1", "train.seed", ">= 0"]),
        (["--jobs", "0"], ["sweep.jobs", ">= 1"]),
        (["sweep.jobs=2"], ["sweep.*"]),
        (["data.classes=[red,purple],[red,green]", "train.device=gpu"], ["train.device", "cuda"]),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(args, words, tmp_path, capsys):
    path = _config(tmp_path)
    refused(capsys, ["sweep", path, *args, "--dir", tmp_path / "sweep"], *words, runs=tmp_path / "runs")
    assert not (tmp_path / "sweep").exists()


def test_a_bad_yaml_grid_and_a_used_dir_are_refused(tmp_path, capsys):
    path = _config(tmp_path, sweep={"grid": {"optim.lr": 0.1}})
    refused(capsys, ["sweep", path], "sweep.grid.optim.lr", "a list", runs=tmp_path / "runs")
    path = _config(tmp_path, sweep={"grid": {"optim.lr": []}})
    refused(capsys, ["sweep", path], "optim.lr", "no values", runs=tmp_path / "runs")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    refused(capsys, ["sweep", _config(tmp_path), "--dir", used], "--dir", "not empty", "--resume")
    assert [p.name for p in used.iterdir()] == ["keep.txt"]


def test_missing_submitit_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    path = _config(tmp_path)
    line = refused(capsys, ["sweep", path, "--launcher", "submitit_local"], "submitit", runs=tmp_path / "runs")
    assert "pip install 'mtl[cluster]'" in line


def test_slurm_needs_sbatch(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launchers.shutil, "which", lambda name: None)
    refused(capsys, ["sweep", _config(tmp_path), "--launcher", "slurm"], "sbatch", runs=tmp_path / "runs")


def test_parallel_slots_share_the_cores_and_get_a_gpu_each():
    assert launchers.slot_env(0, 1, 16, ["0", "1"]) == {}  # one at a time: the environment as it is
    assert launchers.slot_env(1, 2, 2, []) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert launchers.slot_env(1, 3, 16, ["4", "5", "6"]) == {
        "OMP_NUM_THREADS": "5",
        "MKL_NUM_THREADS": "5",
        "CUDA_VISIBLE_DEVICES": "5",
    }
    assert "CUDA_VISIBLE_DEVICES" not in launchers.slot_env(1, 4, 16, ["0", "1"])  # fewer GPUs than jobs: shared


def test_cluster_jobs_ask_for_what_sweep_slurm_says():
    slurm = {
        "partition": "gpu",
        "gpus_per_node": 4,
        "cpus_per_task": 16,
        "mem_gb": 64.0,
        "time": 90,
        "array_parallelism": 8,
        "extra": {"account": "abc"},
    }
    params = launchers.submitit_parameters(slurm, "s")
    assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 4 and params["timeout_min"] == 90
    assert params["slurm_array_parallelism"] == 8 and params["slurm_additional_parameters"] == {"account": "abc"}
    assert params["tasks_per_node"] == 1 and params["cpus_per_task"] == 16 and params["mem_gb"] == 64.0
    assert launchers.job_env(slurm)["OMP_NUM_THREADS"] == "4"  # 16 CPUs over 4 processes
    command = launchers.mtl_command(["train", "c.yaml"], gpus=4)
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "mtl",
        "train",
        "c.yaml",
    ]
    assert launchers.mtl_command(["train"], gpus=1)[1:] == ["-m", "mtl", "train"]


# --------------------------------------------------------------------------- real sweeps


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A 2-point x 2-seed sweep run with --jobs 2, and what it printed."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = _config(tmp)
    out = tmp / "out.txt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", open(out, "w"))
        code = main(["sweep", path, "--seeds", "0,1", "optim.lr=0.01,0.02", "--jobs", "2", "--dir", str(tmp / "s")])
        sys.stdout.close()
    return tmp / "s", code, out.read_text()


def test_two_points_two_seeds_end_to_end(finished_sweep):
    sweep_dir, code, printed = finished_sweep
    assert code == 0, printed
    m = _manifest(sweep_dir)
    assert [r["status"] for r in m["runs"]] == ["done"] * 4
    assert [p["label"] for p in m["points"]] == ["optim.lr=0.01", "optim.lr=0.02"]
    assert (sweep_dir / "config.yaml").is_file() and "sweep" not in yaml.safe_load(
        (sweep_dir / "config.yaml").read_text()
    )
    for r in m["runs"]:
        run_dir = sweep_dir / r["dir"]
        summary = json.loads((run_dir / "summary.json").read_text())
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["train"]["seed"] == r["seed"] and summary["run_dir"] == str(run_dir.absolute())
        assert saved["optim"]["lr"] == m["grid"]["optim.lr"][m["points"].index(_point(m, r["point"]))]
        assert (run_dir / "checkpoints" / "last.pt").is_file()
        assert "done: best epoch 1 of 1" in (sweep_dir / "logs" / f"{r['point']}-seed{r['seed']}.log").read_text()
    # two seeds of one point differ; the runs are ordinary runs that mtl compare reads
    a, b = (json.loads((sweep_dir / r["dir"] / "summary.json").read_text()) for r in m["runs"][:2])
    assert a["final"]["train"]["loss"] != b["final"]["train"]["loss"]
    lines = printed.splitlines()
    assert "[4/4] optim.lr=0.02 seed 1: started" in lines
    assert any(line.startswith("[1/4] optim.lr=0.01 seed 0: done in ") for line in lines)
    assert lines[-1] == f"compare them: mtl compare {sweep_dir}"


def _point(m, point_id):
    return next(p for p in m["points"] if p["id"] == point_id)


def test_resume_skips_done_runs_resumes_interrupted_ones_and_starts_the_rest(finished_sweep, tmp_path, capsys):
    sweep_dir = tmp_path / "s"
    shutil.copytree(finished_sweep[0], sweep_dir)
    m = _manifest(sweep_dir)
    done, interrupted, partial, missing = (sweep_dir / r["dir"] for r in m["runs"])
    kept = (done / "summary.json").read_text()
    (interrupted / "summary.json").unlink()  # a checkpoint, no summary: interrupted
    shutil.rmtree(partial / "checkpoints")  # killed in its first epoch: nothing to resume, so it starts again
    (partial / "summary.json").unlink()
    m["runs"][3]["status"] = "running"  # a sweep killed while this run trained; the run itself finished
    (sweep_dir / "sweep.json").write_text(json.dumps(m))
    assert main(["sweep", "--resume", str(sweep_dir), "--jobs", "1"]) == 0  # one at a time: the default launcher
    out = capsys.readouterr().out
    assert f"sweep {sweep_dir}: 2 of 4 runs done; 1 to resume, 1 to start" in out
    assert "[2/4] optim.lr=0.01 seed 1: resumed" in out and "[3/4] optim.lr=0.02 seed 0: started" in out
    assert "[1/4]" not in out and "[4/4]" not in out
    assert (done / "summary.json").read_text() == kept  # untouched
    assert [r["status"] for r in _manifest(sweep_dir)["runs"]] == ["done"] * 4
    assert "mtl train --resume" in (sweep_dir / "logs" / f"{m['runs'][1]['point']}-seed1.log").read_text()
    for d in (interrupted, partial, missing):
        assert json.loads((d / "summary.json").read_text())["epochs"] == 1
    assert len(list((partial / "checkpoints").iterdir())) == 2  # trained again from the start


def test_two_resumes_of_one_sweep_refuse(finished_sweep, capsys):
    lock = lock_run_dir(finished_sweep[0])
    try:
        refused(capsys, ["sweep", "--resume", finished_sweep[0]], "is in use")
    finally:
        lock.release()
    refused(capsys, ["sweep", "--resume", finished_sweep[0].parent], "not a sweep directory")


def test_submitit_local_runs_an_array_and_a_failed_run_does_not_stop_the_others(tmp_path, capsys):
    pytest.importorskip("submitit")
    path = _config(tmp_path)
    args = ["sweep", path, "data.classes=[red,green],[red,purple]", "--launcher", "submitit_local"]
    assert main([*args, "--gpus-per-node", "0", "--time", "10", "--dir", str(tmp_path / "s")]) == 1
    captured = capsys.readouterr()
    m = _manifest(tmp_path / "s")
    assert [r["status"] for r in m["runs"]] == ["done", "failed"]
    summary = json.loads((tmp_path / "s" / m["runs"][0]["dir"] / "summary.json").read_text())
    assert sorted(summary["classes"]) == ["green", "red"]
    (failed,) = [line for line in captured.err.splitlines() if line.startswith("mtl: failed:")]
    assert "data.classes=[red,purple] seed 0" in failed and "purple" in failed and "-seed0.log" in failed
    assert "1 of 2 runs done, 1 failed" in captured.out


# --------------------------------------------------------------------------- mtl train --run-dir


def test_train_run_dir_writes_there_and_refuses_a_used_dir(tmp_path, capsys):
    path = _config(tmp_path, sweep={"seeds": [1, 2]})
    target = tmp_path / "exactly" / "here"
    assert main(["train", path, "--run-dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert "the sweep section of" in out and "used by mtl sweep only" in out
    assert json.loads((target / "summary.json").read_text())["run_dir"] == str(target)
    assert not (tmp_path / "runs").exists()
    before = sorted(p.name for p in target.iterdir())
    refused(capsys, ["train", path, "--run-dir", target], "--run-dir", "not empty", f"mtl train --resume {target}")
    assert sorted(p.name for p in target.iterdir()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="is a file"):
        check_empty_dir(path, "--run-dir")
    assert check_empty_dir(empty, "--run-dir") == empty
