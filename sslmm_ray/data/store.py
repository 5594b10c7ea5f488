"""The canonical store: sharded Parquet plus a JSON manifest, on any storage URI.

Layout under the dataset URI::

    manifest.json                      published last: its presence means "complete"
    <generation>/train-00000.parquet   one row per sample
    <generation>/valid-00000.parquet
    <generation>/labels-train.parquet  (key, label) per row: the label index
    ...

Why generations: each write goes to a fresh folder and the manifest is written only after every
shard is closed and checksummed, so a reader never sees a half-written dataset: either the old
manifest (pointing at old shards) or the new one. A write that fails removes its own folder and
publishes nothing; an overwrite deletes the previous generation only after the new manifest is
read back and seen to be live, and only folders named as this store names them
(``GENERATION_RE``): a tampered manifest listing ``victim/x.parquet`` cannot make an overwrite
delete ``victim``. A manifest write that fails ambiguously (the PUT reached the server, the
answer was lost) is settled by reading the manifest back before anything is deleted.

Rows hold ``id``, ``split``, ``label`` and per modality the ``(T, d)`` features as one
``fixed_size_binary[T*d*4]`` value of raw little-endian float32 (format 2) plus the valid length
``<m>_len``. Why raw bytes: Parquet decodes a fixed-size list through its nested-list levels,
~0.3 ms per MOSI row per core; a fixed-size binary column is one flat buffer that
:func:`decode_table` views with ``np.frombuffer``, no copy (docs/DATA.md, "Storage format").
Each split's rows are permuted with the write's ``seed`` before sharding, so a source ordered by
video does not give shards of one speaker. Writing is shard by shard (:func:`write_source`): each
shard asks its source for exactly the rows the permutation puts there (a synthetic source makes
them by index; an in-memory one is sliced), in Ray tasks when Ray is running, so no process
holds more than a shard. Each split also gets a label index, ``<generation>/labels-<split>.parquet``
(sample key and label per row, listed and checksummed in the manifest), so that drawing a run's
labeled rows reads one small file instead of every shard. The manifest also carries the
training split's per-feature mean and std (:mod:`sslmm_ray.data.normalize`, merged from the
shards' moments as they are written), which decoding applies when asked to. Format 1 stores
(fixed-size list columns) are refused with the command that upgrades them
(:func:`upgrade_dataset`).

Reading trusts nothing it has not checked: the manifest's fields, then each shard's presence,
size, Parquet footer, row count and column types against the manifest (``verify``: checksums).
:func:`read_split` checks each shard's SHA-256 as it reads it (:func:`read_verified`), as do
the Ray Data read tasks when ``data.verify_checksums`` is on, so a shard corrupted without
changing its size is refused too. Every failure is a
:class:`~sslmm_ray.data.sources.DataError` naming the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import posixpath
import re
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import xxhash

from sslmm_ray import locks, storage
from sslmm_ray.config import MODALITIES
from sslmm_ray.data.normalize import (
    Moments,
    Normalizer,
    Statistics,
    check_statistics,
    finish_statistics,
    merge_moments,
    normalize_features,
    split_moments,
)
from sslmm_ray.data.protocols import sample_keys
from sslmm_ray.data.sources import SPLITS, DataError, RawDataset, validate_raw
from sslmm_ray.errors import UserError
from sslmm_ray.metrics import dataset_family
from sslmm_ray.storage import StorageError, StorageOptions

log = logging.getLogger(__name__)

#: 2: features as fixed_size_binary blobs of little-endian float32, rows permuted by ``seed``.
#: 1: features as fixed_size_list<float32>; read only by :func:`upgrade_dataset`.
FORMAT_VERSION = 2
#: Feature values on disk: little-endian float32, whatever the machine's byte order.
FEATURE_DTYPE = np.dtype("<f4")
MANIFEST = "manifest.json"
GENERATION_PREFIX = "shards-"
#: Exactly the folder names :func:`write_dataset` creates; an overwrite deletes nothing else.
GENERATION_RE = re.compile(r"shards-\d{8}T\d{6}-[0-9a-f]{8}")
COMPRESSIONS: tuple[str, ...] = ("none", "zstd", "lz4", "snappy", "gzip")
#: Uncompressed by default: float features shrink only ~1.5x under zstd, while decompressing
#: them costs more CPU than decoding the Parquet itself, and decode is what limits streaming
#: (docs/DATA.md, "Streaming throughput"). Pick "zstd" where storage or bandwidth is scarce.
DEFAULT_COMPRESSION = "none"
#: Bytes of rows the Parquet encoder takes at a time (see :func:`_encode_shard`).
ENCODE_BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class ModalitySpec:
    dim: int
    length: int

    @property
    def nbytes(self) -> int:
        """Bytes of one row's ``(length, dim)`` float32 blob."""
        return self.length * self.dim * FEATURE_DTYPE.itemsize


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset URI
    split: str
    rows: int
    bytes: int
    sha256: str  # checked by ``inspect --verify`` and `open_dataset(verify=True)`
    # XXH3-64 of the same bytes: the check made on every read. SHA-256 runs at 0.2-1.2 GB/s per
    # core here and cost ~30% of streaming throughput; XXH3 runs at ~10 GB/s. It guards against
    # corruption, not tampering (whoever can rewrite a shard can rewrite the manifest). Empty in
    # stores written before it existed: those are checked with SHA-256.
    xxh3: str = ""


