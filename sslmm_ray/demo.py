"""``sslmm demo``: the whole path on the embedded default, small enough for a laptop.

The defaults are the setting of ``sslmm bench accuracy --dataset synthetic`` (aligned mosi x0.5,
12 fine-tuning and 15 pre-training epochs, seed 0) on 2 data-parallel workers: one seed, a
functional check; the real-data benchmark (``--dataset digits``) measures the method.

Synthetic mosi-shaped data -> sharded Parquet -> Ray Data -> 2-worker DDP ``TorchTrainer`` runs:
self-supervised pre-training, then SSLMM fine-tuning at label ratio 0.5 and missing rate 0.5,
beside the supervised-only baseline of the same cell -> both test metric sets.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from sslmm_ray import config as config_mod
from sslmm_ray import ray_env


def run_demo(
    *, work_dir: Path, scale: float, epochs: int, pretrain_epochs: int, aligned: bool,
    workers: int, console: Console,
) -> dict:
    from sslmm_ray.cli.render import metrics_table
    from sslmm_ray.data import store, synth
    from sslmm_ray.train.runner import run_stage

    started = time.monotonic()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_uri = str(work_dir / "data" / f"mosi-{scale:g}{'-aligned' if aligned else ''}")
    run_name = time.strftime("demo-%Y%m%d-%H%M%S")

    with console.status("[1/5] generating synthetic mosi data ..."):
        raw = synth.generate("mosi", scale=scale, aligned=aligned, seed=0)
        manifest = store.write_dataset(raw, data_uri)
    console.print(f"[green]✓[/] data: {manifest.counts} -> {data_uri}")

    with console.status("[2/5] starting Ray ..."):
        info = ray_env.init()
    console.print(f"[green]✓[/] ray: {info.cpus:g} logical CPUs ({info.address})")

    common = [
        f"data.uri={data_uri}",
        "finetune.label_ratio=0.5",
        "missing.rate=0.5",  # both stages: pre-training sees the data as fine-tuning will
        f"finetune.epochs={epochs}",
        f"pretrain.epochs={pretrain_epochs}",
        f"finetune.workers={workers}",
        f"pretrain.workers={workers}",
    ]
    runs = work_dir / "runs" / run_name
    console.print(f"[3/5] self-supervised pre-training on {workers} Ray Train workers ...")
    pre = run_stage("pretrain", config_mod.load(overrides=common), str(runs / "pretrain"))

    console.print("[4/5] SSLMM: semi-supervised fine-tuning from the pre-trained weights "
                  "(label ratio 0.5, missing rate 0.5) ...")
    sslmm = run_stage(
        "finetune",
        config_mod.load(overrides=[*common, f"finetune.pretrained={pre.run_dir}"]),
        str(runs / "sslmm"),
    )
    console.print("[5/5] baseline: supervised-only fine-tuning (labeled rows only, "
                  "no pre-training, no pseudo-labels, no reconstruction) ...")
    supervised = run_stage(
        "finetune",
        config_mod.load(overrides=[
            *common, "finetune.pseudo_labels=false", "finetune.reconstruction=false"]),
        str(runs / "supervised"),
    )
    console.print(metrics_table(
        "synthetic mosi, label ratio 0.5, missing rate 0.5: test split",
        {"SSLMM": sslmm.test, "supervised-only": supervised.test},
    ))
    console.print(f"runs: {runs}")
    console.print(f"done in {time.monotonic() - started:.0f} s")
    return {"sslmm": sslmm.test, "supervised": supervised.test, "runs": str(runs)}
