"""Ray Data streaming from a real S3 server: tensors equal the source rows, protocols applied.

One Ray session for the module (``ray.init`` is the slow part); it starts after the ``s3``
fixture has put the fake AWS credentials into the environment, so Ray's workers inherit them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from sslmm_ray.config import DatasetConfig, ExperimentConfig, FinetuneConfig, MissingConfig
from sslmm_ray.data import pipeline, protocols, store, synth
from sslmm_ray.data.normalize import normalize_features, normalizer_for, valid_frames
from sslmm_ray.data.protocols import ProtocolSpec
from sslmm_ray.data.sources import MODALITIES, DataError, RawDataset


@pytest.fixture(scope="module")
def ray_session(ray_cluster) -> Iterator[None]:
    # The session's Ray (conftest), never shut down here: a module that stopped it made every
    # later module start a default 4-CPU Ray, so the sweep tests saw one cell at a time.
    yield


@pytest.fixture(scope="module")
def raw() -> RawDataset:
    return synth.generate("mosi", scale=0.05, seed=2)  # unaligned: 50 / 375 / 500 frames


@pytest.fixture(scope="module")
def remote(s3, raw) -> store.Manifest:
    uri = s3.uri(f"pipeline/{uuid.uuid4().hex}")
    store.write_dataset(raw, uri, s3.options, shard_rows=11)
    return store.open_dataset(uri, s3.options)


def _collect(ds, batch_size: int = 16) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        assert isinstance(batch["text"], torch.Tensor)
        for k, v in batch.items():
            parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _by_index(got: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Reorder streamed rows to the source order, via the stable per-sample key."""
    want = protocols.sample_keys(ids).view(np.int64)
    pos = {int(k): i for i, k in enumerate(got["index"])}
    assert len(pos) == len(got["index"]) == len(ids), "every row exactly once"
    order = np.array([pos[int(k)] for k in want])
    return {k: v[order] for k, v in got.items()}


def test_s3_round_trip_equals_source_rows(ray_session, s3, raw, remote) -> None:
    arrays = raw.splits["train"]
    ds = pipeline.split_dataset(
        remote, "train", ProtocolSpec(), s3.options, shuffle_seed=1, normalize=False
    )
    got = _by_index(_collect(ds), arrays["id"])
    assert got["text"].dtype == np.float32 and got["audio_mask"].dtype == bool
    assert got["index"].dtype == np.int64 and got["label"].dtype == np.float32
    for m in MODALITIES:
        np.testing.assert_array_equal(got[m], arrays[m], err_msg=m)
        frames = np.arange(arrays[m].shape[1])[None, :] < arrays[f"{m}_len"][:, None]
        np.testing.assert_array_equal(got[f"{m}_mask"], frames, err_msg=m)
    np.testing.assert_array_equal(got["label"], arrays["label"])
    assert got["labeled"].all()


def test_streamed_batches_equal_protocols_apply(ray_session, s3, raw, remote) -> None:
    """Masks and normalised features through Ray equal the in-process ones (the frame
    protocol; test_protocols covers both protocols' independence from batch composition
    without Ray)."""
    proto = "frame"
    arrays = raw.splits["train"]
    keys = protocols.labeled_keys(arrays["id"], arrays["label"], 0.5, seed=3)
    spec = ProtocolSpec(0.5, proto, seed=3, labeled_keys=keys)
    got = _by_index(_collect(pipeline.split_dataset(remote, "train", spec, s3.options), 7),
                    arrays["id"])
    want = protocols.apply(normalize_features(arrays, normalizer_for(remote, True)), spec)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_file_order_shuffles_per_epoch(ray_session, s3, raw, remote) -> None:
    assert len(remote.shard_uris("train")) >= 6  # 720 file orders
    train = pipeline.split_dataset(remote, "train", ProtocolSpec(), s3.options, shuffle_seed=5)
    orders = [tuple(_collect(train, 64)["index"].tolist()) for _ in range(2)]
    assert sorted(orders[0]) == sorted(orders[1]) and len(orders[0]) == raw.counts()["train"]
    assert orders[0] != orders[1], "file order must change between epochs"


