"""``sslmm data``: write synthetic stores, import MMSA pickles, upgrade and inspect stores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sslmm_ray.cli.app import Dataset, JsonFlag, Preset, S3Endpoint, data_app, emit
from sslmm_ray.cli.render import normalization_line
from sslmm_ray.errors import UserError


@data_app.command("synth")
def data_synth(
    out_uri: Annotated[str, typer.Option("--out", help="Dataset URI (path, file://, s3://).")],
    preset: Annotated[Preset, typer.Option(help="Shapes of a real data set.")] = Preset.mosi,
    scale: Annotated[float, typer.Option(help="Fraction of the real split sizes.")] = 1.0,
    aligned: Annotated[bool, typer.Option("--aligned", help="Word-aligned lengths.")] = False,
    seed: Annotated[int, typer.Option(
        help="Generator seed; also permutes the stored row order.")] = 0,
    shard_rows: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 256,
    compression: Annotated[str, typer.Option(
        help="Parquet codec: none (fastest to stream), zstd, lz4, snappy, gzip.")] = "none",
    use_ray: Annotated[bool | None, typer.Option(
        "--ray/--no-ray",
        help="Generate and write shards as Ray tasks (default: when RAY_ADDRESS is set).")] = None,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Generate a synthetic dataset with a real data set's shapes and write the canonical store.

    Shard by shard: no process holds more than one shard's rows, whatever the scale.
    """
    import os

    from sslmm_ray import storage
    from sslmm_ray.data import store, synth
    from sslmm_ray.storage import StorageOptions

    if scale <= 0:
        raise UserError(f"--scale must be > 0, got {scale}")
    options = StorageOptions.from_env(s3_endpoint)
    storage.check_reachable(out_uri, options)  # fail before spending time on generation
    source = synth.SynthSource(preset.value, scale=scale, aligned=aligned, seed=seed)
    if use_ray is None:
        use_ray = bool(os.environ.get("RAY_ADDRESS"))
    if use_ray:
        from sslmm_ray import ray_env

        ray_env.init()
    manifest = store.write_source(
        source, out_uri, options, shard_rows=shard_rows, compression=compression, seed=seed,
        parallel=use_ray,
    )
    emit({"uri": out_uri, "name": manifest.name, "counts": manifest.counts,
           "dims": manifest.dims, "lengths": manifest.lengths,
           "shards": len(manifest.shards)}, as_json)


@data_app.command("import-mmsa")
def data_import_mmsa(
    pickle_file: Annotated[Path, typer.Argument(help="MMSA processed pickle (trusted, local).")],
    dataset: Annotated[Dataset, typer.Option(help="Which data set the pickle holds.")],
    out_uri: Annotated[str, typer.Option("--out", help="Dataset URI (path, file://, s3://).")],
    aligned: Annotated[bool | None, typer.Option(
        "--aligned/--unaligned",
        help="Force the layout (default: detected from the padded lengths).")] = None,
    shard_rows: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 256,
    compression: Annotated[str, typer.Option(
        help="Parquet codec: none (fastest to stream), zstd, lz4, snappy, gzip.")] = "none",
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Import an MMSA pickle (aligned_50.pkl, unaligned_50.pkl, unaligned_39.pkl)."""
    from sslmm_ray import storage
    from sslmm_ray.data import mmsa, store
    from sslmm_ray.storage import StorageOptions

    options = StorageOptions.from_env(s3_endpoint)
    storage.check_reachable(out_uri, options)
    raw = mmsa.load_pickle(pickle_file, dataset.value, aligned=aligned)
    manifest = store.write_dataset(
        raw, out_uri, options, shard_rows=shard_rows, compression=compression
    )
    emit({"uri": out_uri, "name": manifest.name, "counts": manifest.counts,
           "dims": manifest.dims, "lengths": manifest.lengths, "stats": manifest.stats},
          as_json)


@data_app.command("upgrade")
def data_upgrade(
    data: Annotated[str, typer.Option(help="Dataset URI of a format 1 store.")],
    seed: Annotated[int, typer.Option(help="Seed of the stored row permutation.")] = 0,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Rewrite a format 1 store (list columns) in the current format, in place."""
    from sslmm_ray.data import store
    from sslmm_ray.storage import StorageOptions

    options = StorageOptions.from_env(s3_endpoint)
    manifest = store.upgrade_dataset(data, options, seed=seed)
    emit({"uri": data, "name": manifest.name, "format_version": manifest.format_version,
           "counts": manifest.counts, "shards": len(manifest.shards)}, as_json)


@data_app.command("inspect")
def data_inspect(
    uri: Annotated[str, typer.Argument(help="Dataset URI.")],
    verify: Annotated[bool, typer.Option("--verify", help="Check every shard checksum.")] = False,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Counts, dims, lengths and label statistics per split."""
    from sslmm_ray.data import store
    from sslmm_ray.storage import StorageOptions

    options = StorageOptions.from_env(s3_endpoint)
    info = store.describe(store.open_dataset(uri, options, verify=verify), options)
    table = Table(title=f"{info['name']} at {uri}")
    for col in ("split", "count", "label mean", "label std", "pos/neg/zero",
                *(f"{m} len (min/mean/max)" for m in info["modalities"])):
        table.add_column(col)
    for split, s in info["splits"].items():
        lab = s["label"]
        table.add_row(
            split, str(s["count"]), f"{lab['mean']:.3f}", f"{lab['std']:.3f}",
            f"{lab['positive']}/{lab['negative']}/{lab['zero']}",
            *(f"{v['min']}/{v['mean']:.1f}/{v['max']}"
              for v in (s["lengths"][m] for m in info["modalities"])),
        )
    table.caption = "dims: " + ", ".join(
        f"{m} {s['length']}x{s['dim']}" for m, s in info["modalities"].items()
    ) + "\n" + normalization_line(info["normalization"])
    emit(info, as_json, table)
