"""The canonical store: sharded Parquet plus a JSON manifest, on any storage URI.

Layout under the dataset URI::

    manifest.json                      published last: its presence means "complete"
    <generation>/train-00000.parquet   one row per sample
    <generation>/valid-00000.parquet
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
video does not give shards of one speaker. The manifest also carries the training split's
per-feature mean and std (:mod:`sslmm_ray.data.normalize`), which decoding applies when asked
to. Format 1 stores (fixed-size list columns) are refused with the command that upgrades them
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
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import xxhash

from sslmm_ray import locks, storage
from sslmm_ray.config import MODALITIES
from sslmm_ray.data.normalize import (
    Normalizer,
    Statistics,
    check_statistics,
    normalize_features,
    train_statistics,
)
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


def _encode_shard(table: pa.Table, compression: str) -> bytes:
    """One Parquet file, one row group. Features skip dictionaries and statistics: float
    features gain nothing from either, and both cost time at write and read."""
    sink = pa.BufferOutputStream()
    small = ["id", "split", "label", *(f"{m}_len" for m in MODALITIES)]
    pq.write_table(
        table,
        sink,
        compression=compression,
        use_dictionary=["split"],
        write_statistics=small,
        row_group_size=max(1, table.num_rows),
    )
    return sink.getvalue().to_pybytes()


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
    """Write ``raw`` as sharded Parquet, then publish the manifest (last).

    Each split's rows are permuted with ``seed`` (:func:`row_order`, recorded in the manifest)
    before they are cut into shards: sources list rows by video, and shards of one speaker
    would make shard-level shuffling and streaming batches far from i.i.d.

    ``raw`` is validated first (``deep_check``: every value finite, zero padding), so bad input
    raises :class:`DataError` before any byte is written. A failure while writing removes this
    write's shards and leaves any previous dataset at ``uri`` untouched; a successful overwrite
    deletes the previous generation's shards after the new manifest is published.
    """
    if shard_rows < 1:
        raise UserError(f"shard_rows must be >= 1, got {shard_rows}")
    if compression.lower() not in COMPRESSIONS:
        raise UserError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    validate_raw(raw, deep=deep_check)
    storage.check_reachable(uri, options)
    normalization = train_statistics(raw.splits["train"]) if "train" in raw.splits else {}
    previous = _previous_manifest(uri, options)
    modalities = {
        m: ModalitySpec(dim=d, length=t)
        for (m, d), t in zip(raw.dims().items(), raw.max_lengths().values(), strict=True)
    }
    schema = arrow_schema(modalities)
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    generation = f"{GENERATION_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"
    generation_uri = storage.join(uri, generation)
    try:
        shards, counts = _write_shards(
            raw, uri, generation, schema, shard_rows, compression.lower(), options, seed
        )
        manifest = Manifest(
            uri=uri,
            name=raw.name,
            label_range=(float(raw.label_range[0]), float(raw.label_range[1])),
            modalities=modalities,
            counts=counts,
            shards=shards,
            schema=schema.to_string(show_schema_metadata=False),
            stats=dict(raw.stats),
            normalization=normalization,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            seed=seed,
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


def _write_shards(
    raw: RawDataset,
    uri: str,
    generation: str,
    schema: pa.Schema,
    shard_rows: int,
    compression: str,
    options: StorageOptions | None,
    seed: int,
) -> tuple[list[ShardInfo], dict[str, int]]:
    shards: list[ShardInfo] = []
    counts: dict[str, int] = {}
    for split in SPLITS:
        if split not in raw.splits:
            continue
        arrays = raw.splits[split]
        n = len(arrays["id"])
        counts[split] = n
        order = row_order(n, seed, split)
        for i, start in enumerate(range(0, n, shard_rows)):
            rows = order[start : start + shard_rows]  # one shard copied at a time, not a split
            part = {k: v[rows] for k, v in arrays.items()}
            table = _split_table(split, part, schema)
            payload = _encode_shard(table, compression)
            rel = f"{generation}/{split}-{i:05d}.parquet"
            storage.write_bytes(storage.join(uri, rel), payload, options)
            shards.append(
                ShardInfo(
                    path=rel,
                    split=split,
                    rows=table.num_rows,
                    bytes=len(payload),
                    sha256=hashlib.sha256(payload).hexdigest(),
                    xxh3=xxhash.xxh3_64_hexdigest(payload),
                )
            )
    return shards, counts


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
    return manifest


def _check_shard(
    fs: pafs.FileSystem,
    shard_uri: str,
    shard: ShardInfo,
    expected: pa.Schema,
    options: StorageOptions | None,
    verify: bool,
) -> None:
    _, path = storage.resolve(shard_uri, options)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise DataError(f"{shard_uri}: cannot stat shard ({err})") from None
    if info.type != pafs.FileType.File:
        raise DataError(f"{shard_uri}: shard listed in the manifest is missing")
    if info.size != shard.bytes:
        raise DataError(
            f"{shard_uri}: shard is {info.size} bytes, the manifest says {shard.bytes} "
            "(truncated or replaced)"
        )
    if verify:
        digest = hashlib.sha256(storage.read_bytes(shard_uri, options)).hexdigest()
        if digest != shard.sha256:
            raise DataError(f"{shard_uri}: checksum mismatch (corrupt shard)")
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
