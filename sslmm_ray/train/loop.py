"""The train-loop function that every Ray Train worker runs, for both stages.

One function, written once: the :class:`~sslmm_ray.train.stages.Stage` says what is minimised,
whether an EMA teacher is kept, how an epoch is validated and which metric selects (pre-training:
the self-supervised objective, judged by its validation loss; fine-tuning: the semi-supervised
objective with an EMA teacher, judged by ``finetune.selection``). Each epoch ends with one
``ray.train.report`` carrying the metrics and a checkpoint (written by rank 0), so that Ray keeps
the best and the latest and a restarted worker group resumes from the latest.

With several workers the student is wrapped in DistributedDataParallel
(:mod:`sslmm_ray.train.distributed`); checkpoints, the EMA teacher and validation always use
the unwrapped network, so a checkpoint loads the same whatever the worker count.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor

from sslmm_ray.config import ExperimentConfig, from_dict
from sslmm_ray.model import build_model, ema_update, make_teacher
from sslmm_ray.ray_env import quiet_ray_data
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import checkpoint as ckpt
from sslmm_ray.train import distributed
from sslmm_ray.train.runlog import RunLog
from sslmm_ray.train.stages import Stage, get, to_device

Batch = dict[str, torch.Tensor]


def ema_decay(target: float, step: int) -> float:
    """Mean Teacher's warm-up: average over the steps so far until ``target`` is reached."""
    return min(target, (1.0 + step) / (10.0 + step))


def autocast(device: torch.device, precision: str):
    """The forward/loss context of a training step: bfloat16 autocast for ``bf16``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    stage: Stage,
    cfg: ExperimentConfig,
    epoch: int,
    step: int,
    generator: torch.Generator,
    label_scale: float = 1.0,
    hide: dict[str, Tensor] | None = None,
    dropped: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One optimizer step of a stage on this rank's ``batch``: one forward computing the whole
    loss (under autocast with ``precision: bf16``), backward (DDP averages the gradients
    across ranks), clipping, AdamW, then the EMA teacher. ``hide`` / ``dropped`` replace the
    random masks (tests and benchmarks compare worker counts on the same draws)."""
    scfg = stage.config(cfg)
    device = next(iter(batch.values())).device
    with autocast(device, scfg.precision):
        loss, stats = stage.loss(model, teacher, batch, cfg, epoch, generator,
                                 label_scale=label_scale, hide=hide, dropped=dropped)
        loss = loss + distributed.zero_weight_terms(model)  # 0.0 unless ddp_zero_weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(model)  # no-op unless the former "allreduce" mode
    if scfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), scfg.grad_clip)
    optimizer.step()
    if teacher is not None:
        ema_update(teacher, model, ema_decay(cfg.finetune.ema_decay, step))
    return loss, stats


