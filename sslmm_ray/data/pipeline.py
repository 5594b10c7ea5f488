"""Ray Data streaming: Parquet shards -> decoded tensors with the protocols applied.

``read_parquet`` over one split's shards (explicit filesystem), a file-order shuffle that is
reseeded every execution (so every epoch sees a new order), and ``map_batches`` that decodes
rows, normalises them with the manifest's train statistics (:mod:`sslmm_ray.data.normalize`)
and applies :mod:`sslmm_ray.data.protocols`. Training adds a local shuffle buffer in
``iter_torch_batches``; there is no global shuffle barrier in the hot path.

Why the V1 Parquet reader and one block per file: Ray 2.60's default (DataSourceV2) re-lists
the files at every execution and reads their footers on a pool of 32 freshly started actors
(``FooterFileIndexer``), then bin-packs files into 128 MiB read units. For a list of shards we
already know (the manifest) that costs seconds per epoch, more than reading the data, and
packs a small split into one task with no streaming. V1 plans once and reads each shard in
its own task; ``override_num_blocks`` stops it from cutting files into hundreds of tiny blocks.

Integrity (``data.verify_checksums``, off by default: it costs 23-52% of streaming throughput,
docs/DATA.md): each read task reads its shard's bytes (``read_binary_files``), checks them
against the manifest's XXH3 (or SHA-256) and parses the Parquet from memory in the same task
(:func:`sslmm_ray.data.store.read_verified`), so a corrupt shard fails the epoch with one line
naming it instead of feeding garbage to the model. Off, shards are read by ``read_parquet``
unchecked (docs/DATA.md, "Integrity", has the measured cost).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import DataContext, FileShuffleConfig, RandomSeedConfig

from sslmm_ray import storage
from sslmm_ray.config import ExperimentConfig, FinetuneConfig, MissingConfig
from sslmm_ray.data import graph_labels, protocols
from sslmm_ray.data.normalize import Normalizer, normalizer_for
from sslmm_ray.data.sources import DataError
from sslmm_ray.data.store import (
    Manifest,
    ModalitySpec,
    ShardInfo,
    check_feature_columns,
    decode_table,
    iter_split_tables,
    read_label_index,
    read_verified,
)
from sslmm_ray.storage import StorageOptions

#: Rows per decode call: None = one call per block, i.e. per shard. That lets Ray fuse the read
#: and the decode into one task (a fixed batch size would add an operator and a trip through
#: the object store); the store's ``shard_rows`` sets the granularity (a MOSI row is ~200 KB).
DECODE_BATCH_ROWS: int | None = None
#: Validation labels are drawn with ``seed + VALID_SEED_OFFSET``: independent of the training
#: draw, still a pure function of the run's seed.
VALID_SEED_OFFSET = 7919


class DecodeArgs:
    """What a decode task needs, passed as one ``fn_kwargs`` value with a short ``str()``.

    Why not plain keyword arguments: Ray Data (2.60) turns every operator argument into text
    at each execution (``create_topology_metadata`` -> ``sanitize_for_struct``), and numpy
    formats a 768-value normalisation mean digit by digit: 0.10-0.13 s of driver CPU per epoch
    for the MOSI statistics, measured with cProfile, on a path that streams a 642-row epoch in
    ~0.6 s. This object is neither a dataclass nor a mapping, so it is shown as its repr.
    """

    __slots__ = ("checksums", "modalities", "norm", "spec")

    def __init__(
        self,
        modalities: dict[str, ModalitySpec],
        spec: protocols.ProtocolSpec | None,
        norm: Normalizer | None = None,
        checksums: dict[str, tuple[ShardInfo, str]] | None = None,
    ) -> None:
        self.modalities = modalities
        self.spec = spec
        self.norm = norm
        self.checksums = checksums or {}

    def __repr__(self) -> str:
        protocol = (
            "none" if self.spec is None
            else f"missing_rate={self.spec.missing_rate}, protocol={self.spec.protocol}"
        )
        return (
            f"DecodeArgs({protocol}, normalize={self.norm is not None}, "
            f"verify={bool(self.checksums)})"
        )


def decode_batch(table: pa.Table, args: DecodeArgs) -> dict[str, np.ndarray]:
    """One Parquet table (a shard) -> the model batch: decode, normalise, apply protocols.

    Without a protocol (``spec`` None) the decoded rows themselves: what a cache keeps."""
    decoded = decode_table(table, args.modalities, args.norm)
    if args.spec is None:
        return decoded
    # Normalised features are fresh arrays (unnormalised ones are read-only Arrow views):
    # the protocols may zero hidden frames in them instead of copying.
    return protocols.apply(decoded, args.spec, inplace=args.norm is not None)


def _protocols(batch: dict[str, np.ndarray], args: DecodeArgs) -> dict[str, Any]:
    """A cached block's rows -> the model batch (the cache's arrays are read-only: copies)."""
    assert args.spec is not None
    return protocols.apply(batch, args.spec)


def _verify_decode(files: pa.Table, args: DecodeArgs) -> dict[str, np.ndarray]:
    """Whole shard files (``bytes``, ``path``) -> checked, parsed, decoded model batches."""
    tables = []
    for payload, path in zip(
        files.column("bytes").to_pylist(), files.column("path").to_pylist(), strict=True
    ):
        shard, where = args.checksums[path]
        table = read_verified(payload, where, shard)
        check_feature_columns(table.schema, args.modalities, where)  # an error names the shard
        tables.append(table)
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    return decode_batch(table, args)


# How a DataError raised in a Ray task appears in the driver's wrapped error text.
_TASK_DATA_ERROR = re.compile(r"^sslmm_ray\.data\.sources\.DataError: (.+)$", re.MULTILINE)


@contextmanager
def task_data_errors() -> Iterator[None]:
    """Re-raise a DataError from a Ray task (a corrupt shard) as the one-line DataError it is.

    Ray wraps task failures in its own errors whose text is a traceback; the CLI would print
    all of it. The message is recovered from that text (Ray keeps no reference to the cause).
    """
    try:
        yield
    except Exception as err:
        found = _TASK_DATA_ERROR.findall(str(err))
        if not found or isinstance(err, DataError):
            raise
        raise DataError(found[-1]) from None


@contextmanager
def _parquet_v1() -> Iterator[None]:
    """Plan a ``read_parquet`` with the V1 datasource (see the module docstring)."""
    ctx = DataContext.get_current()
    saved = getattr(ctx, "use_datasource_v2", None)
    if saved is None:  # a Ray without the V2 switch: nothing to do
        yield
        return
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


def split_dataset(
    manifest: Manifest,
    split: str,
    spec: protocols.ProtocolSpec | None,
    options: StorageOptions | None = None,
    *,
    shuffle_seed: int | None = None,
    normalize: bool = True,
    verify: bool = False,
) -> ray.data.Dataset:
    """One split as a Ray Dataset of model batches (docs/CONTRACTS.md).

    ``spec`` None: decoded rows before any protocol (what a :class:`SplitCache` keeps).

    ``normalize``: standardise features with the manifest's train statistics, as the model
    being fed was trained (``data.normalize``, or the checkpoint's ``normalize``).
    ``verify``: check every shard's checksum in its read task (``data.verify_checksums``).
    """
    uris = manifest.shard_uris(split)
    if not uris:
        raise DataError(f"{manifest.uri}: split '{split}' has no shards")
    norm = normalizer_for(manifest, normalize)  # fails here, on the driver, not in a task
    fs, _ = storage.resolve(manifest.uri, options)
    paths = [storage.resolve(u, options)[1] for u in uris]
    shuffle = None
    if shuffle_seed is not None:
        shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    if verify:
        by_path = {s.path: s for s in manifest.shards}
        checksums = {
            path: (by_path[rel], uri)
            for path, uri, rel in zip(
                paths, uris, (s.path for s in manifest.shards if s.split == split), strict=True
            )
        }
        files = ray.data.read_binary_files(
            paths,
            filesystem=fs,
            include_paths=True,
            shuffle=shuffle,
            override_num_blocks=len(paths),
        )
        return files.map_batches(
            _verify_decode,
            batch_format="pyarrow",
            batch_size=DECODE_BATCH_ROWS,
            fn_kwargs={"args": DecodeArgs(manifest.modalities, spec, norm, checksums)},
        )
    with _parquet_v1():
        ds = ray.data.read_parquet(
            paths, filesystem=fs, shuffle=shuffle, override_num_blocks=len(paths)
        )
    return ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=DECODE_BATCH_ROWS,
        fn_kwargs={"args": DecodeArgs(manifest.modalities, spec, norm)},
    )


def labeled_split_keys(
    manifest: Manifest,
    split: str,
    ratio: float,
    seed: int,
    options: StorageOptions | None = None,
) -> np.ndarray | None:
    """The keys of a split's rows that keep their label.

    From the split's label index (one small file the writer made, checksum checked) when the
    store has one; stores written before it are scanned: the id and label columns of every
    shard, read here on the driver. Both give the same keys (the index holds the same rows in
    the same order as the scan).
    """
    if ratio >= 1.0:
        return None
    index = read_label_index(manifest, split, options)
    if index is not None:
        keys, labels = index
        return protocols.labeled_keys_of_keys(keys, labels, ratio, seed)
    # Unchecked: two small columns only; the training read of these shards checks them whole.
    tables = list(
        iter_split_tables(manifest, split, options, columns=["id", "label"], verify=False)
    )
    table = pa.concat_tables(tables)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy()
    return protocols.labeled_keys(ids, labels, ratio, seed)


def missing_spec(missing: MissingConfig) -> dict[str, Any]:
    """The :class:`~sslmm_ray.data.protocols.ProtocolSpec` fields of a missingness setting."""
    return {"missing_rate": missing.rate, "protocol": missing.protocol, "seed": missing.seed}


def finetune_specs(
    manifest: Manifest,
    ft: FinetuneConfig,
    options: StorageOptions | None = None,
    *,
    missing: MissingConfig | None = None,
    valid_label_ratio: float | None = None,
) -> dict[str, protocols.ProtocolSpec]:
    """Per split: the same missingness everywhere; labels withheld on train and on valid.

    The labeled rows follow the fine-tuning seed, the masks ``missing`` (its own seed; None:
    the default setting).
    Validation keeps ``valid_label_ratio`` of its labels (None: the training label ratio), so
    model selection sees as many labels as such an experiment would really have. The
    validation draw uses its own stream of the seed; test is always fully labeled.
    """
    common = missing_spec(missing or MissingConfig())
    valid_ratio = ft.label_ratio if valid_label_ratio is None else valid_label_ratio
    train = labeled_split_keys(manifest, "train", ft.label_ratio, ft.seed, options)
    valid = labeled_split_keys(manifest, "valid", valid_ratio, ft.seed + VALID_SEED_OFFSET,
                               options)
    return {
        "train": protocols.ProtocolSpec(**common, labeled_keys=train),
        "valid": protocols.ProtocolSpec(**common, labeled_keys=valid),
        "test": protocols.ProtocolSpec(**common),
    }


def decoded_bytes(manifest: Manifest, split: str) -> int:
    """Size of a split once decoded to model batches (features, masks, labels)."""
    per_row = sum(s.length * (4 * s.dim + 1) for s in manifest.modalities.values()) + 16
    return manifest.counts.get(split, 0) * per_row


#: The splits a training run streams; a cache holds those of them that fit.
TRAINING_SPLITS = ("train", "valid")


@dataclass(frozen=True)
class SplitCache:
    """Decoded, normalised splits in Ray's object store, before any protocol is applied.

    Opt-in (``data.cache_mb``): streaming is the default, and a cache that is bigger than the
    object store only spills. Protocol-free, so one cache serves every label ratio, missing
    rate and seed: a sweep builds it once on its driver and every trial of every cell reads
    the same blocks (``tune.with_parameters``) instead of holding its own copy. It stays in
    the object store for as long as this object (its owner's references) lives.
    """

    splits: dict[str, ray.data.MaterializedDataset]
    normalize: bool

    @classmethod
    def build(
        cls, manifest: Manifest, cfg: ExperimentConfig, options: StorageOptions | None = None
    ) -> SplitCache | None:
        """Cache each training split that fits ``data.cache_mb``; None when none does."""
        budget = cfg.data.cache_mb * 2**20
        splits = {
            split: split_dataset(
                manifest, split, None, options, normalize=cfg.data.normalize,
                verify=cfg.data.verify_checksums,
            ).materialize()
            for split in TRAINING_SPLITS
            if 0 < decoded_bytes(manifest, split) <= budget
        }
        return cls(splits, cfg.data.normalize) if splits else None

    def dataset(
        self, split: str, spec: protocols.ProtocolSpec, shuffle_seed: int | None
    ) -> ray.data.Dataset:
        """The split's model batches; the block order is reseeded at every execution (epoch)."""
        ds: ray.data.Dataset = self.splits[split]
        if shuffle_seed is not None:
            ds = ds.randomize_block_order(
                seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
            )
        return ds.map_batches(
            _protocols, batch_format="numpy", batch_size=DECODE_BATCH_ROWS,
            fn_kwargs={"args": DecodeArgs({}, spec)},
        )


def _training_datasets(
    manifest: Manifest,
    cfg: ExperimentConfig,
    specs: dict[str, protocols.ProtocolSpec],
    seed: int,
    options: StorageOptions | None,
    cache: SplitCache | None,
) -> dict[str, ray.data.Dataset]:
    """Train (shuffled, reseeded per epoch) and valid, from the cache where it holds them."""
    if cache is None:
        cache = SplitCache.build(manifest, cfg, options)
    elif cache.normalize != cfg.data.normalize:
        raise ValueError("the split cache was decoded with another data.normalize")
    out = {}
    for split in TRAINING_SPLITS:
        shuffle = seed if split == "train" else None
        if cache is not None and split in cache.splits:
            out[split] = cache.dataset(split, specs[split], shuffle)
        else:
            out[split] = split_dataset(
                manifest, split, specs[split], options, shuffle_seed=shuffle,
                normalize=cfg.data.normalize, verify=cfg.data.verify_checksums,
            )
    return out


def finetune_datasets(
    manifest: Manifest,
    cfg: ExperimentConfig,
    options: StorageOptions | None = None,
    cache: SplitCache | None = None,
) -> dict[str, ray.data.Dataset]:
    specs = finetune_specs(manifest, cfg.finetune, options, missing=cfg.missing,
                           valid_label_ratio=cfg.data.valid_label_ratio)
    ft = cfg.finetune
    if ft.pseudo_labels and ft.graph_labels and specs["train"].labeled_keys is not None:
        specs["train"] = with_graph_labels(manifest, cfg, specs["train"], options, cache)
    return _training_datasets(manifest, cfg, specs, ft.seed, options, cache)


def with_graph_labels(
    manifest: Manifest,
    cfg: ExperimentConfig,
    spec: protocols.ProtocolSpec,
    options: StorageOptions | None = None,
    cache: SplitCache | None = None,
) -> protocols.ProtocolSpec:
    """``spec`` plus the training split's graph pseudo-labels (one pass over the split).

    The rows are read as training reads them (this spec: its masks and withheld labels), on
    the process that builds the datasets; the keys and scores then travel in the spec.
    """
    if cache is not None and "train" in cache.splits:
        ds = cache.dataset("train", spec, None)
    else:
        ds = split_dataset(manifest, "train", spec, options, normalize=cfg.data.normalize,
                           verify=cfg.data.verify_checksums)
    keys, scores = graph_labels.from_batches(
        ds.iter_batches(batch_size=None, batch_format="numpy"),
        k=cfg.finetune.graph_neighbors, alpha=cfg.finetune.graph_alpha,
    )
    return replace(spec, graph_keys=keys, graph_scores=scores)


def pretrain_datasets(
    manifest: Manifest,
    cfg: ExperimentConfig,
    options: StorageOptions | None = None,
    cache: SplitCache | None = None,
) -> dict[str, ray.data.Dataset]:
    """All training rows under the missing-data protocol; every label withheld."""
    pre = cfg.pretrain
    spec = protocols.ProtocolSpec(**missing_spec(cfg.missing), labeled_keys=np.zeros(0, np.uint64))
    specs = dict.fromkeys(TRAINING_SPLITS, spec)
    return _training_datasets(manifest, cfg, specs, pre.seed, options, cache)
