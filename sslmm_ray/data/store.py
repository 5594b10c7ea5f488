"""The canonical store: sharded Parquet plus a JSON manifest, on any storage URI.

Layout under the dataset URI::

    manifest.json                      published last: its presence means "complete"
    <generation>/train-00000.parquet   one row per sample
    <generation>/valid-00000.parquet
    ...

Each write goes to a fresh generation folder and the manifest is written only after every shard
is closed and checksummed, so a reader never sees a half-written dataset: either the old manifest
(pointing at old shards) or the new one. Rows hold ``id``, ``split``, ``label`` and per modality
the flattened ``(T, d)`` features as a fixed-size list plus the valid length ``<m>_len``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sslmm_ray import storage
from sslmm_ray.config import MODALITIES
from sslmm_ray.data.sources import DataError, RawDataset
from sslmm_ray.storage import StorageOptions

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "valid", "test")


@dataclass(frozen=True)
class ModalitySpec:
    dim: int
    length: int


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset URI
    split: str
    rows: int
    bytes: int
    sha256: str


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
    format_version: int = FORMAT_VERSION
    created: str = ""

    @property
    def family(self) -> str:
        """The metric family: mosi, mosei or sims."""
        for fam in ("mosei", "mosi", "sims"):
            if fam in self.name:
                return fam
        return "mosi"

    @property
    def dims(self) -> dict[str, int]:
        return {m: s.dim for m, s in self.modalities.items()}

    @property
    def lengths(self) -> dict[str, int]:
        return {m: s.length for m, s in self.modalities.items()}

    def shard_uris(self, split: str) -> list[str]:
        return [storage.join(self.uri, s.path) for s in self.shards if s.split == split]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("uri")
        return out

    @classmethod
    def from_json(cls, uri: str, data: dict[str, Any]) -> Manifest:
        try:
            return cls(
                uri=uri,
                name=data["name"],
                label_range=tuple(data["label_range"]),
                modalities={m: ModalitySpec(**s) for m, s in data["modalities"].items()},
                counts=dict(data["counts"]),
                shards=[ShardInfo(**s) for s in data["shards"]],
                schema=data["schema"],
                stats=data.get("stats", {}),
                format_version=int(data.get("format_version", 0)),
                created=data.get("created", ""),
            )
        except (KeyError, TypeError) as err:
            raise DataError(f"{storage.join(uri, MANIFEST)}: malformed manifest ({err})") from None


def arrow_schema(modalities: dict[str, ModalitySpec]) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.float32(), nullable=False),
    ]
    for m in MODALITIES:
        spec = modalities[m]
        fields.append(pa.field(m, pa.list_(pa.float32(), spec.dim * spec.length), nullable=False))
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
        feats = np.ascontiguousarray(arrays[m], dtype=np.float32).reshape(n, -1)
        values = pa.array(feats.reshape(-1))
        columns[m] = pa.FixedSizeListArray.from_arrays(values, feats.shape[1])
        columns[f"{m}_len"] = pa.array(np.asarray(arrays[f"{m}_len"], np.int32))
    return pa.Table.from_pydict(columns, schema=schema)


def write_dataset(
    raw: RawDataset,
    uri: str,
    options: StorageOptions | None = None,
    *,
    shard_rows: int = 256,
) -> Manifest:
    """Write ``raw`` as sharded Parquet, then publish the manifest (last)."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    storage.check_reachable(uri, options)
    any_split = next(iter(raw.splits.values()))
    modalities = {
        m: ModalitySpec(dim=int(any_split[m].shape[2]), length=int(any_split[m].shape[1]))
        for m in MODALITIES
    }
    schema = arrow_schema(modalities)
    generation = f"shards-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    shards: list[ShardInfo] = []
    counts: dict[str, int] = {}
    for split in SPLITS:
        if split not in raw.splits:
            continue
        arrays = raw.splits[split]
        n = len(arrays["id"])
        counts[split] = n
        for i, start in enumerate(range(0, n, shard_rows)):
            part = {k: v[start : start + shard_rows] for k, v in arrays.items()}
            table = _split_table(split, part, schema)
            rel = f"{generation}/{split}-{i:05d}.parquet"
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            payload = sink.getvalue().to_pybytes()
            storage.write_bytes(storage.join(uri, rel), payload, options)
            shards.append(
                ShardInfo(
                    path=rel,
                    split=split,
                    rows=table.num_rows,
                    bytes=len(payload),
                    sha256=hashlib.sha256(payload).hexdigest(),
                )
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
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    storage.write_json(storage.join(uri, MANIFEST), manifest.to_json(), options)
    return manifest


def open_dataset(
    uri: str, options: StorageOptions | None = None, *, verify: bool = False
) -> Manifest:
    """Read and check the manifest, each shard's size and schema (``verify``: checksums too)."""
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri, options):
        raise DataError(
            f"{manifest_uri} not found: no dataset at {uri} "
            "(never written, or a write did not finish; run `sslmm data synth` or "
            "`sslmm data import-mmsa`)"
        )
    manifest = Manifest.from_json(uri, storage.read_json(manifest_uri, options))
    if manifest.format_version != FORMAT_VERSION:
        raise DataError(
            f"{manifest_uri}: format version {manifest.format_version}, "
            f"this sslmm-ray reads {FORMAT_VERSION}"
        )
    missing = [m for m in MODALITIES if m not in manifest.modalities]
    if missing:
        raise DataError(f"{manifest_uri}: modalities {missing} missing from the manifest")
    expected = arrow_schema(manifest.modalities)
    fs, _ = storage.resolve(uri, options)
    for shard in manifest.shards:
        shard_uri = storage.join(uri, shard.path)
        _, path = storage.resolve(shard_uri, options)
        info = fs.get_file_info(path)
        if info.type.name != "File":
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
            schema = pq.read_schema(path, filesystem=fs)
        except Exception as err:  # pyarrow raises several types for a broken footer
            raise DataError(f"{shard_uri}: not a readable Parquet file ({err})") from None
        for f in expected:
            if f.name not in schema.names:
                raise DataError(f"{shard_uri}: column '{f.name}' missing")
            if not schema.field(f.name).type.equals(f.type):
                raise DataError(
                    f"{shard_uri}: column '{f.name}' has type {schema.field(f.name).type}, "
                    f"expected {f.type} (wrong dimension?)"
                )
    return manifest


