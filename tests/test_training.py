"""The two training stages on a real local Ray: end to end through the CLI on 2 DDP workers,
fault tolerance, DDP, checkpoints (the S3 end to end runs on several nodes in
test_multinode.py)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
import waiting
from typer.testing import CliRunner

from sslmm_ray import config as config_mod
from sslmm_ray import storage
from sslmm_ray.cli import app
from sslmm_ray.data import store, synth
from sslmm_ray.data.sources import DataError
from sslmm_ray.train import checkpoint as ckpt
from sslmm_ray.train.evaluate import evaluate_checkpoint
from sslmm_ray.train.runlog import RunLog
from sslmm_ray.train.runner import run_stage

runner = CliRunner()
TINY = ["model.hidden=16", "model.segments=4", "model.iterations=1", "model.dropout=0.0"]
DEADLINE_S = 240


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def last_json(output: str) -> dict:
    """The JSON object a ``--json`` command printed (Ray may log lines around it)."""
    return json.loads(output[output.index("{\n"): output.rindex("}") + 1])


def tiny_config(data_uri: str, *extra: str) -> config_mod.ExperimentConfig:
    return config_mod.load(overrides=[f"data.uri={data_uri}", *TINY, *extra])


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("data") / "mosi")
    store.write_dataset(synth.generate("mosi", scale=0.05, aligned=True, seed=1), uri)
    return uri


wait_for = functools.partial(waiting.wait_for, timeout=DEADLINE_S)


def epochs_done(run_dir: str) -> list[int]:
    try:
        return [int(h["epoch"]) for h in RunLog.read(run_dir, storage.StorageOptions())]
    except Exception:
        return []


def test_pretrained_protocol_mismatch_is_refused(ray_cluster, local_data, tmp_path):
    pre_dir = str(tmp_path / "pre")
    run_stage("pretrain", tiny_config(local_data, "pretrain.epochs=1", "missing.rate=0.0"),
              pre_dir)
    cfg = tiny_config(local_data, "missing.rate=0.5", f"finetune.pretrained={pre_dir}")
    with pytest.raises(ckpt.CheckpointError, match="visible in pre-training"):
        run_stage("finetune", cfg, str(tmp_path / "ft"))
    # an ablation the pre-trained model contradicts is refused, never silently dropped
    for ablation in ("model.propagation=intra", "model.fusion=early"):
        cfg = tiny_config(local_data, ablation, f"finetune.pretrained={pre_dir}",
                          "missing.rate=0.0")
        with pytest.raises(config_mod.ConfigError, match=f"{ablation.split('=')[0]}="):
            run_stage("finetune", cfg, str(tmp_path / "ft-ablation"))
    cfg = tiny_config(local_data, "data.normalize=false", f"finetune.pretrained={pre_dir}",
                      "missing.rate=0.0")
    with pytest.raises(ckpt.CheckpointError, match="data.normalize=True"):
        run_stage("finetune", cfg, str(tmp_path / "ft"))


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes (children of our own raylet)."""
    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline()[:1])]


def test_worker_killed_mid_run_recovers(ray_cluster, local_data, tmp_path):
    epochs = 3
    run_dir = str(tmp_path / "ft")
    cfg = tiny_config(local_data, f"finetune.epochs={epochs}", "finetune.workers=2",
                      "finetune.max_failures=1")
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run_stage("finetune", cfg, run_dir)
        except BaseException as err:  # surfaced below
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_for(lambda: epochs_done(run_dir) or not thread.is_alive(), "epoch 0")
    workers = wait_for(lambda: _train_workers() or not thread.is_alive(), "train workers")
    assert thread.is_alive(), outcome
    victim = workers[-1]
    victim.kill()
    thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive(), "run did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert not victim.is_running()
    assert epochs_done(run_dir) == list(range(epochs))
    assert outcome["result"].test is not None


DDP_DIMS = {"text": 12, "audio": 5, "vision": 7}
DDP_LENGTHS = {"text": 6, "audio": 9, "vision": 8}
#: Parameters agree to float32 round-off of a sum split in two (observed: <= 5e-7 after 3
#: steps at lr 0.01); a real mismatch (per-rank normalisation, zeros vs None) is >= 1e-3.
PARAM_ATOL = 1e-5


