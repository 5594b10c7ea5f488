"""``sslmm bench data``: samples per second streamed into a training loop, by source.

Three sources of the same training split (synthetic, a preset's shapes), consumed the same way:

* ``memory``: the split decoded once, protocols applied, held as torch tensors; each batch is
  gathered from shuffled row indices (a copy, as a DataLoader's collate makes). The ceiling:
  no I/O, no decode, no Ray.
* ``local``: the canonical store on local disk, streamed by :func:`pipeline.split_dataset`
  (Ray Data ``read_parquet`` -> ``map_batches`` decode + protocols) and ``iter_torch_batches``.
* ``local`` checks every shard's checksum in its read task (``data.verify_checksums=true``);
  ``local_unverified`` reads with ``read_parquet`` unchecked (the default);
  ``verify_over_unverified`` is the price of checking every shard on read.
* ``s3``: the same store on an S3 server (a local moto process unless one is given).

The consumer is a trivial training step: it reads every tensor of the batch (a sum) and, with
``step_ms``, sleeps that long to stand for the model's compute (a sleep releases the GIL as a
torch kernel does, so prefetching overlaps it; it does not compete for cores as real compute
would). The first epoch of each source is a warm-up, reported apart. Timed epochs run
round-robin across the sources, so that a noisy neighbour slows all of them alike, and the
rate is the median epoch's.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslmm_ray import ray_env, storage
from sslmm_ray.data import pipeline, protocols, store, synth
from sslmm_ray.data.normalize import normalizer_for
from sslmm_ray.storage import StorageOptions

__all__ = ["run"]

Batches = Iterable[dict[str, torch.Tensor]]


def _consume(batches: Batches, step_ms: float) -> int:
    """The training-loop stand-in: touch every tensor, optionally 'compute'; returns rows."""
    rows = 0
    for batch in batches:
        acc = 0.0
        for t in batch.values():
            acc += float(t.sum()) if t.dtype.is_floating_point else float(t.long().sum())
        rows += int(batch["label"].shape[0])
        if step_ms > 0:
            time.sleep(step_ms / 1000.0)
    return rows


def _memory_batches(
    tensors: dict[str, torch.Tensor], batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches by row index from in-memory tensors (the same rows and batch size)."""
    n = tensors["label"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield {k: v.index_select(0, idx) for k, v in tensors.items()}


def _stream(
    manifest: store.Manifest,
    spec: protocols.ProtocolSpec,
    options: StorageOptions | None,
    batch_size: int,
    prefetch_batches: int,
    verify: bool = True,
) -> Callable[[int], Batches]:
    # One Dataset iterated once per epoch, as a Train worker's shard is: the file order is
    # reseeded at every execution, and planning happens once.
    ds = pipeline.split_dataset(manifest, "train", spec, options, shuffle_seed=0, verify=verify)

    def make(epoch: int) -> Batches:
        return ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch_batches)

    return make


def _measure(
    makers: dict[str, Callable[[int], Batches]], epochs: int, step_ms: float
) -> dict[str, dict[str, Any]]:
    times: dict[str, list[float]] = {k: [] for k in makers}
    rows: dict[str, int] = {}
    for epoch in range(epochs):
        for name, make in makers.items():
            t0 = time.perf_counter()
            rows[name] = _consume(make(epoch), step_ms)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        timed = ts[1:] if len(ts) > 1 else ts
        n = rows[name]
        out[name] = {
            "rows_per_epoch": n,
            "epoch_seconds": [round(t, 4) for t in ts],
            "warmup_samples_per_s": round(n / ts[0], 1),
            "samples_per_s": round(n / float(np.median(timed)), 1),
            "best_samples_per_s": round(n / min(timed), 1),
        }
    return out


def _decode_one_core(manifest: store.Manifest, spec: protocols.ProtocolSpec) -> dict[str, Any]:
    """Read + decode + protocols in this process, no Ray: what one core can feed at most."""
    t0 = time.perf_counter()
    rows = 0
    norm = normalizer_for(manifest, True)  # as the streamed sources decode
    for table in store.iter_split_tables(manifest, "train"):
        batch = protocols.apply(store.decode_table(table, manifest.modalities, norm), spec)
        rows += len(batch["label"])
    return {"rows": rows, "samples_per_s": round(rows / (time.perf_counter() - t0), 1)}


