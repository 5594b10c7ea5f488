"""``sslmm bench train``: what Ray Train costs against a plain PyTorch loop, and what it scales.

Both sides train the same model with the same fine-tuning objective and batch size on the same
synthetic rows. The plain loop iterates in-memory tensors in one process; the Ray side is the
real ``sslmm finetune`` path (Parquet on an S3 server -> Ray Data -> ``TorchTrainer``), streamed
every epoch (the default) and, for comparison, with the opt-in decode cache. Throughput is training
samples per second of an epoch's training pass (validation and checkpointing excluded), over
the epochs after the first (warm-up), as the loop reports them in ``history.json``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslmm_ray import config as config_mod
from sslmm_ray import ray_env, storage
from sslmm_ray.data import pipeline, protocols, store, synth
from sslmm_ray.data.normalize import normalizer_for
from sslmm_ray.model import build_model, ema_update, finetune_loss, make_teacher
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train.runlog import RunLog


def _plain_loop(
    cfg: config_mod.ExperimentConfig, data_uri: str, epochs: int, options: StorageOptions
) -> float:
    """Samples/s of the same training step over in-memory tensors, one process."""
    manifest = store.open_dataset(data_uri, options)
    specs = pipeline.finetune_specs(manifest, cfg.finetune, options)
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
    *, scale: float = 0.3, epochs: int = 4, seed: int = 0, s3_uri: str | None = None
) -> dict[str, Any]:
    """Plain loop vs Ray Train streaming from S3 (no cache, the default), cached, 2 workers.

    ``s3_uri``: an ``s3://bucket/prefix`` to use (endpoint and credentials from the
    environment); without one a moto server is started on 127.0.0.1 and stopped at the end.
    """
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
                "finetune.missing_rate=0.5", "finetune.cpus_per_worker=1",
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