@dataclass
class Manifest:
    """What a reader needs to trust a dataset before it reads a byte of it."""

    uri: str
    name: str
    label_range: tuple[float, float]
    modalities: dict[str, ModalitySpec]
    counts: dict[str, int]
    shards: list[ShardInfo]
    schema: str
    stats: dict[str, Any] = field(default_factory=dict)
    # Train-split mean/std per modality and feature; {} in stores written before it existed.
    normalization: Statistics = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: str = ""
    # Each split's rows were permuted with numpy ``default_rng((seed, SPLITS.index(split)))``
    # before sharding (format 2; see :func:`row_order`).
    seed: int = 0
    # Per split, one small Parquet file of (key, label) in stored row order, written with the
    # shards (:func:`read_label_index`): what drawing the labeled rows needs, without reading
    # every shard. [] in stores written before it existed: those are scanned.
    label_index: list[ShardInfo] = field(default_factory=list)

    @property
    def family(self) -> str:
        """The metric family: mosi, mosei or sims (an unknown name is an error, not mosi)."""
        family = _family(self.name)
        if family is None:
            raise DataError(
                f"{storage.join(self.uri, MANIFEST)}: unknown data set name {self.name!r} "
                "(expected mosi, mosei, sims or a synthetic preset such as synthetic-mosi)"
            )
        return family

    @property
    def dims(self) -> dict[str, int]:
        return {m: s.dim for m, s in self.modalities.items()}

    @property
    def lengths(self) -> dict[str, int]:
        return {m: s.length for m, s in self.modalities.items()}

    def shard_uris(self, split: str) -> list[str]:
        return [storage.join(self.uri, s.path) for s in self.shards if s.split == split]

    def generations(self) -> set[str]:
        """The top-level folders holding this manifest's shards."""
        return {s.path.split("/", 1)[0] for s in self.shards if "/" in s.path}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("uri")
        return out

    @classmethod
    def from_json(cls, uri: str, data: dict[str, Any]) -> Manifest:
        where = storage.join(uri, MANIFEST)
        try:
            manifest = cls(
                uri=uri,
                name=str(data["name"]),
                label_range=(float(data["label_range"][0]), float(data["label_range"][1])),
                modalities={m: ModalitySpec(**s) for m, s in data["modalities"].items()},
                counts={str(k): int(v) for k, v in data["counts"].items()},
                shards=[ShardInfo(**s) for s in data["shards"]],
                schema=data["schema"],
                stats=data.get("stats", {}),
                normalization=data.get("normalization") or {},
                format_version=int(data.get("format_version", 0)),
                created=data.get("created", ""),
                seed=int(data.get("seed", 0)),
                label_index=[ShardInfo(**s) for s in data.get("label_index") or []],
            )
        except (
            KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError
        ) as err:
            raise DataError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None
        manifest._check(where)
        return manifest

    def _check(self, where: str) -> None:
        """Internal consistency: a known name, positive shapes, safe shard paths, counts."""
        self.family  # noqa: B018 - raises DataError for an unknown data set name
        for m, spec in self.modalities.items():
            if not (isinstance(spec.dim, int) and isinstance(spec.length, int)) or min(
                spec.dim, spec.length
            ) < 1:
                raise DataError(f"{where}: modality '{m}' has invalid shape {spec}")
        rows: dict[str, int] = {}
        for shard in self.shards:
            norm = posixpath.normpath(shard.path)
            if norm != shard.path or norm.startswith(("/", "..")):
                raise DataError(f"{where}: shard path {shard.path!r} escapes the dataset folder")
            if shard.split not in SPLITS:
                raise DataError(f"{where}: shard {shard.path} has unknown split {shard.split!r}")
            rows[shard.split] = rows.get(shard.split, 0) + int(shard.rows)
        if self.normalization:
            problem = check_statistics(self.normalization, self.dims)
            if problem:
                raise DataError(f"{where}: {problem}")
        if rows != {k: v for k, v in self.counts.items() if v}:
            raise DataError(
                f"{where}: shard rows per split {rows} do not add up to counts {self.counts}"
            )
        indexed: set[str] = set()
        for entry in self.label_index:
            fields_ok = all(isinstance(getattr(entry, k), str)
                            for k in ("path", "split", "sha256", "xxh3"))
            if not fields_ok or not all(
                type(getattr(entry, k)) is int for k in ("rows", "bytes")
            ):
                raise DataError(f"{where}: malformed label index entry {entry}")
            norm = posixpath.normpath(entry.path)
            if norm != entry.path or norm.startswith(("/", "..")):
                raise DataError(f"{where}: label index {entry.path!r} escapes the dataset folder")
            if entry.split not in rows or entry.split in indexed:
                raise DataError(f"{where}: label index {entry.path} has split {entry.split!r}, "
                                "not a split of the shards or listed twice")
            if entry.rows != rows[entry.split]:
                raise DataError(f"{where}: label index {entry.path} has {entry.rows} rows, "
                                f"split {entry.split!r} {rows[entry.split]}")
            indexed.add(entry.split)

    def label_index_for(self, split: str) -> ShardInfo | None:
        """The label index of ``split``, or None (stores written before it existed)."""
        return next((e for e in self.label_index if e.split == split), None)


