"""End to end on a real local Ray: synth -> Parquet -> Ray Data -> 2 DDP workers -> metrics."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sslmm_ray.cli import app

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def last_json(output: str) -> dict:
    """The JSON object a ``--json`` command printed (Ray may log lines around it)."""
    return json.loads(output[output.index("{\n"): output.rindex("}") + 1])


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory) -> str:
    """Aligned mosi shapes, all labels, nothing missing: the easiest synthetic setting."""
    out = str(tmp_path_factory.mktemp("data") / "mosi")
    invoke("data", "synth", "--preset", "mosi", "--scale", "0.2", "--aligned", "--seed", "0",
           "--out", out)
    return out


def test_finetune_two_workers_end_to_end(ray_cluster, easy_data, tmp_path):
    run_dir = tmp_path / "runs" / "ft"
    output = invoke(
        "finetune", "--data", easy_data, "--run-dir", str(run_dir),
        "--label-ratio", "1.0", "--missing-rate", "0.0", "--workers", "2", "--epochs", "4",
        "--set", "model.hidden=32", "--json",
    )
    printed = last_json(output)

    # files written
    for name in ("config.json", "metrics.json", "best.json", "history.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and all((c / "state.pt").is_file() for c in checkpoints)

    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["finetune"]["workers"] == 2 and saved["model"]["hidden"] == 32
    history = json.loads((run_dir / "history.json").read_text())
    assert [int(h["epoch"]) for h in history] == [0, 1, 2, 3]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"] == printed["test"]
    assert set(metrics["valid"]) >= {"Non0_acc_2", "MAE", "Corr"}
    # clearly above chance (0.5) on the easy preset
    assert metrics["test"]["Non0_acc_2"] > 0.7, metrics["test"]
    assert metrics["test"]["Corr"] > 0.4, metrics["test"]

    # `sslmm evaluate` on the run directory (= its best checkpoint) reproduces the test metrics
    evaluated = last_json(
        invoke("evaluate", "--data", easy_data, "--checkpoint", str(run_dir), "--json")
    )
    assert evaluated == pytest.approx(metrics["test"], abs=1e-6)
