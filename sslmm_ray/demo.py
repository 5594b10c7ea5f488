"""``sslmm demo``: the whole path on the embedded default, small enough for a laptop.

Synthetic mosi-shaped data -> sharded Parquet -> Ray Data -> a 2-worker DDP ``TorchTrainer``
fine-tuning SSLMM at label ratio 0.5 and missing rate 0.5 -> test metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from sslmm_ray import config as config_mod
from sslmm_ray import ray_env


def run_demo(
    *, work_dir: Path, scale: float, epochs: int, workers: int, console: Console
) -> dict:
    from sslmm_ray.cli import metrics_table
    from sslmm_ray.data import store, synth
    from sslmm_ray.train.runner import run_stage

    started = time.monotonic()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_uri = str(work_dir / "data" / f"mosi-{scale:g}")
    run_name = time.strftime("finetune-%Y%m%d-%H%M%S")

    with console.status("[1/3] generating synthetic mosi data ..."):
        manifest = store.write_dataset(synth.generate("mosi", scale=scale, seed=0), data_uri)
    console.print(f"[green]✓[/] data: {manifest.counts} -> {data_uri}")

    with console.status("[2/3] starting Ray ..."):
        info = ray_env.init()
    console.print(f"[green]✓[/] ray: {info.cpus:g} logical CPUs ({info.address})")

    cfg = config_mod.load(overrides=[
        f"data.uri={data_uri}",
        "finetune.label_ratio=0.5",
        "finetune.missing_rate=0.5",
        f"finetune.epochs={epochs}",
        f"finetune.workers={workers}",
        "finetune.cpus_per_worker=1",
    ])
    console.print(f"[3/3] fine-tuning SSLMM on {workers} Ray Train workers, {epochs} epochs "
                  "(label ratio 0.5, missing rate 0.5) ...")
    result = run_stage("finetune", cfg, str(work_dir / "runs" / run_name))
    console.print(metrics_table(
        "SSLMM on synthetic mosi (label ratio 0.5, missing rate 0.5), test split",
        {"test": result.test},
    ))
    console.print(f"run directory: {result.run_dir}")
    console.print(f"done in {time.monotonic() - started:.0f} s")
    return {"test": result.test, "run_dir": result.run_dir}