def arrow_schema(modalities: dict[str, ModalitySpec]) -> pa.Schema:
    """The shard schema of format 2: the one place, with :func:`_split_table` and
    :func:`decode_table`, that knows how features are laid out."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.float32(), nullable=False),
    ]
    for m in MODALITIES:
        spec = modalities[m]
        fields.append(pa.field(m, pa.binary(spec.nbytes), nullable=False))
        fields.append(pa.field(f"{m}_len", pa.int32(), nullable=False))
    return pa.schema(fields)


def _split_table(split: str, arrays: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    n = len(arrays["id"])
    columns: dict[str, pa.Array] = {
        "id": pa.array(arrays["id"].astype(str), pa.string()),
        "split": pa.array([split] * n, pa.string()),
        "label": pa.array(np.asarray(arrays["label"], np.float32)),
    }
    for m in MODALITIES:
        feats = np.ascontiguousarray(arrays[m], dtype=FEATURE_DTYPE)
        width = schema.field(m).type.byte_width
        if feats.nbytes != n * width:
            raise DataError(f"split {split!r}: '{m}' holds {feats.nbytes} bytes for {n} rows, "
                            f"expected {width} per row")
        # zero-copy: the numpy buffer becomes the column's data buffer
        columns[m] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), n, [None, pa.py_buffer(feats)]
        )
        columns[f"{m}_len"] = pa.array(np.asarray(arrays[f"{m}_len"], np.int32))
    return pa.Table.from_pydict(columns, schema=schema)


def _encode_shard(table: pa.Table, compression: str) -> pa.Buffer:
    """One Parquet file, one row group. Features skip dictionaries and statistics: float
    features gain nothing from either, and both cost time at write and read.

    Values are encoded ~1 MiB of rows at a time (``write_batch_size``): with the default of
    1024 rows the encoder buffered a whole shard's feature column (a MOSI text column of 256
    rows is 39 MB) before cutting pages, and Arrow's peak while encoding a 49 MB shard was
    139 MB; now it is the output buffer's 64 MB.
    """
    sink = pa.BufferOutputStream()
    small = ["id", "split", "label", *(f"{m}_len" for m in MODALITIES)]
    row_bytes = table.nbytes // max(1, table.num_rows)
    pq.write_table(
        table,
        sink,
        compression=compression,
        use_dictionary=["split"],
        write_statistics=small,
        row_group_size=max(1, table.num_rows),
        write_batch_size=max(1, min(1024, ENCODE_BATCH_BYTES // max(1, row_bytes))),
    )
    return sink.getvalue()  # no copy to bytes: hashing and writing take the buffer


def _family(name: str) -> str | None:
    """The metric family of a data set name; the scalable preset has MOSI's labels."""
    if "scalable" in re.split(r"[^a-z0-9]+", name.lower()):
        return "mosi"
    try:
        return dataset_family(name)
    except UserError:
        return None


def _previous_manifest(uri: str, options: StorageOptions | None) -> Manifest | None:
    """The manifest an overwrite replaces (None if absent or unreadable)."""
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri, options):
        return None
    try:
        return Manifest.from_json(uri, storage.read_json(manifest_uri, options))
    except (DataError, StorageError) as err:
        log.warning("replacing an unreadable manifest at %s (%s)", manifest_uri, err)
        return None


def _remove_quietly(uri: str, options: StorageOptions | None, why: str) -> None:
    try:
        storage.delete(uri, options)
    except OSError as err:  # cleanup must not hide the error that caused it
        log.warning("could not remove %s (%s): %s", uri, why, err)


class RowSource(Protocol):
    """A data set the writer can take rows from, a shard at a time (never whole).

    ``rows(split, indices)`` returns the split's source rows ``indices`` in that order, in the
    :class:`~sslmm_ray.data.sources.SplitArrays` layout. ``portable``: the object is small and
    makes its rows itself, so shards may be written in Ray tasks (``synth.SynthSource``); an
    in-memory data set is not (its arrays would be copied to every task). ``checked``: its rows
    were validated already (``validate_raw`` on the whole data set), otherwise each shard's
    rows are validated as they are written.
    """

    name: str
    label_range: tuple[float, float]
    stats: dict[str, Any]
    portable: bool
    checked: bool

    def counts(self) -> dict[str, int]: ...

    def dims(self) -> dict[str, int]: ...

    def max_lengths(self) -> dict[str, int]: ...

    def rows(self, split: str, indices: np.ndarray) -> Mapping[str, np.ndarray]: ...


@dataclass(frozen=True)
class _InMemory:
    """A :class:`RawDataset` (validated) as a :class:`RowSource`: rows are copied out of it."""

    raw: RawDataset
    portable = False
    checked = True

    @property
    def name(self) -> str:
        return self.raw.name

    @property
    def label_range(self) -> tuple[float, float]:
        return self.raw.label_range

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self.raw.stats)

    def counts(self) -> dict[str, int]:
        return self.raw.counts()

    def dims(self) -> dict[str, int]:
        return self.raw.dims()

    def max_lengths(self) -> dict[str, int]:
        return self.raw.max_lengths()

    def rows(self, split: str, indices: np.ndarray) -> Mapping[str, np.ndarray]:
        return {k: v[indices] for k, v in self.raw.splits[split].items()}


def _check_write_args(shard_rows: int, compression: str) -> None:
    if shard_rows < 1:
        raise UserError(f"shard_rows must be >= 1, got {shard_rows}")
    if compression.lower() not in COMPRESSIONS:
        raise UserError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


@locks.exclusive("uri", what="dataset")  # two writers of one URI would mix generations
def write_dataset(
    raw: RawDataset,
    uri: str,
    options: StorageOptions | None = None,
    *,
    shard_rows: int = 256,
    compression: str = DEFAULT_COMPRESSION,
    deep_check: bool = True,
    seed: int = 0,
) -> Manifest:
    """Write an in-memory ``raw`` as sharded Parquet, then publish the manifest (last).

    ``raw`` is validated first (``deep_check``: every value finite, zero padding), so bad input
    raises :class:`DataError` before any byte is written. Then as :func:`write_source`, in this
    process (``raw`` is already in memory; Ray tasks would only copy it).
    """
    _check_write_args(shard_rows, compression)
    validate_raw(raw, deep=deep_check)
    storage.check_reachable(uri, options)
    return _write(_InMemory(raw), uri, options, shard_rows=shard_rows,
                  compression=compression.lower(), deep_check=deep_check, seed=seed,
                  parallel=False)


