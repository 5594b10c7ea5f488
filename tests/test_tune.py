"""Hyper-parameter search (issue 6) on the session's Ray and a real S3 server (moto).

Kept tiny for a loaded 2-core machine: synthetic mosi at scale 0.05 (aligned), 1 epoch,
model.hidden=16, 1-4 trials per cell. The sweep's outputs are read back independently from
storage (Tune's own trial records, each Train run's files) and compared with what the sweep
and the report say.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import waiting
from typer.testing import CliRunner

from sslmm_ray import config as config_mod
from sslmm_ray import storage
from sslmm_ray.cli import app
from sslmm_ray.data import store, synth
from sslmm_ray.train.evaluate import evaluate_checkpoint
from sslmm_ray.tune import space
from sslmm_ray.tune.space import Cell

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--samples", "2", "--seed", "7", "--set", "model.hidden=16",
        "--set", "finetune.batch_size=16"]
runner = CliRunner()


def invoke(*args: str) -> dict:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.stdout
    return json.loads(out[out.index("{\n"): out.rindex("}") + 1])


@pytest.fixture(scope="module")
def tiny_data(s3) -> str:
    uri = s3.uri("tune/data")
    store.write_dataset(synth.generate("mosi", scale=0.05, aligned=True, seed=0), uri)
    return uri


def _jsonl_last(uri: str) -> dict:
    lines = [ln for ln in storage.read_bytes(uri).decode().splitlines() if ln.strip()]
    return json.loads(lines[-1])


def _tune_trials(cell_dir: str) -> dict[str, dict]:
    """Tune's own record of a cell's trials: trial id -> (params, last result)."""
    trials = {}
    for uri in storage.list_files(cell_dir, suffix="/params.json"):
        trial_dir = uri.rpartition("/")[0]
        trial_id = trial_dir.rpartition("/")[2].removeprefix("trial_")
        trials[trial_id] = {
            "params": storage.read_json(uri),
            "last": _jsonl_last(storage.join(trial_dir, "result.json")),
        }
    return trials


# --------------------------------------------------------------------------- unit


def test_search_space_and_seeded_searcher():
    cell = Cell(0.3, 0.5)
    assert cell.name == "cell_label0.3_missing0.5"
    assert space.grid([0.3, 0.1], [0.0, 0.3, 0.0]) == [
        Cell(0.1, 0.0), Cell(0.1, 0.3), Cell(0.3, 0.0), Cell(0.3, 0.3)
    ]

    def first(seed: int, n: int = 3) -> list[dict]:
        searcher = space.make_searcher("valid_Non0_acc_2", "max", seed)
        searcher.set_search_properties("valid_Non0_acc_2", "max", space.param_space(cell))
        return [searcher.suggest(f"t{i}") for i in range(n)]

    a, b, c = first(3), first(3), first(4)
    assert a == b, "same seed must suggest the same configurations"
    assert a != c
    for values in a:
        assert set(values) == set(space.SEARCHED)
        assert 0.5 <= values["tau"] <= 0.99
        assert 1e-3 <= values["lambda_rec"] <= 10
        assert 1e-4 <= values["lr"] <= 3e-3
        assert 0.1 <= values["unlabeled_weight"] <= 2.0


def test_trial_config_takes_cell_and_sampled_values_exactly():
    base = config_mod.load(overrides=["finetune.pretrained=s3://b/pre_mr{missing_rate}"])
    values = {"label_ratio": 0.3, "missing_rate": 0.6, "tau": 0.61234567,
              "lambda_rec": 0.00123, "lr": 0.000234, "unlabeled_weight": 1.5}
    trial = space.trial_config(base.to_dict(), values)
    ft = trial.finetune
    assert {k: getattr(ft, k) for k in values if k != "missing_rate"} == {
        k: v for k, v in values.items() if k != "missing_rate"}
    assert trial.missing.rate == values["missing_rate"]  # the cell's rate, for both stages
    assert ft.pretrained == "s3://b/pre_mr0.6"
    assert base.finetune.tau == config_mod.FinetuneConfig().tau  # the base is not modified


def test_plan_that_cannot_fit_fails_before_anything_runs(ray_cluster, tmp_path):
    result = runner.invoke(app, [
        "tune", "--data", str(tmp_path / "no-such-data"), "--storage", str(tmp_path / "sweep"),
        "--concurrency", "50", "--workers-per-trial", "2", "--label-ratios", "0.5",
        "--missing-rates", "0.0",
    ])
    assert isinstance(result.exception, ValueError)
    assert "50 concurrent trials x 2 workers" in str(result.exception)
    assert "--concurrency" in str(result.exception)
    assert not (tmp_path / "sweep").exists()


def test_cells_side_by_side_follow_one_trial_limit(monkeypatch):
    from sslmm_ray.ray_env import ClusterInfo
    from sslmm_ray.tune import sweep

    def cfg(*overrides: str) -> config_mod.ExperimentConfig:
        return config_mod.load(overrides=list(overrides))

    info = ClusterInfo(address="local", cpus=6, gpus=0, local=True)
    # default: the trials that fit beside Ray Data's CPU (5 of 1 CPU), by the cell's concurrency
    assert sweep.cells_at_once(cfg("tune.concurrency=1"), info, 16) == 5
    assert sweep.cells_at_once(cfg("tune.concurrency=2"), info, 16) == 2
    assert sweep.cells_at_once(cfg("tune.concurrency=1"), info, 3) == 3  # no more than cells
    assert sweep.cells_at_once(cfg("tune.workers_per_trial=2"), info, 16) == 2
    assert sweep.cells_at_once(cfg("tune.concurrency=4", "tune.max_concurrent_trials=9"), info,
                               16) == 2
    assert sweep.cells_at_once(cfg("tune.concurrency=4", "tune.max_concurrent_trials=3"), info,
                               16) == 1  # a cell's own concurrency always runs
    gpu = ClusterInfo(address="local", cpus=32, gpus=4, local=True)
    assert sweep.cells_at_once(cfg("finetune.gpus=true", "tune.workers_per_trial=2"), gpu,
                               16) == 2
    monkeypatch.setenv("SSLMM_AUTOSCALING", "1")  # nodes come on demand: every cell at once
    assert sweep.cells_at_once(cfg("tune.concurrency=2"), info, 16) == 16
    monkeypatch.delenv("SSLMM_AUTOSCALING")
    with pytest.raises(ValueError, match="--max-concurrent-trials 8"):
        sweep.check_plan(cfg("tune.max_concurrent_trials=8", "tune.concurrency=2"), info)


def test_side_by_side_runs_width_cells_at_once_and_stops_starting_after_a_crash():
    import threading

    from sslmm_ray.tune import sweep

    cells = [Cell(r, 0.5) for r in (0.1, 0.2, 0.3, 0.4)]
    go = {c.name: threading.Event() for c in cells}
    lock, running, most, started = threading.Lock(), [0], [0], []
    together = threading.Barrier(2, timeout=30)  # the first two cells must overlap

    def search(cell: Cell) -> dict:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            started.append(cell.label_ratio)
        if cell.label_ratio in (0.1, 0.2):
            together.wait()
        go[cell.name].wait(timeout=30)
        with lock:
            running[0] -= 1
        if cell.label_ratio == 0.2:
            raise RuntimeError("crash in cell 0.2")
        return {"cell": cell.name}

    crashes: list[BaseException] = []
    outcomes = sweep._side_by_side(search, cells, 2, stop=lambda: bool(crashes))
    seen = []
    for ratio in (0.1, 0.2, 0.3):
        go[Cell(ratio, 0.5).name].set()
        cell, outcome = next(outcomes)
        seen.append(cell.label_ratio)
        if isinstance(outcome, BaseException):
            crashes.append(outcome)
    assert seen == [0.1, 0.2, 0.3]
    assert "crash in cell 0.2" in str(crashes[0])
    assert next(outcomes, None) is None  # after the crash no later cell started
    assert sorted(started) == [0.1, 0.2, 0.3] and most[0] == 2  # two at once, never more


def test_report_gives_mean_and_spread_over_seeds_and_the_baseline_beside(tmp_path):
    from sslmm_ray.tune import report

    def result(ratio: float, accs: list[float], base: float | None) -> dict:
        tests = [{"Non0_acc_2": a, "MAE": 1.0 - a, "Corr": 0.5} for a in accs]
        return {
            "cell": Cell(ratio, 0.5).name, "label_ratio": ratio, "missing_rate": 0.5,
            "metric": "valid_MAE", "headline": "Non0_acc_2",
            "best": {"trial_id": "t", "config": {"tau": 0.9, "lambda_rec": 0.1, "lr": 1e-3,
                                                 "unlabeled_weight": 1.0},
                     "valid": {"MAE": 0.5, "Non0_acc_2": 0.7}, "test": tests[0],
                     "seeds": [{"seed": k, "test": t} for k, t in enumerate(tests)],
                     "test_mean": {k: float(np.mean([t[k] for t in tests])) for k in tests[0]},
                     "test_std": {k: float(np.std([t[k] for t in tests])) for k in tests[0]}},
            "trials": [{}],
            "baseline": None if base is None else {"test": {"Non0_acc_2": base,
                                                            "MAE": 1.0 - base}},
        }

    for ratio, accs, base in ((0.3, [0.8, 0.84], 0.79), (0.7, [0.9, 0.9], None)):
        storage.write_json(str(tmp_path / "results" / f"{Cell(ratio, 0.5).name}.json"),
                           result(ratio, accs, base))
    built = report.build(str(tmp_path))
    labels = report.cell_labels(built["rows"], "test_Non0_acc_2_mean",
                                "baseline_test_Non0_acc_2", "test_Non0_acc_2_std")
    assert labels == {(0.3, 0.5): "0.820 ± 0.020\nbase 0.790", (0.7, 0.5): "0.900 ± 0.000"}
    assert report.cell_labels(built["rows"], "test_MAE")[(0.3, 0.5)] == "0.200"
    row = built["rows"][0]
    assert row["seeds"] == 2 and row["test_MAE_mean"] == pytest.approx(0.18)
    md = built["files"]["report.md"].decode()
    assert "| baseline Non0_acc_2 |" in md and "0.7900" in md
    assert "test Non0_acc_2 mean | ± std |" in md and "0.8200 | 0.0200" in md
    assert built["files"]["heatmap_Non0_acc_2.png"][:4] == b"\x89PNG"


def test_dashboards_of_a_folder_without_a_sweep_is_a_clear_error(tmp_path):
    from sslmm_ray.tune.dashboards import fetch

    with pytest.raises(FileNotFoundError, match=r"holds no sweep \(sweep.json\)"):
        fetch(str(tmp_path / "nothing"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tune_gpus_are_the_trial_workers_gpus(ray_cluster, tmp_path):
    """``sslmm tune --gpus`` (and ``jobs/sweep.py``, which forwards tune's options) asks one GPU
    per trial worker: on this CPU-only cluster the plan is refused before anything runs."""
    result = runner.invoke(app, [
        "tune", "--data", str(tmp_path / "no-such-data"), "--storage", str(tmp_path / "sweep"),
        "--concurrency", "2", "--workers-per-trial", "1", "--label-ratios", "0.5",
        "--missing-rates", "0.0", "--gpus", "--precision", "bf16",
    ])
    assert isinstance(result.exception, ValueError), result.output
    assert "needs 2 GPUs but the cluster has 0" in str(result.exception)
    assert not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------- end to end


def test_grid_sweep_on_s3_and_report_match_recorded_results(ray_cluster, tiny_data, s3, tmp_path):
    sweep_uri = s3.uri("tune/grid")
    studies = f"sqlite:///{tmp_path / 'optuna.db'}"  # an s3:// sweep names an RDB
    printed = invoke(
        "tune", "--data", tiny_data, "--storage", sweep_uri, "--label-ratios", "0.3,0.7",
        "--missing-rates", "0.5", "--concurrency", "2", *TINY, "--samples", "1",
        "--optuna-storage", studies, "--json",
    )
    assert printed["optuna_storage"] == studies
    assert len(printed["cells"]) == 2 and printed["skipped"] == []
    # 6 CPUs hold 5 one-worker trials: both cells (2 trials each at most) searched side by side
    first, second = printed["cells"]
    assert max(first["started_at"], second["started_at"]) < min(first["finished_at"],
                                                                 second["finished_at"])
    metric = "valid_MAE"  # finetune.selection's default: every labeled validation row counts
    assert (printed["metric"], printed["mode"]) == (metric, "min")

    expected_rows = {}
    for cell in space.grid([0.3, 0.7], [0.5]):
        tune_trials = _tune_trials(storage.join(sweep_uri, cell.name))
        assert len(tune_trials) == 1, cell.name  # choosing among trials: the ASHA case
        runs = storage.join(sweep_uri, "runs", cell.name)
        for trial_id, rec in tune_trials.items():
            run_dir = storage.join(runs, trial_id)
            saved = storage.read_json(storage.join(run_dir, "config.json"))
            trained = saved["finetune"]
            # cell constants and sampled values reach the trial's config exactly
            assert trained["label_ratio"] == cell.label_ratio
            assert saved["missing"]["rate"] == cell.missing_rate
            for key in space.SEARCHED:
                assert trained[key] == rec["params"][key], (cell.name, key)
            # Train's reports were forwarded to Tune unchanged
            history = storage.read_json(storage.join(run_dir, "history.json"))
            assert len(history) == 1
            assert rec["last"][metric] == pytest.approx(history[-1][metric])
            assert list(storage.list_files(storage.join(run_dir, "tensorboard")))
        # the cell's durable Optuna study holds exactly the trials Tune ran
        study = optuna.load_study(study_name=printed["studies"][cell.name], storage=studies)
        assert sorted(((t.params, t.value) for t in study.trials), key=str) == sorted((
            ({k: r["params"][k] for k in space.SEARCHED}, r["last"][f"best_{metric}"])
            for r in tune_trials.values()), key=str)
        best_value = min(t["last"][metric] for t in tune_trials.values())
        best_ids = [i for i, t in tune_trials.items() if t["last"][metric] == best_value]
        expected_rows[cell.name] = (best_value, best_ids, runs, tune_trials)

    report = invoke("report", sweep_uri, "--out", str(tmp_path / "rep"), "--json")
    rows = {r["cell"]: r for r in report["rows"]}
    assert set(rows) == set(expected_rows)
    csv_rows = {r["cell"]: r for r in csv.DictReader(io.StringIO((tmp_path / "rep" /
                                                                  "report.csv").read_text()))}
    for name, (best_value, best_ids, runs, tune_trials) in expected_rows.items():
        row = rows[name]
        assert row["valid_MAE"] == pytest.approx(best_value)
        assert "valid_Non0_acc_2" in row  # reports still lead with the headline metric
        assert row["trial_id"] in best_ids
        chosen = tune_trials[row["trial_id"]]["params"]
        assert (row["tau"], row["lambda_rec"]) == (chosen["tau"], chosen["lambda_rec"])
        # the test numbers are the chosen trial's best checkpoint evaluated on test
        best = storage.read_json(storage.join(runs, row["trial_id"], "best.json"))
        test = evaluate_checkpoint(best["checkpoint"], tiny_data, split="test")
        for key, value in test.items():
            assert row[f"test_{key}"] == pytest.approx(value, abs=1e-9), (name, key)
            assert float(csv_rows[name][f"test_{key}"]) == pytest.approx(value, abs=1e-9)

    for fname in ("report.md", "report.csv", "heatmap_Non0_acc_2.png", "heatmap_MAE.png"):
        assert storage.exists(storage.join(sweep_uri, "report", fname)), fname
        assert (tmp_path / "rep" / fname).is_file()
    assert (tmp_path / "rep" / "heatmap_MAE.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("\n| 0.") == 2  # one table row per cell

    # dashboards: the S3 sweep's TensorBoard files and Tune records, fetched to a local folder
    local = tmp_path / "dash"
    dash = invoke("dashboards", sweep_uri, "--out", str(local), "--json")
    assert dash["commands"] == {"tensorboard": f"tensorboard --logdir {local}",
                                "optuna_dashboard": f"optuna-dashboard {studies}"}
    for name, (_, _, _, tune_trials) in expected_rows.items():
        for trial_id in tune_trials:
            assert list((local / "runs" / name / trial_id / "tensorboard").iterdir())
            assert (local / name / f"trial_{trial_id}" / "params.json").is_file()
    assert not [f for f in dash["files"] if "checkpoint" in f]  # dashboards only
    _optuna_dashboard_serves(studies, printed["studies"].values())

    # a re-run skips the finished cells
    again = invoke(
        "tune", "--data", tiny_data, "--storage", sweep_uri, "--label-ratios", "0.3,0.7",
        "--missing-rates", "0.5", "--concurrency", "2", *TINY, "--samples", "1",
        "--optuna-storage", studies, "--json",
    )
    assert sorted(again["skipped"]) == sorted(expected_rows)


def _optuna_dashboard_serves(url: str, study_names) -> None:
    """optuna-dashboard, a process on 127.0.0.1, lists exactly the sweep's studies over HTTP."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")), "--host",
                             "127.0.0.1", "--port", str(port), url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def listed() -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=5) as reply:
                    return reply.read()
            except OSError:
                return None

        body = waiting.wait_for(lambda: listed() or proc.poll() is not None,
                                "optuna-dashboard on 127.0.0.1", timeout=120, every=0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        served = {s["study_name"] for s in json.loads(body)["study_summaries"]}
        assert served == set(study_names)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- resume


def _terminated_in_state(cell_dir: str) -> set[str]:
    """Trial ids that Tune's saved experiment state records as TERMINATED."""
    states = storage.list_files(cell_dir, suffix=".json")
    states = [s for s in states if s.rpartition("/")[2].startswith("experiment_state-")]
    if not states:
        return set()
    try:
        state = storage.read_json(states[-1])
    except (storage.StorageError, FileNotFoundError):  # replaced while we read it: poll again
        return set()
    done = set()
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        if trial.get("status") == "TERMINATED":
            done.add(trial["trial_id"])
    return done


def test_killed_sweep_resumes_without_repeating_finished_trials(ray_cluster, tiny_data, s3):
    """Two cells searching side by side, the driver killed once a trial has finished: the
    re-run trains no finished trial again and ends with what an uninterrupted sweep of the same
    seed runs (each cell's trials are its seeded searcher's first suggestions)."""
    import ray

    sweep_uri = s3.uri("tune/resume")
    cells = space.grid([0.3, 0.7], [0.3])
    cmd = [sys.executable, "-m", "sslmm_ray.cli", "tune", "--data", tiny_data,
           "--storage", sweep_uri, "--label-ratios", "0.3,0.7", "--missing-rates", "0.3",
           "--concurrency", "1", *TINY, "--json"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "1", "SSLMM_PROGRESS": "0"}

    def finished_now() -> set[tuple[str, str]]:
        out = set()
        for cell in cells:
            runs = storage.join(sweep_uri, "runs", cell.name)
            done_runs = {u.rpartition("/")[0].rpartition("/")[2]
                         for u in storage.list_files(runs, suffix="/metrics.json")}
            done = done_runs & _terminated_in_state(storage.join(sweep_uri, cell.name))
            out |= {(cell.name, t) for t in done}
        return out

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished: set[tuple[str, str]] = set()
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            finished = finished_now()
            if finished:
                break
            time.sleep(2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver's own session, started above
        proc.wait(timeout=30)
    assert finished, f"no trial finished before the deadline: {proc.stderr.read()[-3000:]!r}"
    assert len(finished) < 2 * len(cells)  # killed mid-sweep, not after it
    for cell in cells:
        assert not storage.exists(storage.join(sweep_uri, "results", f"{cell.name}.json"))
    before = {(c, t): storage.read_bytes(storage.join(sweep_uri, "runs", c, t, "metrics.json"))
              for c, t in finished}

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for (name, trial_id), metrics in before.items():
        runs = storage.join(sweep_uri, "runs", name)
        # not trained again: same published summary, still one epoch, one report in Tune
        assert storage.read_bytes(storage.join(runs, trial_id, "metrics.json")) == metrics
        assert len(storage.read_json(storage.join(runs, trial_id, "history.json"))) == 1
    for cell in cells:
        result = storage.read_json(storage.join(sweep_uri, "results", f"{cell.name}.json"))
        ids = [t["trial_id"] for t in result["trials"]]
        assert len(ids) == 2 and all(t["finished"] for t in result["trials"]), cell.name
        assert {t for c, t in finished if c == cell.name} <= set(ids)
        assert not math.isnan(result["best"]["test"]["MAE"])
        tune_trials = _tune_trials(storage.join(sweep_uri, cell.name))
        assert set(ids) <= set(tune_trials)
        # the same trials as an uninterrupted sweep: the cell's seeded searcher's first two
        fresh = space.make_searcher(result["metric"], "min", 7)
        fresh.set_search_properties(result["metric"], "min", space.param_space(cell))
        expected = sorted((fresh.suggest(f"t{i}") for i in range(2)), key=str)
        ran = sorted(({k: tune_trials[i]["params"][k] for k in space.SEARCHED} for i in ids),
                     key=str)
        assert ran == [{k: e[k] for k in space.SEARCHED} for e in expected], cell.name


def test_asha_stops_weak_trials_early_and_frees_their_workers(ray_cluster, tiny_data, tmp_path):
    """ASHA over epochs: some trial ends before the last epoch and is recorded with the epochs
    Tune saw, the cell still publishes a tested best, and every CPU comes back."""
    import ray

    total = ray.cluster_resources()["CPU"]
    printed = invoke(
        "tune", "--data", tiny_data, "--storage", str(tmp_path / "asha"), "--label-ratios",
        "0.5", "--missing-rates", "0.5", "--concurrency", "1", "--asha", *TINY,
        "--epochs", "3", "--samples", "3", "--json",
    )
    (cell,) = printed["cells"]
    result = json.loads((tmp_path / "asha" / "results" / f"{cell['cell']}.json").read_text())
    trials = result["trials"]
    assert len(trials) == 3
    stopped = [t for t in trials if t["epochs"] < 3]
    assert stopped, [(t["trial_id"], t["epochs"]) for t in trials]
    cell_dir = tmp_path / "asha" / cell["cell"]
    for t in stopped:
        assert t["epochs"] >= 1  # grace period: at least one epoch
        # the record holds exactly the epochs Tune saw before it stopped the trial
        seen = [json.loads(line) for line in
                (cell_dir / f"trial_{t['trial_id']}" / "result.json").read_text().splitlines()]
        assert t["epochs"] == seen[-1]["epochs_done"] == len(seen)
        assert t["best_valid"] == min(r["valid_MAE"] for r in seen)
        # Optuna and ASHA were scored on the best-so-far value that selection uses
        assert seen[-1]["best_valid_MAE"] == t["best_valid"]
    assert any(t["finished"] and t["epochs"] == 3 for t in trials)
    assert not math.isnan(result["best"]["test"]["MAE"])
    # A local sweep keeps its studies in a journal beside its files, stopped trials included.
    journal = tmp_path / "asha" / "optuna.journal"
    assert printed["optuna_storage"] == str(journal)
    study = optuna.load_study(study_name=f"asha.{cell['cell']}",
                              storage=space.optuna_storage(str(journal)))
    assert sorted(t.value for t in study.trials) == sorted(t["best_valid"] for t in trials)

    # A stopped trial's Train controller and workers are gone, not holding CPUs (Ray Train's
    # placement-group cleaner can take a minute on a loaded machine).
    deadline = time.monotonic() + 180
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(1)
    from ray._private import state

    alive = [a["ActorClassName"] for a in state.actors().values() if a["State"] == "ALIVE"]
    assert ray.available_resources().get("CPU", 0) == total, alive


def test_best_checkpoint_of_a_stopped_trial_uses_the_epochs_tune_saw(tmp_path):
    from sslmm_ray.storage import StorageOptions
    from sslmm_ray.tune.sweep import best_checkpoint

    run_dir = tmp_path / "run"
    for epoch, value in [(0, 0.4), (1, 0.7), (2, 0.6)]:
        folder = run_dir / f"checkpoint_{epoch}"
        folder.mkdir(parents=True)
        metrics = {"valid_Non0_acc_2": value, "epoch": float(epoch)}
        (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": metrics}))
    (run_dir / "best.json").write_text(json.dumps({"checkpoint": "elsewhere", "metrics": {}}))
    opts = StorageOptions.from_env(None)
    metric = "valid_Non0_acc_2"

    uri, metrics = best_checkpoint(str(run_dir), metric, opts, epochs=1)
    assert uri.endswith("checkpoint_0") and metrics[metric] == 0.4  # not the later 0.7
    assert best_checkpoint(str(run_dir), metric, opts, epochs=3)[0].endswith("checkpoint_1")
    assert best_checkpoint(str(run_dir), metric, opts)[0] == "elsewhere"  # finished: best.json
    # every checkpoint Tune saw was dropped by retention: the best kept one
    assert best_checkpoint(str(run_dir), metric, opts, mode="min", epochs=3)[0].endswith(
        "checkpoint_0")  # a loss-like metric (MAE) picks the smallest value
    (run_dir / "checkpoint_0" / "meta.json").unlink()
    assert best_checkpoint(str(run_dir), metric, opts, epochs=1)[0].endswith("checkpoint_1")