def _mean_over_ranks(totals: dict[str, float], steps: int) -> dict[str, float]:
    """Per-step means of the epoch's stats over every rank's steps (one all-reduce).

    Each rank's loss terms are its share of the global batch times the world size, so this
    mean is the global-batch value; with one worker it is the plain mean over steps.
    """
    keys = sorted(totals)
    values = torch.tensor([*(totals[k] for k in keys), float(steps)], dtype=torch.float64)
    if distributed.world_size() > 1:
        device = ray.train.torch.get_device()
        values = distributed.global_sum(values.to(device)).cpu()
    return {k: float(v) / max(float(values[-1]), 1.0) for k, v in zip(keys, values[:-1],
                                                                       strict=True)}


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (early-stopping decisions must agree)."""
    if not dist.is_available() or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry: ``loop_config`` holds the stage, the config dict and shapes."""
    quiet_ray_data()
    stage = get(loop_config["stage"])
    cfg = from_dict(loop_config["config"], "train loop")
    dims, lengths, family = loop_config["dims"], loop_config["lengths"], loop_config["family"]
    lo, hi = loop_config.get("label_range", (-3.0, 3.0))
    label_scale = (float(hi) - float(lo)) / 2.0  # confidence's kappa is relative to it
    scfg = stage.config(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    torch.manual_seed(scfg.seed)
    random.seed(scfg.seed)
    torch.set_num_threads(max(1, int(scfg.cpus_per_worker)))
    device = ray.train.torch.get_device()

    model_cfg = cfg.model
    model = build_model(model_cfg, dims, lengths)
    if loop_config.get("pretrained"):
        _, pre = ckpt.load(loop_config["pretrained"], StorageOptions.from_env(cfg.data.s3_endpoint))
        model.load_state_dict(pre["model"])
    # On the worker's device before the optimizer exists, so resumed optimizer state lands there.
    model = distributed.prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=scfg.epochs)
    start_epoch, best, bad_epochs, step = 0, None, 0, 0
    history: list[dict[str, float]] = []

    resume = ray.train.get_checkpoint()
    state: dict[str, Any] = {}
    if resume is not None:
        _, state = ckpt.load_ray_checkpoint(resume)
        distributed.unwrap(model).load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch = int(state["epoch"]) + 1
        best = state.get("best")
        bad_epochs = int(state.get("bad_epochs", 0))
        step = int(state.get("step", 0))
        history = list(state.get("history", []))

    # The EMA teacher starts as the (broadcast, unwrapped) student, or as it was saved.
    teacher = make_teacher(model) if stage.uses_teacher else None
    if teacher is not None and state.get("teacher") is not None:
        teacher.load_state_dict(state["teacher"])

    metric, mode = stage.selection(cfg, family)
    run_log = RunLog(loop_config["run_dir"], StorageOptions.from_env(cfg.data.s3_endpoint))
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    batch_size = max(1, scfg.batch_size // world)

    for epoch in range(start_epoch, scfg.epochs):
        gen = torch.Generator().manual_seed(scfg.seed * 100_003 + epoch * 1009 + rank)
        totals: dict[str, float] = {}
        steps, samples, started = 0, 0, time.perf_counter()
        for batch in train_shard.iter_torch_batches(
            batch_size=batch_size,
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=scfg.seed + epoch if cfg.data.shuffle_buffer else None,
        ):
            batch = to_device(batch, device)
            loss, stats = train_step(model, teacher, optimizer, batch, stage, cfg, epoch, step,
                                     gen, label_scale)
            step += 1
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            steps += 1
            samples += len(batch["index"])
        train_seconds = time.perf_counter() - started
        scheduler.step()

        means = _mean_over_ranks(totals, steps)
        report: dict[str, Any] = {f"train_{k}": v for k, v in means.items()}
        report["epoch"] = epoch
        # throughput of this epoch's training pass (all workers; the slowest sets the pace)
        report["train_seconds"] = train_seconds
        report["train_samples"] = samples * world
        report["lr"] = scheduler.get_last_lr()[0]
        if rank == 0:
            valid_batches = valid_shard.iter_torch_batches(batch_size=256)
            report.update(stage.validate(model, teacher, valid_batches, cfg, device, family))
            value = report[metric]
            improved = best is None or (value < best if mode == "min" else value > best)
            if improved:
                best, bad_epochs = value, 0
            else:
                bad_epochs += 1
        stop = scfg.patience > 0 and bad_epochs >= scfg.patience
        best, bad_epochs, stop = _broadcast((best, bad_epochs, stop))
        report["best_" + metric] = best if best is not None else math.nan
        if rank == 0:
            history.append({k: float(v) for k, v in report.items()})

        with tempfile.TemporaryDirectory(prefix="sslmm-ckpt-") as tmp:
            checkpoint = None
            if rank == 0:
                meta = ckpt.CheckpointMeta(
                    stage=stage.name,
                    epoch=epoch,
                    metrics={k: float(v) for k, v in report.items()},
                    model=dataclasses.asdict(model_cfg),
                    dims=dict(dims),
                    lengths=dict(lengths),
                    dataset=loop_config["dataset"],
                    protocol=stage.protocol(cfg),
                    normalize=cfg.data.normalize,
                )
                # "model" is what inference uses: the EMA teacher when there is one.
                student = distributed.unwrap(model)  # no "module." prefix: loads anywhere
                state = {
                    "model": (teacher if teacher is not None else student).state_dict(),
                    "student": student.state_dict(),
                    "teacher": teacher.state_dict() if teacher is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "best": best,
                    "bad_epochs": bad_epochs,
                    "step": step,
                    "history": history,
                    "rng": {"torch": torch.get_rng_state()},
                }
                ckpt.save(tmp, meta, state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=checkpoint)
        if rank == 0:  # after the checkpoint is persisted: history never runs ahead of it
            run_log.write(history)
        if stop:
            break