@locks.exclusive("uri", what="dataset")
def write_source(
    source: RowSource,
    uri: str,
    options: StorageOptions | None = None,
    *,
    shard_rows: int = 256,
    compression: str = DEFAULT_COMPRESSION,
    deep_check: bool = True,
    seed: int = 0,
    parallel: bool | None = None,
) -> Manifest:
    """Write ``source`` shard by shard in bounded memory, then publish the manifest (last).

    Each split's rows are permuted with ``seed`` (:func:`row_order`, recorded in the manifest)
    before they are cut into shards: sources list rows by video, and shards of one speaker
    would make shard-level shuffling and streaming batches far from i.i.d. Each shard asks the
    source for exactly the rows the permutation puts there, so one shard's rows are in memory
    per worker, never a split. Each shard is validated (``deep_check``: every value) unless the
    source was already, encoded, written, checksummed; the training split's normalisation
    moments and every split's (key, label) pairs come back with it. The moments are merged in
    shard order (the same statistics in or out of Ray), the (key, label) pairs become the
    split's label index, and the manifest is published last with the same guarantees as
    before: a failure removes this write's folder and leaves any previous dataset at ``uri``
    untouched; a successful overwrite deletes the previous generation after the new manifest
    is read back.

    ``parallel``: write shards as Ray tasks (None: when Ray is initialised in this process and
    the source is portable); otherwise one after the other here.
    """
    _check_write_args(shard_rows, compression)
    storage.check_reachable(uri, options)
    return _write(source, uri, options, shard_rows=shard_rows, compression=compression.lower(),
                  deep_check=deep_check, seed=seed, parallel=parallel)


@dataclass(frozen=True)
class _Target:
    """Where and how a shard is written (shipped to Ray tasks: small, picklable)."""

    uri: str
    generation: str
    schema: pa.Schema
    compression: str
    options: StorageOptions | None
    deep_check: bool


@dataclass(frozen=True)
class _ShardJob:
    split: str
    number: int
    rows: np.ndarray  # source row indices, in stored order


@dataclass
class _ShardResult:
    info: ShardInfo
    keys: np.ndarray  # (rows,) uint64 sample keys, in stored order
    labels: np.ndarray  # (rows,) float32
    moments: dict[str, Moments] | None  # train split only


def _shard_jobs(counts: Mapping[str, int], shard_rows: int, seed: int) -> list[_ShardJob]:
    jobs = []
    for split in SPLITS:
        if split not in counts:
            continue
        order = row_order(counts[split], seed, split)
        for i, start in enumerate(range(0, counts[split], shard_rows)):
            jobs.append(_ShardJob(split, i, order[start : start + shard_rows]))
    return jobs


def _write_shard(source: RowSource, job: _ShardJob, target: _Target) -> _ShardResult:
    """Make, check, encode, write and checksum one shard; runs here or in a Ray task."""
    arrays = dict(source.rows(job.split, job.rows))
    if not source.checked:
        splits: dict[str, Any] = {job.split: arrays}
        part = RawDataset(source.name, source.label_range, splits)
        validate_raw(part, dims=source.dims(), deep=target.deep_check)
    keys = sample_keys(arrays["id"])
    labels = np.asarray(arrays["label"], np.float32).copy()
    moments = split_moments(arrays) if job.split == "train" else None
    table = _split_table(job.split, arrays, target.schema)
    del arrays  # the table holds the feature buffers; nothing else needs them
    payload = _encode_shard(table, target.compression)
    rows = table.num_rows
    del table
    rel = f"{target.generation}/{job.split}-{job.number:05d}.parquet"
    storage.write_bytes(storage.join(target.uri, rel), payload, target.options)
    info = ShardInfo(
        path=rel,
        split=job.split,
        rows=rows,
        bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        xxh3=xxhash.xxh3_64_hexdigest(payload),
    )
    return _ShardResult(info, keys, labels, moments)