def _ddp_batches(steps: int = 3) -> list[dict]:
    """Global batches of 16 rows (rank r of 2 takes rows 8r..8r+7) whose steps leave some
    parameter unused: step 0 drops nothing (decoders unused on every rank), step 1 has no
    vision anywhere in rank 1's half and labels only in rank 0's half, step 2 drops nothing in
    rank 0's half (decoders unused there only)."""
    from sslmm_ray.bench.train import fixed_batches

    batches = fixed_batches(DDP_DIMS, DDP_LENGTHS, 16, steps, seed=3, label_ratio=0.5)
    one = batches[1]["batch"]
    one["vision_mask"][8:] = False
    one["vision"][8:] = 0.0
    batches[1]["dropped"][8:, 2] = False  # nothing to drop where nothing is
    one["labeled"][8:] = False
    one["label"][8:] = 0.0
    batches[2]["dropped"][:8] = False
    return batches


def _ddp_config(*extra: str) -> config_mod.ExperimentConfig:
    # Deterministic draws on any worker count: no dropout, teacher views hide nothing (tau 0
    # keeps every pseudo-label, so the pseudo term is on); masks come from the batches.
    return config_mod.load(overrides=[
        *TINY, "finetune.view_mask_prob=0.0", "finetune.view_segment_prob=0.0",
        "finetune.tau=0.0", "finetune.rampup_epochs=0", "finetune.lr=0.01",
        "finetune.weight_decay=0.1", "pretrain.lr=0.01", "pretrain.weight_decay=0.1", *extra,
    ])


@pytest.fixture(scope="module")
def ddp_runs(ray_cluster) -> dict[int, dict]:
    """The same cases on 1 and 2 Ray Train workers (one launch each)."""
    from sslmm_ray.bench.train import run_steps, step_case

    batches = _ddp_batches()
    cases = [
        step_case("finetune", _ddp_config(), batches),
        step_case("pretrain", _ddp_config(), batches, stage="pretrain"),
        # the supervised term alone, on step 1 (labels only in rank 0's half)
        step_case("supervised", _ddp_config("finetune.pseudo_labels=false",
                                            "finetune.reconstruction=false"), batches[1:2]),
        step_case("bf16", _ddp_config("finetune.precision=bf16"), batches[:1]),
    ]
    return {w: run_steps(cases, DDP_DIMS, DDP_LENGTHS, workers=w) for w in (1, 2)}


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_ddp_two_workers_match_one_worker_over_adamw_steps(ddp_runs, stage):
    from sslmm_ray.bench.train import dead_parameters, param_difference

    one, two = ddp_runs[1][stage]["ddp"][0], ddp_runs[2][stage]["ddp"][0]
    assert two["wrapper"] == "DistributedDataParallel" and one["wrapper"] != two["wrapper"]
    assert len(one["grads"]) == 3
    # Unused parameters: None on both worker counts (never zeros: AdamW would decay them).
    for g1, g2 in zip(one["grads"], two["grads"], strict=True):
        assert {k for k, g in g1.items() if g is None} == {k for k, g in g2.items() if g is None}
    unused = {k for k, g in one["grads"][0].items() if g is None}
    if stage == "finetune":  # step 0 dropped nothing: no reconstruction, never the projector
        assert {k.split(".")[0] for k in unused} == {"decoders", "projector"}
        assert not any(k.startswith("decoders.") for k, g in one["grads"][2].items()
                       if g is None)  # step 2: decoders used on rank 1 only, still trained
    else:  # pre-training never runs the readout, fusion and head
        assert {"head", "fusion", "gates"} <= {k.split(".")[0] for k in unused}
    # Same parameters after 3 AdamW steps (weight decay 0.1). Parameters whose exact gradient
    # is 0 (softmax shift invariance) get Adam-normalised round-off noise: checked apart.
    dead = dead_parameters(one["grad_max"], list(one["params"]))
    assert dead <= {k for k in one["params"] if k.endswith((".key.bias", ".rel_k"))}, dead
    diff, name = param_difference(one["params"], two["params"], skip=dead)
    assert diff < PARAM_ATOL, (diff, name)
    assert all(one["grad_max"].get(k, 0.0) < 1e-6 and two["grad_max"].get(k, 0.0) < 1e-6
               for k in dead)
    # the per-step stats, averaged over ranks, are the global-batch values
    for s1, s2 in zip(one["stats"], two["stats"], strict=True):
        assert s2 == pytest.approx(s1, rel=1e-4, abs=1e-5)


