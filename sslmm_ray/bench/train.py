"""``sslmm bench train``: what Ray Train costs against a plain PyTorch loop, and what it scales.

Both sides train the same model with the same fine-tuning objective and batch size on the same
synthetic rows. The plain loop iterates in-memory tensors in one process; the Ray side is the
real ``sslmm finetune`` path (Parquet -> Ray Data -> ``TorchTrainer``). Throughput is training
samples per second of an epoch's training pass (validation and checkpointing excluded), over
the epochs after the first (warm-up), as the loop reports them in ``history.json``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslmm_ray import config as config_mod
from sslmm_ray import ray_env
from sslmm_ray.data import pipeline, protocols, store, synth
from sslmm_ray.data.normalize import normalizer_for
from sslmm_ray.model import build_model, ema_update, finetune_loss, make_teacher
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train.runlog import RunLog


def _plain_loop(cfg: config_mod.ExperimentConfig, data_uri: str, epochs: int) -> float:
    """Samples/s of the same training step over in-memory tensors, one process."""
    manifest = store.open_dataset(data_uri)
    specs = pipeline.finetune_specs(manifest, cfg.finetune)
    norm = normalizer_for(manifest, cfg.data.normalize)  # as the Ray side decodes
    arrays = protocols.apply(store.read_split(manifest, "train", norm=norm), specs["train"])
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


def _ray_run(cfg: config_mod.ExperimentConfig, run_dir: str, workers: int) -> float:
    from sslmm_ray.train.runner import run_stage

    cfg = config_mod.replace(cfg, finetune={"workers": workers})
    run_stage("finetune", cfg, run_dir, evaluate_test=False)
    history = RunLog.read(run_dir, StorageOptions.from_env(cfg.data.s3_endpoint))[1:]
    return float(np.mean([h["train_samples"] / h["train_seconds"] for h in history]))


def run(*, scale: float = 0.3, epochs: int = 4, seed: int = 0) -> dict[str, Any]:
    ray_env.init()
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-train-") as tmp:
        data_uri = str(Path(tmp) / "data")
        store.write_dataset(synth.generate("mosi", scale=scale, aligned=True, seed=seed),
                            data_uri)
        cfg = config_mod.load(overrides=[
            f"data.uri={data_uri}", f"finetune.epochs={epochs}", "finetune.label_ratio=0.5",
            "finetune.missing_rate=0.5", "finetune.cpus_per_worker=1", f"finetune.seed={seed}",
        ])
        plain = _plain_loop(cfg, data_uri, epochs)
        one = _ray_run(cfg, str(Path(tmp) / "runs" / "w1"), 1)
        two = _ray_run(cfg, str(Path(tmp) / "runs" / "w2"), 2)
    return {
        "preset": "mosi (aligned)",
        "scale": scale,
        "epochs": epochs,
        "samples_per_s": {"plain_pytorch": plain, "ray_1_worker": one, "ray_2_workers": two},
        "ratio_ray1_vs_plain": one / plain,
        "ratio_ray2_vs_ray1": two / one,
        "goal": "ratio_ray1_vs_plain >= 0.85",
    }