def decode_table(table: pa.Table, manifest_modalities: dict[str, ModalitySpec]) -> dict[str, Any]:
    """Parquet rows -> numpy arrays of the RawDataset layout (zero-copy where possible)."""
    n = table.num_rows
    out: dict[str, Any] = {
        "id": np.asarray(table.column("id").to_pylist(), dtype=object),
        "label": table.column("label").to_numpy().astype(np.float32, copy=False),
    }
    for m in MODALITIES:
        spec = manifest_modalities[m]
        col = table.column(m).combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False)
        out[m] = flat.reshape(n, spec.length, spec.dim)
        out[f"{m}_len"] = table.column(f"{m}_len").to_numpy().astype(np.int64, copy=False)
    return out


def read_split(
    manifest: Manifest, split: str, options: StorageOptions | None = None
) -> dict[str, Any]:
    """A whole split in memory (evaluation, inspection, small data)."""
    tables = list(iter_split_tables(manifest, split, options))
    if not tables:
        raise DataError(f"{manifest.uri}: split '{split}' has no rows")
    return decode_table(pa.concat_tables(tables), manifest.modalities)


def iter_split_tables(
    manifest: Manifest, split: str, options: StorageOptions | None = None, columns=None
) -> Iterator[pa.Table]:
    fs, _ = storage.resolve(manifest.uri, options)
    for shard_uri in manifest.shard_uris(split):
        _, path = storage.resolve(shard_uri, options)
        yield pq.read_table(path, filesystem=fs, columns=columns)


def describe(manifest: Manifest, options: StorageOptions | None = None) -> dict[str, Any]:
    """Counts, dims, valid lengths and label statistics per split (reads small columns only)."""
    columns = ["label"] + [f"{m}_len" for m in MODALITIES]
    splits: dict[str, Any] = {}
    for split in manifest.counts:
        table = pa.concat_tables(list(iter_split_tables(manifest, split, options, columns)))
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
        "label_range": list(manifest.label_range),
        "modalities": {m: asdict(s) for m, s in manifest.modalities.items()},
        "shards": len(manifest.shards),
        "bytes": sum(s.bytes for s in manifest.shards),
        "stats": manifest.stats,
        "splits": splits,
    }