def test_ddp_supervised_gradient_with_a_rank_without_labels(ddp_runs):
    """Labels only in rank 0's half: rank 1 adds nothing, rank 0's sum is divided by the
    global labeled count (times the world size), so DDP's average is the 1-worker gradient."""
    one, two = ddp_runs[1]["supervised"]["ddp"][0], ddp_runs[2]["supervised"]["ddp"][0]
    assert one["stats"][0]["labeled"] == two["stats"][0]["labeled"] > 0
    compared = 0
    for k, g1 in one["grads"][0].items():
        g2 = two["grads"][0][k]
        assert (g1 is None) == (g2 is None), k
        if g1 is not None:
            torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7)
            compared += 1
    assert compared > 0
    assert one["stats"][0]["sup"] == pytest.approx(two["stats"][0]["sup"], rel=1e-5)


def test_ddp_infonce_negatives_span_the_ranks(ddp_runs):
    """Pre-training's InfoNCE over 2 ranks (negatives gathered with their gradients) has the
    1-worker value on the same global batch; with each rank's own negatives only it would not."""
    one, two = ddp_runs[1]["pretrain"]["ddp"][0], ddp_runs[2]["pretrain"]["ddp"][0]
    assert two["stats"][0]["nce"] == pytest.approx(one["stats"][0]["nce"], rel=1e-5)
    assert two["stats"][0]["rec"] == pytest.approx(one["stats"][0]["rec"], rel=1e-5)


def test_ddp_bf16_step_runs(ddp_runs):
    for world in (1, 2):
        stats = ddp_runs[world]["bf16"]["ddp"][0]["stats"][0]
        assert np.isfinite(stats["loss"]) and stats["loss"] > 0


def test_bf16_autocast_step_on_cpu():
    """``precision: bf16``: one step of each stage under CPU autocast, finite, and the forward
    really ran in bfloat16 (the weights and their gradients stay float32)."""
    from sslmm_ray.bench.train import fixed_batches
    from sslmm_ray.model import build_model, make_teacher
    from sslmm_ray.train.loop import train_step
    from sslmm_ray.train.stages import STAGES

    cfg = _ddp_config("finetune.precision=bf16", "pretrain.precision=bf16")
    item = fixed_batches(DDP_DIMS, DDP_LENGTHS, 8, 2, seed=1)[1]
    seen: list[torch.dtype] = []
    for stage in STAGES.values():
        seen.clear()
        torch.manual_seed(0)
        model = build_model(cfg.model, DDP_DIMS, DDP_LENGTHS)
        model.encoders["text"].proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
        teacher = make_teacher(model) if stage.uses_teacher else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss, stats = train_step(model, teacher, opt, item["batch"], stage, cfg, 0, 0,
                                 torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and np.isfinite(stats["loss"]), stage
        assert torch.bfloat16 in seen, stage
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory) -> str:
    """Aligned mosi shapes, all labels, nothing missing: the easiest synthetic setting."""
    out = str(tmp_path_factory.mktemp("easy") / "mosi")
    invoke("data", "synth", "--preset", "mosi", "--scale", "0.2", "--aligned", "--seed", "0",
           "--out", out)
    return out


@pytest.fixture(scope="module")
def finetuned(ray_cluster, easy_data, tmp_path_factory) -> tuple[Path, dict]:
    """One finished fine-tuning run through the CLI on 2 DDP workers: the end-to-end test
    checks it, and the checkpoint tests only read it (one Train run for all of them)."""
    run_dir = tmp_path_factory.mktemp("finetuned") / "ft"
    output = invoke(
        "finetune", "--data", easy_data, "--run-dir", str(run_dir),
        "--label-ratio", "1.0", "--missing-rate", "0.0", "--workers", "2", "--epochs", "4",
        "--set", "model.hidden=32", "--json",
    )
    return run_dir, last_json(output)