def test_finetune_datasets_withhold_train_and_valid_labels(ray_session, s3, raw, remote) -> None:
    cfg = ExperimentConfig(
        finetune=FinetuneConfig(label_ratio=0.25, seed=1),
        missing=MissingConfig(rate=0.4, protocol="frame", seed=1),
    )
    specs = pipeline.finetune_specs(remote, cfg.finetune, s3.options)
    assert specs["test"].labeled_keys is None  # test keeps every label
    n_train, n_valid = raw.counts()["train"], raw.counts()["valid"]
    assert abs(len(specs["train"].labeled_keys) - 0.25 * n_train) <= 3
    # validation withholds at the training ratio by default, from its own stream of the seed
    valid_keys = specs["valid"].labeled_keys
    assert abs(len(valid_keys) - 0.25 * n_valid) <= 3
    again = pipeline.finetune_specs(remote, cfg.finetune, s3.options)["valid"].labeled_keys
    assert np.array_equal(valid_keys, again)
    other_seed = FinetuneConfig(label_ratio=0.25, seed=2)
    moved = pipeline.finetune_specs(remote, other_seed, s3.options)["valid"].labeled_keys
    assert not np.array_equal(valid_keys, moved)
    full = pipeline.finetune_specs(remote, cfg.finetune, s3.options, valid_label_ratio=1.0)
    assert full["valid"].labeled_keys is None
    half = pipeline.finetune_specs(remote, cfg.finetune, s3.options, valid_label_ratio=0.5)
    assert abs(len(half["valid"].labeled_keys) - 0.5 * n_valid) <= 3
    datasets = pipeline.finetune_datasets(remote, cfg, s3.options)
    train = _collect(datasets["train"])
    assert train["labeled"].sum() == len(specs["train"].labeled_keys)
    assert (train["label"][~train["labeled"]] == 0).all()
    # graph pseudo-labels: on unlabeled training rows only, within the label range
    assert not train["graph_labeled"][train["labeled"]].any()
    assert train["graph_labeled"][~train["labeled"]].mean() > 0.9
    assert np.abs(train["graph_label"]).max() <= np.abs(raw.splits["train"]["label"]).max()
    valid = _collect(datasets["valid"])
    assert "graph_label" not in valid
    off = ExperimentConfig(finetune=FinetuneConfig(label_ratio=0.25, seed=1, graph_labels=False),
                           missing=cfg.missing)
    assert "graph_label" not in _collect(pipeline.finetune_datasets(remote, off, s3.options)[
        "train"])
    pre = pipeline.pretrain_datasets(remote, cfg, s3.options)
    assert set(pre) == {"train", "valid"}


@pytest.fixture(scope="module")
def scaled(s3, raw) -> store.Manifest:
    """Feature scales orders of magnitude apart, as in real feature sets."""
    splits = {s: {k: v.copy() for k, v in a.items()} for s, a in raw.splits.items()}
    for arrays in splits.values():
        arrays["audio"] *= 1000.0  # padding stays zero
        valid = valid_frames(arrays["vision_len"], arrays["vision"].shape[1])
        arrays["vision"][valid] = arrays["vision"][valid] * 0.01 + 3.0
    uri = s3.uri(f"pipeline/{uuid.uuid4().hex}")
    store.write_dataset(RawDataset(raw.name, raw.label_range, splits, {}), uri, s3.options,
                        shard_rows=16)
    return store.open_dataset(uri, s3.options)


def test_training_batches_are_normalised_per_feature(ray_session, s3, scaled) -> None:
    # data.normalize defaults to True; nothing hidden, so every valid frame is seen
    cfg = ExperimentConfig(missing=MissingConfig(rate=0.0))
    assert cfg.data.normalize
    assert min(scaled.normalization["audio"]["std"]) > 100  # the raw audio really is x1000
    got = _collect(pipeline.pretrain_datasets(scaled, cfg, s3.options)["train"])
    for m in MODALITIES:
        valid = got[f"{m}_mask"]  # missing rate 0: the mask is every valid frame
        x = got[m][valid].astype(np.float64)
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4, err_msg=m)
        np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-4, err_msg=m)
        assert (got[m][~valid] == 0.0).all(), m  # padding exactly zero


