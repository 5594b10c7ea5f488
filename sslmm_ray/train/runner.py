"""Driver side of a training stage: plan, launch the ``TorchTrainer``, publish the outputs.

A run directory (local or S3) is Ray Train's run folder (``storage_path/name``): Ray writes the
checkpoints there, and this module adds ``config.json`` (before training), ``best.json`` and
``metrics.json`` (after). Running the same stage with the same run directory resumes it, with the
settings it started with: a resume whose settings differ from ``config.json`` is refused
(:func:`sslmm_ray.config.resume_differences` says which keys may change). One driver at a time
writes a run directory (:mod:`sslmm_ray.locks`).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from sslmm_ray import config as config_mod
from sslmm_ray import locks, ray_env, storage
from sslmm_ray.config import ExperimentConfig
from sslmm_ray.data import pipeline, store
from sslmm_ray.errors import UserError
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import checkpoint as ckpt
from sslmm_ray.train import progress, rundir, stages
from sslmm_ray.train.evaluate import evaluate_checkpoint
from sslmm_ray.train.loop import train_loop
from sslmm_ray.train.rundir import RunDir
from sslmm_ray.train.runlog import RunLog
from sslmm_ray.train.stages import Stage

log = logging.getLogger(__name__)



@dataclass
class StageResult:
    run_dir: str
    checkpoint: str
    best: dict[str, Any]
    history: list[dict[str, Any]]
    test: dict[str, float] | None = None


def _split_run_dir(run_dir: str) -> tuple[str, str]:
    run_dir = run_dir.rstrip("/")
    parent, _, name = run_dir.rpartition("/")
    if not name or not parent:
        raise UserError(f"run directory '{run_dir}' needs a parent folder and a name")
    return parent, name


@dataclass
class PreparedStage:
    """Everything a stage's ``TorchTrainer`` needs, resolved on the driver (or a Tune trial)."""

    stage: Stage
    cfg: ExperimentConfig
    run_dir: str
    options: StorageOptions
    manifest: store.Manifest
    datasets: dict[str, Any]
    pretrained: str | None
    metric: str
    mode: str


def prepare_stage(
    stage: str | Stage,
    cfg: ExperimentConfig,
    run_dir: str,
    *,
    allow_config_change: bool = False,
    cache: pipeline.SplitCache | None = None,
) -> PreparedStage:
    """Open the data, resolve the pretrained model, write ``config.json``; no training yet.

    ``cache``: decoded splits shared with other runs (a sweep's); None builds this run's own
    when ``data.cache_mb`` asks for one. Resuming (``config.json`` exists) with settings other
    than the saved ones is refused unless ``allow_config_change``: the checkpoints would
    silently continue under another experiment.
    """
    stage = stages.get(stage)
    options = StorageOptions.from_env(cfg.data.s3_endpoint)
    # Workers on other nodes may not share the driver's environment: pin the endpoint.
    cfg = config_mod.replace(cfg, data={"s3_endpoint": options.endpoint})
    manifest = store.open_dataset(cfg.data.uri, options)
    prepared = stage.prepare(manifest, cfg, options, cache)
    cfg = prepared.cfg
    _save_config(stage.name, cfg, run_dir, options, allow_config_change)
    metric, mode = stage.selection(cfg, manifest.family)
    return PreparedStage(stage, cfg, run_dir, options, manifest, prepared.datasets,
                         prepared.pretrained, metric, mode)


def _save_config(
    stage: str, cfg: ExperimentConfig, run_dir: str, options: StorageOptions, allow: bool
) -> None:
    uri = RunDir(run_dir).config
    current = cfg.to_dict()
    if storage.exists(uri, options):
        saved = storage.read_json(uri, options)
        diffs = config_mod.resume_differences(saved, current, stage)
        if diffs and not allow:
            raise config_mod.ConfigError(
                f"run directory {run_dir} was started with other settings ({'; '.join(diffs)}): "
                "re-run with the saved settings to resume it, pass --allow-config-change to "
                "resume under the new ones, or use a new --run-dir"
            )
        if diffs:
            stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
            kept = RunDir(run_dir).config_before(stamp)
            storage.write_json(kept, saved, options)
            log.warning("%s: resuming with changed settings (%s); the old ones are in %s",
                        run_dir, "; ".join(diffs), kept)
    storage.write_json(uri, current, options)


