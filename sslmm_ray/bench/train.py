"""``sslmm bench train``: what Ray Train costs against a plain PyTorch loop, and what it scales.

Both sides train the same model with the same fine-tuning objective and batch size on the same
synthetic rows. The plain loop iterates in-memory tensors in one process; the Ray side is the
real ``sslmm finetune`` path (Parquet on an S3 server -> Ray Data -> ``TorchTrainer``), streamed
every epoch (the default) and, for comparison, with the opt-in decode cache. Throughput is training
samples per second of an epoch's training pass (validation and checkpointing excluded), over
the epochs after the first (warm-up), as the loop reports them in ``history.json``.

Data parallelism (:func:`run_steps`, :func:`ddp_figures`): the real training step
(``loop.train_step``) on a fixed sequence of in-memory global batches, each rank taking its
contiguous slice and the masks drawn once for the global batch, so that 1 and 2 workers see
the same data and draws: the parameter difference after K AdamW steps between 1 and 2 workers,
and the steps/s of 2 workers under DDP (``find_unused_parameters``, the default), DDP with
zero-weight terms, and the former flat all-reduce after backward, timed in rounds in one run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslmm_ray import config as config_mod
from sslmm_ray import ray_env, storage
from sslmm_ray.data import pipeline, protocols, store, synth
from sslmm_ray.data.normalize import normalizer_for
from sslmm_ray.model import build_model, ema_update, make_teacher
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train.objectives import finetune_loss
from sslmm_ray.train.runlog import RunLog

Batch = dict[str, torch.Tensor]


def fixed_batches(
    dims: Mapping[str, int], lengths: Mapping[str, int], batch_size: int, steps: int,
    seed: int = 0, missing_rate: float = 0.3, label_ratio: float = 0.5,
    drop_prob: float = 0.5, hide_probs: tuple[float, float] = (0.3, 0.25),
) -> list[dict[str, Any]]:
    """``steps`` random global batches with their masks drawn once for the whole batch:
    ``dropped`` (fine-tuning's on-purpose drops; none at all on step 0, so the decoders go
    unused there) and ``hide`` (pre-training's masked view)."""
    from sslmm_ray.bench.model import random_batch
    from sslmm_ray.train.objectives import _drop_keep_one, features, presence

    out = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        batch = random_batch(dims, lengths, batch_size, gen, missing_rate=missing_rate,
                             label_ratio=label_ratio)
        dropped = _drop_keep_one(presence(features(batch)), 0.0 if step == 0 else drop_prob, gen)
        out.append({"batch": batch, "dropped": dropped,
                    "hide_seed": seed * 1000 + step, "hide_probs": hide_probs})
    return out


def _hide_for(item: Mapping[str, Any], batch: Batch, segments: Mapping[str, int]):
    """Pre-training's masks for the global batch (they need the model's segment counts)."""
    from sslmm_ray.train.objectives import features, random_hide

    gen = torch.Generator().manual_seed(int(item["hide_seed"]) + 7)
    return random_hide(features(batch), segments, *item["hide_probs"], gen)


def step_case(
    name: str, cfg: config_mod.ExperimentConfig, batches: Sequence[dict[str, Any]], *,
    stage: str = "finetune", modes: Sequence[str] = ("ddp",), rounds: int = 1, warmup: int = 0,
    record: bool = True,
) -> dict[str, Any]:
    """One case for :func:`run_steps`: a fresh model per mode and round, trained on
    ``batches`` (:func:`fixed_batches`); ``record`` keeps per-step stats and gradients."""
    return {"name": name, "cfg": cfg.to_dict(), "batches": list(batches), "stage": stage,
            "modes": list(modes), "rounds": rounds, "warmup": warmup, "record": record}


def _run_case(case: dict[str, Any], mode: str, dims, lengths, rank: int, world: int):
    import torch.distributed as dist

    from sslmm_ray.train import distributed, stages
    from sslmm_ray.train.loop import train_step

    cfg = config_mod.from_dict(case["cfg"], "bench")
    stage, items, warmup = stages.get(case["stage"]), case["batches"], case["warmup"]
    scfg = stage.config(cfg)
    torch.manual_seed(scfg.seed)
    model = distributed.prepare(build_model(cfg.model, dims, lengths), mode)
    net = distributed.unwrap(model)
    teacher = make_teacher(model) if stage.uses_teacher else None
    opt = torch.optim.AdamW(model.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
    rec: dict[str, Any] = {"wrapper": type(model).__name__, "stats": [], "grads": [],
                           "grad_max": {}}
    started = cpu_started = None
    for step, item in enumerate(items):
        if step == warmup:
            if dist.is_initialized():
                dist.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
        batch = item["batch"]
        per = len(batch["index"]) // world
        rows = slice(rank * per, (rank + 1) * per)
        local = {k: v[rows] for k, v in batch.items()}
        hide = ({m: h[rows] for m, h in _hide_for(item, batch, net.segments).items()}
                if stage is stages.PRETRAIN else None)
        _, stats = train_step(model, teacher, opt, local, stage, cfg, 0, step,
                              torch.Generator().manual_seed(step), hide=hide,
                              dropped=item["dropped"][rows])
        if not case["record"]:
            continue
        keys = sorted(stats)
        mean = distributed.global_sum(
            torch.tensor([stats[k] for k in keys], dtype=torch.float64)) / world
        rec["stats"].append(dict(zip(keys, mean.tolist(), strict=True)))
        grads = {k: (None if p.grad is None else p.grad.detach().clone())
                 for k, p in net.named_parameters()}
        rec["grads"].append(grads)
        for k, g in grads.items():
            if g is not None:
                rec["grad_max"][k] = max(rec["grad_max"].get(k, 0.0), float(g.abs().max()))
    cpu = time.process_time() - cpu_started if cpu_started is not None else float("nan")
    if dist.is_initialized():
        dist.barrier()
    seconds = time.perf_counter() - started if started is not None else float("nan")
    rec["steps_per_s"] = (len(items) - warmup) / seconds
    # CPU seconds of this worker process per step: what the step costs, less sensitive than
    # wall time to other processes on a shared machine (it excludes waiting for peers)
    rec["cpu_ms_per_step"] = 1000.0 * cpu / max(len(items) - warmup, 1)
    rec["params"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return rec


def _steps_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: each case, each mode (interleaved over the rounds); rank 0 saves."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"world": world}
    for case in config["cases"]:
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(case["rounds"]):
            for mode in case["modes"]:
                runs.setdefault(mode, []).append(
                    _run_case(case, mode, config["dims"], config["lengths"], rank, world))
        result[case["name"]] = runs
    if rank == 0:
        torch.save(result, config["out"])
    ray.train.report({"done": 1})


def run_steps(
    cases: Sequence[dict[str, Any]], dims: Mapping[str, int], lengths: Mapping[str, int], *,
    workers: int,
) -> dict[str, Any]:
    """Run :func:`step_case` cases on ``workers`` Ray Train workers of this node (one CPU each).

    Returns rank 0's records, ``result[case][mode]`` = one per round: ``wrapper`` (the class
    the model was prepared into), per-step ``stats`` (mean over ranks: the global-batch
    values) and ``grads``, ``grad_max`` per parameter, final ``params``, ``steps_per_s``.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory(prefix="sslmm-steps-") as tmp:
        out = os.path.join(tmp, "result.pt")
        TorchTrainer(
            _steps_worker,
            train_loop_config={"cases": list(cases), "dims": dict(dims),
                               "lengths": dict(lengths), "out": out},
            scaling_config=ScalingConfig(num_workers=workers),
            run_config=RunConfig(name=f"steps-{workers}", storage_path=tmp),
        ).fit()
        return torch.load(out, weights_only=False)


def param_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                     skip: frozenset[str] = frozenset()) -> tuple[float, str]:
    """Largest absolute difference between two state dicts (names in ``skip`` left out)."""
    diffs = [(float((a[k].float() - b[k].float()).abs().max()), k) for k in a if k not in skip]
    return max(diffs) if diffs else (0.0, "")


def dead_parameters(grad_max: Mapping[str, float], names: Sequence[str],
                    threshold: float = 1e-6) -> frozenset[str]:
    """Parameters whose gradient stayed at round-off level on every step it was computed
    (one never computed keeps its value: not listed).

    A softmax is shift-invariant: the attention key bias and the intra-modal relation offsets
    (one relation per source modality, and an intra-modal edge's source shares the receiver's
    modality) add the same score to every edge of a receiver, so their exact gradient is 0.
    Adam divides round-off noise by its own size and moves them by up to ``lr`` per step, in
    a direction that depends on summation order: they differ between worker counts whatever
    the synchronisation, and are compared separately.
    """
    return frozenset(k for k in names if k in grad_max and grad_max[k] < threshold)


def ddp_figures(*, steps: int = 12, warmup: int = 2, rounds: int = 5, batch_size: int = 32,
                seed: int = 0) -> dict[str, Any]:
    """1 vs 2 workers after ``steps`` AdamW steps, and 2-worker steps/s per gradient sync.

    Default model (hidden 64) with dropout 0 and teacher views without random hiding (so that
    1 and 2 workers draw nothing differently), mosi dims (aligned), fine-tuning with every
    term on (tau 0: every pseudo-label kept), weight decay 0.01.
    """
    from sslmm_ray.data.sources import PRESETS

    dims, lengths = dict(PRESETS["mosi"].dims), PRESETS["mosi"].lengths(aligned=True)
    cfg = config_mod.load(overrides=[
        "model.dropout=0.0", "finetune.view_mask_prob=0.0", "finetune.view_segment_prob=0.0",
        "finetune.tau=0.0", "finetune.rampup_epochs=0", "finetune.weight_decay=0.01",
        f"finetune.seed={seed}",
    ])
    batches = fixed_batches(dims, lengths, batch_size, steps + warmup, seed=seed)
    same = step_case("same", cfg, batches)
    one = run_steps([same], dims, lengths, workers=1)["same"]["ddp"][0]
    modes = ("ddp", "ddp_zero_weight", "allreduce")
    timed = step_case("timed", cfg, batches, modes=modes, rounds=rounds, warmup=warmup,
                      record=False)
    result = run_steps([same, timed], dims, lengths, workers=2)
    two = result["same"]["ddp"][0]
    dead = dead_parameters(one["grad_max"], list(one["params"]))
    live_diff, live_name = param_difference(one["params"], two["params"], skip=dead)
    dead_diff, _ = param_difference(one["params"], two["params"],
                                    skip=frozenset(one["params"]) - dead)
    per_round = {m: [r["steps_per_s"] for r in result["timed"][m]] for m in modes}
    rates = {m: statistics.median(v) for m, v in per_round.items()}
    cpu = {m: statistics.median(r["cpu_ms_per_step"] for r in result["timed"][m])
           for m in modes}
    return {
        "steps": steps,
        "global_batch": batch_size,
        "param_max_abs_diff_1_vs_2_workers": live_diff,
        "param_max_abs_diff_where": live_name,
        "param_max_abs_diff_zero_gradient_params": dead_diff,
        "zero_gradient_params": sorted(dead),
        "wrapper_2_workers": two["wrapper"],
        "steps_per_s_2_workers": rates,  # median over the rounds
        "steps_per_s_2_workers_per_round": per_round,
        "ratio_ddp_vs_allreduce": rates["ddp"] / rates["allreduce"],
        "ratio_zero_weight_vs_find_unused": rates["ddp_zero_weight"] / rates["ddp"],
        "cpu_ms_per_step_rank0": cpu,  # median over the rounds
        "cpu_ms_per_step_rank0_per_round": {
            m: [r["cpu_ms_per_step"] for r in result["timed"][m]] for m in modes},
        "cpu_ratio_ddp_vs_allreduce": cpu["ddp"] / cpu["allreduce"],
        "cpu_ratio_zero_weight_vs_find_unused": cpu["ddp_zero_weight"] / cpu["ddp"],
    }


def _plain_loop(
    cfg: config_mod.ExperimentConfig, data_uri: str, epochs: int, options: StorageOptions
) -> float:
    """Samples/s of the same training step over in-memory tensors, one process."""
    manifest = store.open_dataset(data_uri, options)
    specs = pipeline.finetune_specs(manifest, cfg.finetune, options, missing=cfg.missing)
    norm = normalizer_for(manifest, cfg.data.normalize)  # as the Ray side decodes
    arrays = protocols.apply(store.read_split(manifest, "train", options, norm=norm),
                             specs["train"])
    data = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    n = len(data["index"])
    torch.manual_seed(cfg.finetune.seed)
    torch.set_num_threads(max(1, int(cfg.finetune.cpus_per_worker)))
    model = build_model(cfg.model, manifest.dims, manifest.lengths)
    teacher = make_teacher(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune.lr)
    gen = torch.Generator().manual_seed(0)
    rates = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        started = time.perf_counter()
        for i in range(0, n, cfg.finetune.batch_size):
            idx = order[i : i + cfg.finetune.batch_size]
            batch = {k: v[idx] for k, v in data.items()}
            loss, _ = finetune_loss(model, teacher, batch, cfg.finetune, epoch, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(teacher, model, cfg.finetune.ema_decay)
        if epoch > 0:
            rates.append(n / (time.perf_counter() - started))
    return float(np.mean(rates))


def _ray_run(
    cfg: config_mod.ExperimentConfig, data_uri: str, run_dir: str, workers: int, cache_mb: int
) -> float:
    from sslmm_ray.train.runner import run_stage

    cfg = config_mod.replace(cfg, data={"uri": data_uri, "cache_mb": cache_mb},
                             finetune={"workers": workers})
    run_stage("finetune", cfg, run_dir, evaluate_test=False)
    history = RunLog.read(run_dir, StorageOptions.from_env(cfg.data.s3_endpoint))[1:]
    return float(np.mean([h["train_samples"] / h["train_seconds"] for h in history]))


def run(
    *, scale: float = 0.3, epochs: int = 4, seed: int = 0, s3_uri: str | None = None,
    throughput: bool = True, ddp: bool = True, ddp_steps: int = 12,
) -> dict[str, Any]:
    """Plain loop vs Ray Train streaming from S3 (no cache, the default), cached, 2 workers
    (``throughput``); 1 vs 2 workers after ``ddp_steps`` steps and the gradient-sync modes
    (``ddp``, :func:`ddp_figures`).

    ``s3_uri``: an ``s3://bucket/prefix`` to use (endpoint and credentials from the
    environment); without one a moto server is started on 127.0.0.1 and stopped at the end.
    """
    result: dict[str, Any] = {}
    if throughput:
        result.update(_throughput(scale=scale, epochs=epochs, seed=seed, s3_uri=s3_uri))
    if ddp:
        ray_env.init()
        result["ddp"] = ddp_figures(steps=ddp_steps, seed=seed)
    return result


def _throughput(*, scale: float, epochs: int, seed: int, s3_uri: str | None) -> dict[str, Any]:
    server = None
    if s3_uri is None:
        from sslmm_ray.devtools.s3server import FAKE_CREDENTIALS, start_s3_server

        server = start_s3_server(bucket="sslmm-bench")
        os.environ.update(FAKE_CREDENTIALS)  # before ray.init: the workers inherit it
        s3_uri = server.uri(f"bench-train/{os.getpid()}-{time.time_ns()}")
    options = server.options if server is not None else StorageOptions.from_env()
    try:
        ray_env.init()
        with tempfile.TemporaryDirectory(prefix="sslmm-bench-train-") as tmp:
            raw = synth.generate("mosi", scale=scale, aligned=True, seed=seed)
            data_uri = storage.join(s3_uri, "data")
            store.write_dataset(raw, data_uri, options)
            cfg = config_mod.load(overrides=[
                f"data.uri={data_uri}", f"finetune.epochs={epochs}", "finetune.label_ratio=0.5",
                "missing.rate=0.5", "finetune.cpus_per_worker=1",
                f"finetune.seed={seed}",
                *([f"data.s3_endpoint={options.endpoint}"] if options.endpoint else []),
            ])
            plain = _plain_loop(cfg, data_uri, epochs, options)
            runs = Path(tmp) / "runs"
            streamed = _ray_run(cfg, data_uri, str(runs / "s3"), 1, cache_mb=0)
            cached = _ray_run(cfg, data_uri, str(runs / "cached"), 1, cache_mb=4096)
            two = _ray_run(cfg, data_uri, str(runs / "w2"), 2, cache_mb=0)
    finally:
        storage.delete(s3_uri, options)
        if server is not None:
            server.stop()
    return {
        "preset": "mosi (aligned)",
        "scale": scale,
        "epochs": epochs,
        "train_rows": int(raw.counts()["train"]),
        "samples_per_s": {
            "plain_pytorch_in_memory": plain,
            "ray_1_worker_s3_streaming": streamed,
            "ray_1_worker_s3_cached": cached,
            "ray_2_workers_s3_streaming": two,
        },
        "ratio_streaming_vs_plain": streamed / plain,
        "ratio_cached_vs_plain": cached / plain,
        "ratio_2_workers_vs_1": two / streamed,
        "goal": "ratio_streaming_vs_plain >= 0.85",
    }