def _ray_if_running() -> Any:
    """The ``ray`` module when Ray is initialised in this process, else None (no import)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _write(
    source: RowSource,
    uri: str,
    options: StorageOptions | None,
    *,
    shard_rows: int,
    compression: str,
    deep_check: bool,
    seed: int,
    parallel: bool | None,
) -> Manifest:
    counts = {s: int(n) for s, n in source.counts().items()}
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise DataError(f"data set {source.name!r}: unknown split(s) {unknown}, expected {SPLITS}")
    previous = _previous_manifest(uri, options)
    dims, lengths = source.dims(), source.max_lengths()
    modalities = {m: ModalitySpec(dim=int(dims[m]), length=int(lengths[m])) for m in MODALITIES}
    schema = arrow_schema(modalities)
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    generation = f"{GENERATION_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"
    generation_uri = storage.join(uri, generation)
    target = _Target(uri, generation, schema, compression, options, deep_check)
    jobs = _shard_jobs(counts, shard_rows, seed)
    ray = _ray_if_running() if parallel is not False and source.portable else None
    if parallel and ray is None:
        raise UserError("parallel writing needs Ray initialised in this process (ray.init) "
                        "and a source that makes its own rows")
    try:
        if ray is not None:
            results = _run_in_ray(ray, source, jobs, target)
        else:
            results = [_write_shard(source, job, target) for job in jobs]
        train = [r.moments for r in results if r.moments is not None]
        normalization = finish_statistics(merge_moments(train)) if train else {}
        label_index = [
            _write_label_index(
                split, [r for r, j in zip(results, jobs, strict=True) if j.split == split], target
            )
            for split in SPLITS
            if split in counts
        ]
        manifest = Manifest(
            uri=uri,
            name=source.name,
            label_range=(float(source.label_range[0]), float(source.label_range[1])),
            modalities=modalities,
            counts=counts,
            shards=[r.info for r in results],
            schema=schema.to_string(show_schema_metadata=False),
            stats=dict(source.stats),
            normalization=normalization,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            seed=seed,
            label_index=label_index,
        )
    except BaseException:
        _remove_quietly(generation_uri, options, "partial write")
        raise
    if _publish(manifest, generation, options) and previous is not None:
        for old in sorted(previous.generations() - {generation}):
            if GENERATION_RE.fullmatch(old):
                _remove_quietly(storage.join(uri, old), options, "previous generation")
            else:
                log.warning(
                    "not deleting %s: the previous manifest lists it, but this store never "
                    "writes a folder of that name",
                    storage.join(uri, old),
                )
    return manifest


#: How long a failed parallel write waits for its other shard tasks to stop (cancelled) before
#: killing them; the write's folder is removed only once no task can still write into it.
_CANCEL_WAIT_S = 30.0


def _run_in_ray(ray: Any, source: RowSource, jobs: list[_ShardJob], target: _Target
                ) -> list[_ShardResult]:
    """One Ray task per shard, as many in flight as the cluster has CPUs; results in order.

    A failing task cancels the others and waits for them, so that the caller's cleanup is not
    overtaken by a shard written after it; the task's own exception (a DataError, an OSError)
    is re-raised as itself, not wrapped in Ray's traceback text.
    """
    task = ray.remote(num_cpus=1)(_write_shard)
    window = max(1, int(ray.cluster_resources().get("CPU", 1)))
    source_ref = ray.put(source)
    results: list[_ShardResult | None] = [None] * len(jobs)
    pending: dict[Any, int] = {}
    queue = iter(enumerate(jobs))
    try:
        while True:
            while len(pending) < window and (item := next(queue, None)) is not None:
                k, job = item
                pending[task.remote(source_ref, job, target)] = k
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                k = pending.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise
    except BaseException:
        _stop_tasks(ray, list(pending))
        raise
    return results  # type: ignore[return-value]


def _stop_tasks(ray: Any, refs: list[Any]) -> None:
    """Cancel the shard tasks still running and wait until none can write any more."""
    for force in (False, True):  # ask first (KeyboardInterrupt in the task), then kill
        if not refs:
            return
        for ref in refs:
            try:
                ray.cancel(ref, force=force)
            except Exception as err:  # noqa: BLE001 - best effort; the wait below decides
                log.debug("cancelling a shard task: %s", err)
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=_CANCEL_WAIT_S)
    if refs:
        log.warning("%d shard task(s) did not stop; their shards may be left behind", len(refs))


#: The label index's columns: what :func:`sslmm_ray.data.protocols.labeled_keys_of_keys` reads.
LABEL_INDEX_SCHEMA = pa.schema([
    pa.field("key", pa.uint64(), nullable=False),
    pa.field("label", pa.float32(), nullable=False),
])


def _write_label_index(split: str, results: list[_ShardResult], target: _Target) -> ShardInfo:
    """The split's (key, label) pairs in stored row order, as one small Parquet file.

    Drawing the labeled rows of a run (``pipeline.labeled_split_keys``) needs only these; with
    the index the driver reads one file of 12 bytes a row instead of two columns of every shard.
    """
    keys = np.concatenate([r.keys for r in results])
    labels = np.concatenate([r.labels for r in results])
    if len(np.unique(keys)) != len(keys):
        raise DataError(f"split {split!r}: sample ids are not unique")
    table = pa.table({"key": keys, "label": labels}, schema=LABEL_INDEX_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none", row_group_size=max(1, len(keys)))
    payload = sink.getvalue()
    rel = f"{target.generation}/labels-{split}.parquet"
    storage.write_bytes(storage.join(target.uri, rel), payload, target.options)
    return ShardInfo(
        path=rel,
        split=split,
        rows=len(keys),
        bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        xxh3=xxhash.xxh3_64_hexdigest(payload),
    )


def read_label_index(
    manifest: Manifest, split: str, options: StorageOptions | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The split's (keys uint64, labels float32) in stored row order, checksum checked; None
    for stores written before the index existed (callers then scan the shards)."""
    entry = manifest.label_index_for(split)
    if entry is None:
        return None
    where = storage.join(manifest.uri, entry.path)
    try:
        payload = storage.read_bytes(where, options)
    except FileNotFoundError:
        raise DataError(f"{where}: label index listed in the manifest is missing") from None
    table = read_verified(payload, where, entry)
    if not table.schema.equals(LABEL_INDEX_SCHEMA) or table.num_rows != entry.rows:
        raise DataError(f"{where}: label index has schema {table.schema.names} and "
                        f"{table.num_rows} rows, expected (key uint64, label float32) and "
                        f"{entry.rows}")
    keys = table.column("key").to_numpy()
    labels = table.column("label").to_numpy()
    return keys, labels


