"""The two training stages on a real local Ray: S3 storage, resume, fault tolerance, DDP."""

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

from sslmm_ray import config as config_mod
from sslmm_ray import storage
from sslmm_ray.data import store, synth
from sslmm_ray.data.sources import DataError
from sslmm_ray.train import checkpoint as ckpt
from sslmm_ray.train import distributed
from sslmm_ray.train.evaluate import evaluate_checkpoint
from sslmm_ray.train.runlog import RunLog
from sslmm_ray.train.runner import run_stage

TINY = ["model.hidden=16", "model.segments=4", "model.iterations=1", "model.dropout=0.0"]
DEADLINE_S = 240


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


def test_pretrain_finetune_evaluate_on_s3(ray_cluster, s3):
    data_uri = s3.uri("train-e2e/data")
    store.write_dataset(synth.generate("mosi", scale=0.05, aligned=True, seed=2), data_uri,
                        s3.options)
    pre_dir, ft_dir = s3.uri("train-e2e/runs/pre"), s3.uri("train-e2e/runs/ft")
    common = ["finetune.missing_rate=0.3", "pretrain.missing_rate=0.3"]

    pre = run_stage("pretrain", tiny_config(
        data_uri, *common, "pretrain.epochs=2", "pretrain.workers=2"), pre_dir)
    assert pre.checkpoint.startswith(pre_dir) and "valid_loss" in pre.best

    ft = run_stage("finetune", tiny_config(
        data_uri, *common, "finetune.epochs=2", "finetune.workers=2",
        f"finetune.pretrained={pre_dir}"), ft_dir)
    assert ft.test is not None and 0.0 <= ft.test["Non0_acc_2"] <= 1.0

    keys = {o["Key"] for o in s3.client.list_objects_v2(
        Bucket=s3.bucket, Prefix="train-e2e/runs/")["Contents"]}
    for run in ("pre", "ft"):
        for name in ("config.json", "best.json", "metrics.json", "history.json"):
            assert f"train-e2e/runs/{run}/{name}" in keys, (run, name, sorted(keys))
        assert any(k.startswith(f"train-e2e/runs/{run}/checkpoint_") and k.endswith("state.pt")
                   for k in keys)
        assert any(f"train-e2e/runs/{run}/tensorboard/events" in k for k in keys)

    # fine-tuning really started from the pre-training weights' architecture and protocol
    saved = storage.read_json(storage.join(ft_dir, "config.json"), s3.options)
    assert saved["finetune"]["pretrained"] == pre_dir
    assert ckpt.load(ft.checkpoint, s3.options)[0].normalize  # trained on normalised features
    again = evaluate_checkpoint(ft_dir, data_uri, s3.options)
    assert again == pytest.approx(ft.test, abs=1e-6)


def test_pretrained_protocol_mismatch_is_refused(ray_cluster, local_data, tmp_path):
    pre_dir = str(tmp_path / "pre")
    run_stage("pretrain", tiny_config(local_data, "pretrain.epochs=1"), pre_dir)
    cfg = tiny_config(local_data, "finetune.missing_rate=0.5", f"finetune.pretrained={pre_dir}")
    with pytest.raises(ckpt.CheckpointError, match="visible in pre-training"):
        run_stage("finetune", cfg, str(tmp_path / "ft"))
    # an ablation the pre-trained model contradicts is refused, never silently dropped
    for ablation in ("model.propagation=intra", "model.fusion=early"):
        cfg = tiny_config(local_data, ablation, f"finetune.pretrained={pre_dir}",
                          "finetune.missing_rate=0.0")
        with pytest.raises(config_mod.ConfigError, match=f"{ablation.split('=')[0]}="):
            run_stage("finetune", cfg, str(tmp_path / "ft-ablation"))
    cfg = tiny_config(local_data, "data.normalize=false", f"finetune.pretrained={pre_dir}",
                      "finetune.missing_rate=0.0")
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


def _one_step(config: dict) -> None:
    """One optimizer step on a fixed global batch; rank r takes its contiguous slice."""
    import ray.train

    from sslmm_ray.bench.model import random_batch
    from sslmm_ray.model import build_model, finetune_loss

    cfg = config_mod.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = build_model(cfg.model, config["dims"], config["lengths"])
    batch = random_batch(config["dims"], config["lengths"], config["batch"],
                         torch.Generator().manual_seed(1), missing_rate=0.3, label_ratio=1.0)
    model = distributed.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = config["batch"] // world
    local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    gen = torch.Generator().manual_seed(2)
    loss, _ = finetune_loss(model, None, local, cfg.finetune, 0, gen)
    opt.zero_grad()
    loss.backward()
    distributed.average_gradients(model)
    opt.step()
    with torch.no_grad():
        after, _ = finetune_loss(model, None, batch, cfg.finetune, 0, gen)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"loss_after": float(after)}))
    ray.train.report({"loss_after": float(after)})


def test_ddp_two_workers_match_one_worker(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Workers cannot import this test module: ship _one_step by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = config_mod.load(overrides=[*TINY, "finetune.pseudo_labels=false",
                                     "finetune.reconstruction=false"])
    dims, lengths = {"text": 12, "audio": 5, "vision": 7}, {"text": 6, "audio": 9, "vision": 8}
    losses = {}
    for workers in (1, 2):
        trainer = TorchTrainer(
            _one_step,
            train_loop_config={"cfg": cfg.to_dict(), "dims": dims, "lengths": lengths,
                               "batch": 16, "out": str(tmp_path / f"loss{workers}.json")},
            scaling_config=ScalingConfig(num_workers=workers),
            run_config=RunConfig(name=f"ddp{workers}", storage_path=str(tmp_path)),
        )
        trainer.fit()
        losses[workers] = json.loads((tmp_path / f"loss{workers}.json").read_text())["loss_after"]
    # gradients averaged over equal halves equal the full-batch gradient (float32 round-off)
    assert losses[2] == pytest.approx(losses[1], abs=1e-5), losses


def test_corrupt_and_incompatible_checkpoints_are_clear_errors(ray_cluster, local_data, tmp_path):
    run_dir = tmp_path / "ft"
    run_stage("finetune", tiny_config(local_data, "finetune.epochs=1"), str(run_dir))
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


def test_predict_and_robustness_curve(ray_cluster, local_data, tmp_path):
    import pyarrow.parquet as pq

    from sslmm_ray.train.evaluate import CURVE_RATES, robustness_curve
    from sslmm_ray.train.predict import SUCCESS, predict

    run_dir = str(tmp_path / "ft")
    run_stage("finetune", tiny_config(local_data, "finetune.epochs=1"), run_dir)
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