def test_finetune_two_workers_end_to_end(finetuned, easy_data):
    """synth -> Parquet -> Ray Data -> 2 DDP workers -> checkpoints, metrics, evaluate."""
    run_dir, printed = finetuned
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


def test_corrupt_and_incompatible_checkpoints_are_clear_errors(finetuned, local_data, tmp_path):
    run_dir, _ = finetuned
    best = Path(json.loads((run_dir / "best.json").read_text())["checkpoint"])

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / ckpt.META).write_text((best / ckpt.META).read_text())
    (corrupt / ckpt.STATE).write_bytes((best / ckpt.STATE).read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: corrupt checkpoint"):
        evaluate_checkpoint(str(corrupt), local_data)

    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint"):
        evaluate_checkpoint(str(tmp_path / "nothing-here"), local_data)

    # a normalised model on a store without statistics (written by an older version)
    from sslmm_ray.train.predict import predict

    old = tmp_path / "old-store"
    shutil.copytree(local_data, old)
    manifest = json.loads((old / store.MANIFEST).read_text())
    del manifest["normalization"]
    (old / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no normalisation statistics"):
        evaluate_checkpoint(str(run_dir), str(old))
    with pytest.raises(DataError, match="no normalisation statistics"):
        predict(str(run_dir), str(old), str(tmp_path / "pred-old"))

    other = str(tmp_path / "unaligned")
    store.write_dataset(synth.generate("mosi", scale=0.05, aligned=False, seed=1), other)
    with pytest.raises(ckpt.CheckpointError, match="trained on dims"):
        evaluate_checkpoint(str(run_dir), other)

    # through the CLI: one line, exit status 2, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "sslmm_ray.cli", "evaluate", "--data", local_data,
         "--checkpoint", str(corrupt)],
        env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "corrupt checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_and_robustness_curve(finetuned, local_data, tmp_path):
    import pyarrow.parquet as pq

    from sslmm_ray.train.evaluate import CURVE_RATES, robustness_curve
    from sslmm_ray.train.predict import SUCCESS, predict

    run_dir = str(finetuned[0])
    manifest = store.open_dataset(local_data)

    out = tmp_path / "pred"
    summary = predict(run_dir, local_data, str(out), splits=("valid", "test"),
                      missing_rate=0.5, seed=3)
    table = pq.read_table(str(out), columns=["id", "split", "prediction", "text_present",
                                             "audio_present", "vision_present"])
    assert (out / SUCCESS).is_file() and summary["rows"] == table.num_rows
    assert table.num_rows == manifest.counts["valid"] + manifest.counts["test"]
    assert sorted(set(table.column("split").to_pylist())) == ["test", "valid"]
    present = np.stack([table.column(f"{m}_present").to_numpy(zero_copy_only=False)
                        for m in ("text", "audio", "vision")], axis=1)
    assert present.any(axis=1).all() and not present.all()  # any pattern, >= 1 kept
    with pytest.raises(ValueError, match="already holds predictions"):
        predict(run_dir, local_data, str(out))

    curve = robustness_curve(run_dir, local_data, str(tmp_path / "curve"))
    # the modality-level protocol reaches at most 2/3: the curve stops there, never caps
    assert [p["missing_rate"] for p in curve["points"]] == [r for r in CURVE_RATES if r <= 2 / 3]
    assert (tmp_path / "curve" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "curve" / "curve.json").read_text()) == json.loads(
        json.dumps(curve))
    # no missing data is the curve's first point and equals a plain evaluation
    plain = evaluate_checkpoint(run_dir, local_data, missing_rate=0.0)
    assert curve["points"][0]["Non0_acc_2"] == pytest.approx(plain["Non0_acc_2"])


def test_checkpoint_meta_records_normalisation(tmp_path):
    meta = ckpt.CheckpointMeta(stage="finetune", epoch=0, metrics={}, model={}, dims={},
                               lengths={}, dataset="mosi", normalize=True)
    ckpt.save(tmp_path, meta, {"model": {}})
    assert ckpt.load_dir(tmp_path)[0].normalize is True
    raw = json.loads((tmp_path / ckpt.META).read_text())
    del raw["normalize"]  # a checkpoint written before the field existed saw raw features
    (tmp_path / ckpt.META).write_text(json.dumps(raw))
    assert ckpt.load_dir(tmp_path)[0].normalize is False