def build_trainer(prep: PreparedStage, callbacks: list[Any] | None = None) -> TorchTrainer:
    """The stage's ``TorchTrainer``; ``callbacks`` lets a Tune trial forward its reports."""
    scfg = prep.stage.config(prep.cfg)
    parent, name = _split_run_dir(prep.run_dir)
    storage_path, fs = storage.ray_storage(parent, prep.options)
    manifest = prep.manifest
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "stage": prep.stage.name,
            "config": prep.cfg.to_dict(),
            "dims": manifest.dims,
            "lengths": manifest.lengths,
            "family": manifest.family,
            "label_range": list(manifest.label_range),
            "dataset": manifest.name,
            "pretrained": prep.pretrained,
            "run_dir": prep.run_dir,
        },
        scaling_config=ScalingConfig(
            num_workers=scfg.workers,
            use_gpu=scfg.gpus,
            resources_per_worker=ray_env.worker_resources(scfg.cpus_per_worker, scfg.gpus),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1,
                checkpoint_score_attribute=prep.metric,
                checkpoint_score_order=prep.mode,
            ),
            failure_config=FailureConfig(max_failures=scfg.max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets=prep.datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def finish_stage(
    prep: PreparedStage, result: ray.train.Result, *, evaluate_test: bool = True
) -> StageResult:
    """Publish ``best.json`` and ``metrics.json`` (optionally with test metrics)."""
    stage, run_dir, options, metric, mode = (
        prep.stage, prep.run_dir, prep.options, prep.metric, prep.mode
    )
    best_ckpt = result.get_best_checkpoint(metric, mode) or result.checkpoint
    if best_ckpt is None:
        raise RuntimeError(f"{stage.name} run {run_dir} finished without a checkpoint")
    best_uri = _checkpoint_uri(run_dir, best_ckpt)
    best_metrics = _metrics_of(best_uri, options)
    ckpt.write_best(run_dir, best_uri, best_metrics, options)
    history = RunLog.read(run_dir, options)

    test = None
    if stage.scores_test and evaluate_test:
        test = evaluate_checkpoint(best_uri, prep.cfg.data.uri, options, split="test")
    summary = {
        "stage": stage.name,
        "checkpoint": best_uri,
        "selection": {"metric": metric, "mode": mode},
        "valid": {
            k.removeprefix("valid_"): v for k, v in best_metrics.items() if k.startswith("valid_")
        },
        "test": test,
        "epochs": len(history),
    }
    storage.write_json(RunDir(run_dir).metrics, summary, options)
    return StageResult(run_dir, best_uri, best_metrics, history, test)


def run_stage(
    stage: str | Stage,
    cfg: ExperimentConfig,
    run_dir: str,
    *,
    evaluate_test: bool = True,
    allow_config_change: bool = False,
    break_lock: bool = False,
) -> StageResult:
    """Train one stage end to end and publish its outputs in ``run_dir``.

    The run directory is locked for the whole stage (``break_lock`` takes over a stale lock)."""
    stage = stages.get(stage)
    scfg = stage.config(cfg)
    info = ray_env.init()
    ray_env.check_paths_reach_every_node(
        info, {"--run-dir": run_dir, "--data": cfg.data.uri, **stage.reads(cfg)}
    )
    ray_env.check_fits(
        info,
        workers=scfg.workers,
        cpus_per_worker=scfg.cpus_per_worker,
        use_gpu=scfg.gpus,
        what=f"{stage.name} with {scfg.workers} workers",
    )
    options = StorageOptions.from_env(cfg.data.s3_endpoint)
    with locks.hold(run_dir, options, what="run directory", break_lock=break_lock,
                    break_hint="--break-lock"):
        prep = prepare_stage(stage, cfg, run_dir, allow_config_change=allow_config_change)
        trainer = build_trainer(prep)
        with progress.follow(
            run_dir, prep.options, epochs=scfg.epochs, metric=prep.metric, title=stage.name
        ), pipeline.task_data_errors():
            result = trainer.fit()
        return finish_stage(prep, result, evaluate_test=evaluate_test)


def _checkpoint_uri(run_dir: str, checkpoint: ray.train.Checkpoint) -> str:
    """The checkpoint's address in the user's URI scheme (Ray reports fs-relative paths)."""
    leaf = checkpoint.path.rstrip("/").rpartition("/")[2]
    return RunDir(run_dir).checkpoint(leaf)


def _metrics_of(checkpoint_uri: str, options: StorageOptions) -> dict[str, Any]:
    meta = storage.read_json(rundir.checkpoint_meta(checkpoint_uri), options)
    return meta.get("metrics", {})