def _live_generations(uri: str, options: StorageOptions | None) -> set[str] | None:
    """The folders the manifest now at ``uri`` points at: set() if absent, None if unreadable.

    Parsed leniently (shard paths only): the question is only which generation is live.
    """
    manifest_uri = storage.join(uri, MANIFEST)
    try:
        if not storage.exists(manifest_uri, options):
            return set()
        data = storage.read_json(manifest_uri, options)
        return {str(s["path"]).split("/", 1)[0] for s in data["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("cannot read back %s: %s", manifest_uri, err)
        return None


def _publish(manifest: Manifest, generation: str, options: StorageOptions | None) -> bool:
    """Write the manifest and read it back; True once the new generation is confirmed live.

    A failed write may still have landed (the PUT reached the server, the answer was lost), so
    it is settled by reading back: the new manifest live counts as success; the old one (or
    none) live means the write did not land, and only the new shards go; an unreadable
    manifest leaves every shard in place and raises. False (delete nothing) when the write
    succeeded but could not be confirmed.
    """
    uri = manifest.uri
    manifest_uri = storage.join(uri, MANIFEST)
    generation_uri = storage.join(uri, generation)
    try:
        storage.write_json(manifest_uri, manifest.to_json(), options)
    except BaseException as err:
        live = _live_generations(uri, options)
        if live == {generation}:
            log.warning("writing %s reported %s, yet it is live: published", manifest_uri, err)
            return True
        if live is None:
            raise StorageError(
                f"{manifest_uri}: the manifest write failed ({type(err).__name__}) and the "
                f"manifest cannot be read back, so it is unknown whether {generation} or the "
                "previous shards are live; nothing was deleted. Check the store, then write "
                "again"
            ) from None
        _remove_quietly(generation_uri, options, "manifest not published")
        raise
    live = _live_generations(uri, options)
    if live == {generation}:
        return True
    if live is None:
        log.warning("%s written but not confirmed: previous shards kept", manifest_uri)
        return False
    raise StorageError(
        f"{manifest_uri}: just written, yet it points at {sorted(live)}, not {generation} "
        "(a concurrent write?); nothing was deleted"
    )


def row_order(n: int, seed: int, split: str) -> np.ndarray:
    """The stored order of a split's ``n`` source rows: a permutation fixed by (seed, split)."""
    rng = np.random.default_rng((seed, SPLITS.index(split)))
    return rng.permutation(n)


def upgrade_command(uri: str, options: StorageOptions | None = None) -> str:
    """The exact command that rewrites the store at ``uri`` in the current format."""
    endpoint = f" --s3-endpoint {options.endpoint}" if options and options.endpoint else ""
    return f"sslmm data upgrade --data {uri}{endpoint}"


def _check_version(manifest: Manifest, manifest_uri: str, options: StorageOptions | None) -> None:
    if manifest.format_version == FORMAT_VERSION:
        return
    if manifest.format_version == 1:
        raise DataError(
            f"{manifest_uri}: storage format 1 (list columns), this sslmm-ray reads format "
            f"{FORMAT_VERSION}; rewrite it in place with `{upgrade_command(manifest.uri, options)}`"
        )
    raise DataError(
        f"{manifest_uri}: format version {manifest.format_version}, "
        f"this sslmm-ray reads {FORMAT_VERSION} (written by another version of sslmm-ray?)"
    )


#: Shards whose size, footer and schema ``open_dataset`` checks at once.
OPEN_CHECK_THREADS = 8


def open_dataset(
    uri: str, options: StorageOptions | None = None, *, verify: bool = False
) -> Manifest:
    """Read and check the manifest and every shard's size, footer, rows and schema.

    ``verify`` also reads every shard and compares its SHA-256 with the manifest's.
    """
    storage.check_reachable(uri, options)
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri, options):
        raise DataError(
            f"{manifest_uri} not found: no dataset at {uri} "
            "(never written, or a write did not finish; run `sslmm data synth` or "
            "`sslmm data import-mmsa`)"
        )
    manifest = Manifest.from_json(uri, storage.read_json(manifest_uri, options))
    _check_version(manifest, manifest_uri, options)
    missing = [m for m in MODALITIES if m not in manifest.modalities]
    if missing:
        raise DataError(f"{manifest_uri}: modalities {missing} missing from the manifest")
    expected = arrow_schema(manifest.modalities)
    fs, _ = storage.resolve(uri, options)

    def check(shard: ShardInfo) -> None:
        _check_shard(fs, storage.join(uri, shard.path), shard, expected, options, verify)

    # Two round trips per shard (stat, footer): latency-bound on object storage, so in
    # parallel; the error raised is the first shard's in manifest order, as a serial check's.
    threads = max(1, min(OPEN_CHECK_THREADS, len(manifest.shards)))
    with ThreadPoolExecutor(threads, thread_name_prefix="sslmm-open") as pool:
        for _ in pool.map(check, manifest.shards):
            pass
    for entry in manifest.label_index:
        _check_present(fs, storage.join(uri, entry.path), entry, options, verify, "label index")
    return manifest


def _check_shard(
    fs: pafs.FileSystem,
    shard_uri: str,
    shard: ShardInfo,
    expected: pa.Schema,
    options: StorageOptions | None,
    verify: bool,
) -> None:
    _check_present(fs, shard_uri, shard, options, verify, "shard")
    _, path = storage.resolve(shard_uri, options)
    try:
        meta = pq.read_metadata(path, filesystem=fs)
        schema = meta.schema.to_arrow_schema()
    except Exception as err:  # pyarrow raises several types for a broken footer
        raise DataError(f"{shard_uri}: not a readable Parquet file ({err})") from None
    if meta.num_rows != shard.rows:
        raise DataError(
            f"{shard_uri}: shard has {meta.num_rows} rows, the manifest says {shard.rows}"
        )
    for f in expected:
        if f.name not in schema.names:
            raise DataError(f"{shard_uri}: column '{f.name}' missing")
        got = schema.field(f.name).type
        if not got.equals(f.type):
            raise DataError(
                f"{shard_uri}: column '{f.name}' has type {got}, expected {f.type} "
                "(wrong dimension or length?)"
            )


def _check_present(
    fs: pafs.FileSystem,
    file_uri: str,
    entry: ShardInfo,
    options: StorageOptions | None,
    verify: bool,
    what: str,
) -> None:
    """The file exists with the manifest's size (``verify``: and its SHA-256)."""
    _, path = storage.resolve(file_uri, options)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise DataError(f"{file_uri}: cannot stat {what} ({err})") from None
    if info.type != pafs.FileType.File:
        raise DataError(f"{file_uri}: {what} listed in the manifest is missing")
    if info.size != entry.bytes:
        raise DataError(
            f"{file_uri}: {what} is {info.size} bytes, the manifest says {entry.bytes} "
            "(truncated or replaced)"
        )
    if verify:
        digest = hashlib.sha256(storage.read_bytes(file_uri, options)).hexdigest()
        if digest != entry.sha256:
            raise DataError(f"{file_uri}: checksum mismatch (corrupt {what})")


def decode_table(
    table: pa.Table,
    manifest_modalities: dict[str, ModalitySpec],
    norm: Normalizer | None = None,
    *,
    where: str = "",
) -> dict[str, Any]:
    """Parquet rows -> numpy arrays of the RawDataset layout, normalised when ``norm`` is given.

    Zero-copy for the features (and lengths) whenever a column is one chunk, which is how a
    Parquet row group or a Ray Data batch arrives: the array is a read-only ``np.frombuffer``
    view of the column's data buffer. Several chunks are concatenated once. Every decode path
    goes through here, so every path normalises the same way. ``where`` (a shard) prefixes
    errors.
    """
    check_feature_columns(table.schema, manifest_modalities, where)
    prefix = f"{where}: " if where else ""
    n = table.num_rows
    out: dict[str, Any] = {
        "id": table.column("id").to_numpy(),  # object array of str
        "label": _numeric(table.column("label"), np.float32),
    }
    for m in MODALITIES:
        spec = manifest_modalities[m]
        feats = _features(table.column(m), n, spec, f"{prefix}column '{m}'")
        out[m] = feats.reshape(n, spec.length, spec.dim)
        out[f"{m}_len"] = _numeric(table.column(f"{m}_len"), np.int64)
    return normalize_features(out, norm)


def check_feature_columns(
    schema: pa.Schema, modalities: dict[str, ModalitySpec], where: str = ""
) -> None:
    """Each feature column must hold ``T*d*4``-byte blobs: one line naming column and shard."""
    prefix = f"{where}: " if where else ""
    for m in MODALITIES:
        spec = modalities[m]
        if m not in schema.names:
            raise DataError(f"{prefix}column '{m}' missing")
        got = schema.field(m).type
        if not got.equals(pa.binary(spec.nbytes)):
            raise DataError(
                f"{prefix}column '{m}' holds {got} per row, expected "
                f"fixed_size_binary[{spec.nbytes}] ({spec.length}x{spec.dim} float32; "
                "a wrong-length blob or a format 1 store)"
            )


def _features(col: pa.ChunkedArray, n: int, spec: ModalitySpec, what: str) -> np.ndarray:
    """``(n, T*d)`` float32 viewing the column's data buffer, from the chunk's offset on
    (a sliced table shares its parent's buffer)."""
    chunk = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if n == 0:
        return np.zeros((0, spec.length * spec.dim), FEATURE_DTYPE)
    if chunk.null_count:
        raise DataError(f"{what} has {chunk.null_count} null rows")
    try:
        flat = np.frombuffer(
            chunk.buffers()[1],
            FEATURE_DTYPE,
            count=n * spec.length * spec.dim,
            offset=chunk.offset * spec.nbytes,
        )
    except (TypeError, ValueError) as err:  # a data buffer shorter than its rows
        raise DataError(f"{what}: cannot view the features ({err})") from None
    flat.flags.writeable = False  # Arrow memory, shared with the table: never changed in place
    return flat.reshape(n, -1)


def decode_features_v1(table: pa.Table, modalities: dict[str, ModalitySpec]) -> dict[str, Any]:
    """A format 1 shard (fixed_size_list<float32> features) -> arrays; for the upgrade only."""
    n = table.num_rows
    out: dict[str, Any] = {
        "id": np.asarray(table.column("id").to_pylist(), dtype=str),
        "label": _numeric(table.column("label"), np.float32),
    }
    for m in MODALITIES:
        spec = modalities[m]
        col = table.column(m)
        chunk = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        flat = chunk.flatten().to_numpy(zero_copy_only=False)
        if flat.size != n * spec.length * spec.dim:
            raise DataError(f"column '{m}' holds {flat.size // max(n, 1)} values per row, "
                            f"expected {spec.length}x{spec.dim}")
        out[m] = flat.reshape(n, spec.length, spec.dim).astype(np.float32)
        out[f"{m}_len"] = _numeric(table.column(f"{m}_len"), np.int32)
    return out


def _numeric(col: pa.ChunkedArray, dtype: type[np.generic]) -> np.ndarray:
    return col.to_numpy().astype(dtype, copy=False)


def read_split(
    manifest: Manifest,
    split: str,
    options: StorageOptions | None = None,
    norm: Normalizer | None = None,
) -> dict[str, Any]:
    """A whole split in memory (evaluation, inspection, small data); raw unless ``norm``."""
    tables = list(iter_split_tables(manifest, split, options))
    if not tables:
        raise DataError(f"{manifest.uri}: split '{split}' has no rows")
    return decode_table(pa.concat_tables(tables), manifest.modalities, norm)


def upgrade_dataset(uri: str, options: StorageOptions | None = None, *, seed: int = 0) -> Manifest:
    """Rewrite a format 1 store at ``uri`` as the current format, in place; a no-op if current.

    Why through :func:`write_dataset`: the one writer validates, permutes, checksums and
    publishes, and deletes the format 1 shards only once the new manifest is live (a failed
    upgrade leaves the old store as it was). Shard size and codec are kept. Holds a split in
    memory, as an import does.
    """
    storage.check_reachable(uri, options)
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri, options):
        raise DataError(f"{manifest_uri} not found: no dataset at {uri}")
    old = Manifest.from_json(uri, storage.read_json(manifest_uri, options))
    if old.format_version == FORMAT_VERSION:
        return open_dataset(uri, options)
    if old.format_version != 1:
        _check_version(old, manifest_uri, options)
    splits: dict[str, Any] = {}
    compression = DEFAULT_COMPRESSION
    for split in SPLITS:
        parts = []
        for shard in (s for s in old.shards if s.split == split):
            where = storage.join(uri, shard.path)
            payload = storage.read_bytes(where, options)
            table = read_verified(payload, where, shard)
            compression = _codec(payload)
            try:
                parts.append(decode_features_v1(table, old.modalities))
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
        if parts:
            splits[split] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    raw = RawDataset(old.name, old.label_range, splits, dict(old.stats))
    shard_rows = max((s.rows for s in old.shards), default=256)
    return write_dataset(
        raw, uri, options, shard_rows=shard_rows, compression=compression, seed=seed
    )