def test_normalize_false_gives_raw_values(ray_session, s3, scaled) -> None:
    cfg = ExperimentConfig(data=DatasetConfig(normalize=False), missing=MissingConfig(rate=0.0))
    got = _by_index(
        _collect(pipeline.pretrain_datasets(scaled, cfg, s3.options)["valid"]),
        store.read_split(scaled, "valid", s3.options)["id"],
    )
    raw = store.read_split(scaled, "valid", s3.options)
    for m in MODALITIES:
        np.testing.assert_array_equal(got[m], raw[m], err_msg=m)


def test_store_without_statistics_is_a_clear_error(ray_session, s3, scaled) -> None:
    """A store written before statistics existed: refused on the driver, before any task."""
    old = store.Manifest(**{**vars(scaled), "normalization": {}})
    with pytest.raises(DataError, match="re-run `sslmm data synth`.*data.normalize=false"):
        pipeline.split_dataset(old, "train", ProtocolSpec(), s3.options)
    pipeline.split_dataset(old, "train", ProtocolSpec(), s3.options, normalize=False)


def test_cache_is_opt_in_equals_streaming_and_reseeds_block_order(
    ray_session, s3, raw, remote
) -> None:
    """The cache holds decoded rows before any protocol: one cache serves every cell, gives
    the streamed batches exactly, and a new block order every epoch (the same ones per seed)."""
    streaming = ExperimentConfig(finetune=FinetuneConfig(label_ratio=0.5),
                                 missing=MissingConfig(rate=0.4))
    assert streaming.data.cache_mb == 0 and streaming.data.prefetch_batches >= 2
    assert pipeline.SplitCache.build(remote, streaming, s3.options) is None  # opt-in
    cfg = ExperimentConfig(data=DatasetConfig(cache_mb=64), finetune=streaming.finetune,
                           missing=streaming.missing)
    cache = pipeline.SplitCache.build(remote, cfg, s3.options)
    assert cache is not None and set(cache.splits) == {"train", "valid"}
    assert cache.splits["train"].num_blocks() >= 6  # one per shard

    streamed = pipeline.finetune_datasets(remote, streaming, s3.options)
    cached = pipeline.finetune_datasets(remote, cfg, s3.options, cache)
    for split in ("train", "valid"):
        ids = raw.splits[split]["id"]
        want = _by_index(_collect(streamed[split]), ids)
        got = _by_index(_collect(cached[split]), ids)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{split} {k}")

    # another cell (label ratio, missing rate) reads the same cached blocks
    other = ExperimentConfig(data=cfg.data, finetune=FinetuneConfig(label_ratio=0.1),
                             missing=MissingConfig(rate=0.0))
    got = _collect(pipeline.finetune_datasets(remote, other, s3.options, cache)["train"])
    spec = pipeline.finetune_specs(remote, other.finetune, s3.options)["train"]
    assert got["labeled"].sum() == len(spec.labeled_keys)
    assert all(got[f"{m}_mask"].any(axis=1).all() for m in MODALITIES)  # nothing hidden

    def epoch_orders(seed: int) -> list[tuple[int, ...]]:
        """A new run's first three epochs (its own cache: Ray counts executions per cache)."""
        train = pipeline.SplitCache.build(remote, cfg, s3.options).dataset(
            "train", ProtocolSpec(), seed)
        return [tuple(_collect(train, 64)["index"].tolist()) for _ in range(3)]

    first, again = epoch_orders(5), epoch_orders(5)
    assert sorted(first[0]) == sorted(first[1]) and len(first[0]) == raw.counts()["train"]
    assert len(set(first)) == 3, "the block order must change every epoch"
    assert first == again, "the same seed must give the same sequence of epoch orders"
    with pytest.raises(ValueError, match="data.normalize"):
        pipeline.finetune_datasets(remote, ExperimentConfig(data=DatasetConfig(normalize=False)),
                                   s3.options, cache)