def run(
    *,
    preset: str = "mosi",
    scale: float = 0.5,
    epochs: int = 5,
    batch_size: int = 64,
    prefetch_batches: int = 4,
    shard_rows: int = 128,
    compression: str = store.DEFAULT_COMPRESSION,
    step_ms: float = 0.0,
    missing_rate: float = 0.5,
    s3: Any | None = None,
    s3_uri: str | None = None,
    sources: tuple[str, ...] = ("memory", "local", "local_unverified", "s3"),
    seed: int = 0,
) -> dict[str, Any]:
    """Measure each source; returns rates, per-epoch seconds and the ratios to in-memory.

    ``s3``: a running :class:`~sslmm_ray.devtools.s3server.S3Server` to use; ``s3_uri``: an
    ``s3://bucket/prefix`` to write to instead (endpoint and credentials from the environment).
    With neither, a moto server is started on 127.0.0.1 and stopped at the end. Ray is
    started with :func:`sslmm_ray.ray_env.init` unless it already runs.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    known = {"memory", "local", "local_unverified", "s3"}
    unknown = set(sources) - known
    if unknown:
        raise ValueError(f"unknown source(s) {sorted(unknown)}: use {sorted(known)}")
    raw = synth.generate(preset, scale=scale, seed=seed)
    spec = protocols.ProtocolSpec(missing_rate=missing_rate, seed=seed)
    result: dict[str, Any] = {
        "preset": preset,
        "scale": scale,
        "train_rows": int(raw.counts()["train"]),
        "bytes_per_row": int(sum(raw.splits["train"][m][0].nbytes for m in raw.dims())),
        "epochs": epochs,
        "batch_size": batch_size,
        "prefetch_batches": prefetch_batches,
        "shard_rows": shard_rows,
        "compression": compression,
        "step_ms": step_ms,
        "missing_rate": missing_rate,
        "cpus": os.cpu_count(),
    }
    server = None
    remote_uri: str | None = None
    options: StorageOptions | None = None
    makers: dict[str, Callable[[int], Batches]] = {}
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-data-") as tmp:
        try:
            if "s3" in sources and s3 is None and s3_uri is None:
                from sslmm_ray.devtools.s3server import FAKE_CREDENTIALS, start_s3_server

                server = s3 = start_s3_server(bucket="sslmm-bench")
                os.environ.update(FAKE_CREDENTIALS)  # before ray.init: workers inherit it
            ray_env.init()
            if "memory" in sources:
                batch = protocols.apply(dict(raw.splits["train"]), spec)
                tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
                makers["memory"] = lambda e: _memory_batches(tensors, batch_size, e)
            if {"local", "local_unverified"} & set(sources):
                local = store.write_dataset(
                    raw, str(Path(tmp) / "ds"), shard_rows=shard_rows, compression=compression
                )
                result["decode_one_core"] = _decode_one_core(local, spec)
            if "local" in sources:
                makers["local"] = _stream(local, spec, None, batch_size, prefetch_batches)
            if "local_unverified" in sources:
                makers["local_unverified"] = _stream(
                    local, spec, None, batch_size, prefetch_batches, verify=False
                )
            if "s3" in sources:
                options = s3.options if s3 is not None else StorageOptions.from_env()
                remote_uri = s3_uri or s3.uri(f"bench-data/{os.getpid()}-{time.time_ns()}")
                remote = store.write_dataset(
                    raw, remote_uri, options, shard_rows=shard_rows, compression=compression
                )
                result["s3_endpoint"] = options.describe()
                makers["s3"] = _stream(remote, spec, options, batch_size, prefetch_batches)
            result["sources"] = _measure(makers, epochs, step_ms)
        finally:
            if remote_uri is not None:
                storage.delete(remote_uri, options)
            if server is not None:
                server.stop()
    # Ratios from the median epochs, and from the best ones: on a shared machine the best epoch
    # is the least disturbed one, so the second is the steadier estimate of capability.
    src = result["sources"]
    if "memory" in src:
        for k in ("s3", "local"):
            if k in src:
                for stat, suffix in (("samples_per_s", ""), ("best_samples_per_s", "_best")):
                    ratio = src[k][stat] / src["memory"][stat]
                    result[f"{k}_over_memory{suffix}"] = round(ratio, 3)
    if "local" in src and "local_unverified" in src:
        for stat, suffix in (("samples_per_s", ""), ("best_samples_per_s", "_best")):
            ratio = src["local"][stat] / src["local_unverified"][stat]
            result[f"verify_over_unverified{suffix}"] = round(ratio, 3)
    return result


if __name__ == "__main__":
    import json
    import sys

    def _value(v: str) -> Any:
        try:
            return float(v) if "." in v else int(v)
        except ValueError:
            return v

    kwargs = {k: _value(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
    print(json.dumps(run(**kwargs), indent=2))