def _codec(payload: bytes) -> str:
    """The Parquet codec of a shard's ``label`` column, as :data:`COMPRESSIONS` names it."""
    group = pq.read_metadata(pa.BufferReader(payload)).row_group(0)
    for i in range(group.num_columns):
        if group.column(i).path_in_schema == "label":
            codec = group.column(i).compression.lower()
            codec = {"uncompressed": "none", "lz4_raw": "lz4"}.get(codec, codec)
            return codec if codec in COMPRESSIONS else DEFAULT_COMPRESSION
    return DEFAULT_COMPRESSION


def read_verified(
    payload: bytes, where: str, shard: ShardInfo, columns: Sequence[str] | None = None
) -> pa.Table:
    """A shard's table from its bytes, after checking them against the manifest's checksum.

    Why: size, footer and schema checks pass a shard with a flipped byte in a feature page;
    only the checksum sees it, and decoding it would train on garbage without a word.
    XXH3 when the manifest has it (fast), otherwise SHA-256.
    """
    if shard.xxh3:
        kind, digest, expected = "xxh3", xxhash.xxh3_64_hexdigest(payload), shard.xxh3
    else:
        kind, digest, expected = "sha256", hashlib.sha256(payload).hexdigest(), shard.sha256
    if digest != expected:
        raise DataError(
            f"{where}: checksum mismatch (corrupt shard: {kind} {digest[:12]}..., "
            f"the manifest says {expected[:12]}...)"
        )
    try:
        return pq.read_table(pa.BufferReader(payload), columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{where}: cannot read shard ({err})") from None


def iter_split_tables(
    manifest: Manifest,
    split: str,
    options: StorageOptions | None = None,
    columns: Sequence[str] | None = None,
    *,
    verify: bool = True,
) -> Iterator[pa.Table]:
    """One Arrow table per shard of ``split``, in manifest order.

    ``verify``: read whole shards and check their checksums (:func:`read_verified`); without
    it only ``columns`` are read, unchecked (statistics, label keys).
    """
    fs, _ = storage.resolve(manifest.uri, options)
    for shard in manifest.shards:
        if shard.split != split:
            continue
        shard_uri = storage.join(manifest.uri, shard.path)
        _, path = storage.resolve(shard_uri, options)
        try:
            if verify:
                table = read_verified(
                    storage.read_bytes(shard_uri, options), shard_uri, shard, columns
                )
                if columns is None:
                    check_feature_columns(table.schema, manifest.modalities, shard_uri)
                yield table
                continue
            table = pq.read_table(path, filesystem=fs, columns=columns)
            if columns is None:
                check_feature_columns(table.schema, manifest.modalities, shard_uri)
        except FileNotFoundError:
            raise DataError(f"{shard_uri}: shard listed in the manifest is missing") from None
        except (DataError, StorageError):
            raise
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{shard_uri}: cannot read shard ({err})") from None
        yield table


def describe(manifest: Manifest, options: StorageOptions | None = None) -> dict[str, Any]:
    """Counts, dims, valid lengths and label statistics per split (reads small columns only)."""
    columns = ["label"] + [f"{m}_len" for m in MODALITIES]
    splits: dict[str, Any] = {}
    for split in manifest.counts:
        tables = list(iter_split_tables(manifest, split, options, columns, verify=False))
        if not tables:
            continue
        table = pa.concat_tables(tables)
        labels = table.column("label").to_numpy()
        lengths = {}
        for m in MODALITIES:
            v = table.column(f"{m}_len").to_numpy()
            lengths[m] = {"min": int(v.min()), "mean": float(v.mean()), "max": int(v.max())}
        splits[split] = {
            "count": table.num_rows,
            "label": {
                "mean": float(labels.mean()),
                "std": float(labels.std()),
                "min": float(labels.min()),
                "max": float(labels.max()),
                "positive": int((labels > 0).sum()),
                "negative": int((labels < 0).sum()),
                "zero": int((labels == 0).sum()),
            },
            "lengths": lengths,
        }
    return {
        "uri": manifest.uri,
        "name": manifest.name,
        "family": manifest.family,
        "format_version": manifest.format_version,
        "created": manifest.created,
        "label_range": list(manifest.label_range),
        "modalities": {m: asdict(s) for m, s in manifest.modalities.items()},
        "counts": dict(manifest.counts),
        "shards": len(manifest.shards),
        "bytes": sum(s.bytes for s in manifest.shards),
        "stats": manifest.stats,
        "normalization": _normalization_summary(manifest.normalization),
        "splits": splits,
    }


def _normalization_summary(stats: Statistics) -> dict[str, Any] | None:
    """Per modality the range of the train-split stds (None: no statistics stored)."""
    if not stats:
        return None
    return {
        m: {"features": len(s["std"]), "std_min": min(s["std"]), "std_max": max(s["std"])}
        for m, s in stats.items()
    }
