"""The synthetic generator and the RawDataset contract (sources.validate_raw)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sslmm_ray.data.sources import (
    LENGTH_KEYS,
    MODALITIES,
    PRESETS,
    SPLITS,
    DataError,
    RawDataset,
    validate_raw,
)
from sslmm_ray.data.synth import N_CLUSTERS, generate, split_sizes

# Tiny scales: a handful of samples per split, real shapes.
TINY = {"mosi": 0.02, "mosei": 0.002, "sims": 0.01, "scalable": 0.02}


def _arrays_equal(a: RawDataset, b: RawDataset) -> bool:
    return all(np.array_equal(a.splits[s][k], b.splits[s][k]) for s in SPLITS for k in a.splits[s])


def test_same_seed_same_arrays_other_seed_differs() -> None:
    a = generate("mosi", scale=0.02, seed=3)
    b = generate("mosi", scale=0.02, seed=3)
    c = generate("mosi", scale=0.02, seed=4)
    assert _arrays_equal(a, b)
    assert not np.array_equal(a.splits["train"]["text"], c.splits["train"]["text"])
    assert not np.array_equal(a.splits["train"]["label"], c.splits["train"]["label"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("aligned", [False, True])
def test_shapes_lengths_padding_labels(preset: str, aligned: bool) -> None:
    p = PRESETS[preset]
    raw = generate(preset, scale=TINY[preset], aligned=aligned, seed=1)
    validate_raw(raw, dims=p.dims, deep=True)  # finite values, zero padding, ranges
    assert raw.name == f"synthetic-{preset}"
    assert raw.label_range == p.label_range
    assert raw.counts() == split_sizes(preset, TINY[preset])
    assert min(raw.counts().values()) >= 8
    assert raw.dims() == dict(p.dims)
    assert raw.max_lengths() == p.lengths(aligned)
    lo, hi = p.label_range
    all_ids: list[str] = []
    for s in SPLITS:
        arr = raw.splits[s]
        all_ids += arr["id"].tolist()
        assert arr["label"].dtype == np.float32
        assert lo <= arr["label"].min() and arr["label"].max() <= hi
        steps = arr["label"] / p.label_step
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # annotator grid
        for m in MODALITIES:
            lengths, t = arr[LENGTH_KEYS[m]], arr[m].shape[1]
            assert lengths.dtype == np.int32
            assert (lengths >= 1).all() and (lengths <= t).all()
            # the last valid frame carries signal
            last = arr[m][np.arange(len(lengths)), lengths - 1]
            assert (np.abs(last).sum(axis=1) > 0).all()
        if aligned:
            assert np.array_equal(arr["audio_len"], arr["text_len"])
            assert np.array_equal(arr["vision_len"], arr["text_len"])
    assert len(set(all_ids)) == len(all_ids)  # ids unique across splits


def test_lengths_vary() -> None:
    arr = generate("mosi", scale=0.05, seed=0).splits["train"]
    for m in MODALITIES:
        assert len(np.unique(arr[LENGTH_KEYS[m]])) > 10


def test_split_sizes_follow_real_sizes() -> None:
    assert split_sizes("mosi", 1.0) == {"train": 1284, "valid": 229, "test": 686}
    assert split_sizes("sims", 0.5) == {"train": 684, "valid": 228, "test": 228}
    assert split_sizes("mosei", 1e-6) == {"train": 8, "valid": 8, "test": 8}
    assert split_sizes("scalable", 10) == {"train": 12840, "valid": 2290, "test": 6860}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown preset 'iemocap'"):
        generate("iemocap")
    with pytest.raises(ValueError, match="scale"):
        generate("mosi", scale=0)


def _pooled(arr: dict, m: str) -> np.ndarray:
    return arr[m].sum(axis=1) / arr[LENGTH_KEYS[m]][:, None]


def _ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float = 10.0):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean(0)))
    return lambda q: ((q - mu) / sd) @ w + y.mean(0)


@pytest.fixture(scope="module")
def mosi_small() -> RawDataset:
    return generate("mosi", scale=0.1, seed=0)


def _held_out(raw: RawDataset, m: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([_pooled(raw.splits[s], m) for s in ("valid", "test")])
    y = np.concatenate([raw.splits[s]["label"] for s in ("valid", "test")])
    return x, y


def _non0_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    nz = y != 0
    return float(((pred[nz] > 0) == (y[nz] > 0)).mean())


def _ridge_accuracy(raw: RawDataset, m: str) -> float:
    """Ridge on mean-pooled features of one modality; Non0 binary accuracy on valid + test."""
    tr = raw.splits["train"]
    predict = _ridge_fit(_pooled(tr, m), tr["label"])
    x, y = _held_out(raw, m)
    return _non0_accuracy(predict(x), y)


def _knn_accuracy(raw: RawDataset, m: str, k: int = 7) -> float:
    """k nearest training neighbours (standardised mean-pooled features), mean label."""
    tr = raw.splits["train"]
    x = _pooled(tr, m)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    q, y = _held_out(raw, m)
    d = ((((q - mu) / sd)[:, None, :] - ((x - mu) / sd)[None]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1)[:, :k]
    return _non0_accuracy(tr["label"][nearest].mean(axis=1), y)


def test_signal_is_learnable_and_text_strongest(mosi_small: RawDataset) -> None:
    """Sentiment lives in the clusters: a local (k-NN) rule finds it, best from text."""
    acc = {m: _knn_accuracy(mosi_small, m) for m in MODALITIES}
    assert acc["text"] > 0.75, acc
    assert acc["text"] > acc["vision"] + 0.05, acc
    assert acc["text"] < 0.99, acc  # not trivial


def test_sentiment_is_not_linear(mosi_small: RawDataset) -> None:
    """The cluster -> sentiment map is shuffled: a linear readout falls well short of k-NN.

    This is what makes labels scarce at a few hundred and unlabeled data worth having.
    """
    assert _ridge_accuracy(mosi_small, "text") < _knn_accuracy(mosi_small, "text") - 0.04


def test_missing_modality_partly_rebuildable(mosi_small: RawDataset) -> None:
    """The shared latent: pooled audio is partly predictable from pooled text."""
    tr, te = mosi_small.splits["train"], mosi_small.splits["test"]
    predict = _ridge_fit(_pooled(tr, "text"), _pooled(tr, "audio"))
    target = _pooled(te, "audio")
    resid = ((predict(_pooled(te, "text")) - target) ** 2).sum()
    r2 = 1 - resid / ((target - target.mean(0)) ** 2).sum()
    assert 0.2 < r2 < 0.95


def _kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """Lloyd's algorithm from k-means++ seeds; returns the cluster of each row."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(k - 1):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())])
    c = np.stack(centres)
    for _ in range(iters):
        assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    return assign


def test_unlabeled_structure_predicts_sentiment(mosi_small: RawDataset) -> None:
    """Clusters found without labels, then named by two labels each, predict the sign.

    The cluster assumption of pseudo-labelling: unlabeled data draw the boundaries, a few
    labels per cluster say which side is which.
    """
    x = np.concatenate([_pooled(mosi_small.splits[s], "text") for s in SPLITS])
    y = np.concatenate([mosi_small.splits[s]["label"] for s in SPLITS])
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    assign = _kmeans(z, N_CLUSTERS)
    n_train = mosi_small.counts()["train"]
    named = np.zeros(N_CLUSTERS)
    for j in range(N_CLUSTERS):
        members = np.flatnonzero(assign[:n_train] == j)[:2]  # two labels per cluster
        named[j] = y[members].mean() if members.size else 0.0
    held_out = np.arange(n_train, len(y))
    assert _non0_accuracy(named[assign[held_out]], y[held_out]) > 0.7


def test_generate_memory_bounded() -> None:
    """MOSI unaligned at a fraction of scale: peak traced memory close to the output size."""
    import tracemalloc

    tracemalloc.start()
    try:
        raw = generate("mosi", scale=0.2, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out = sum(a.nbytes for s in raw.splits.values() for a in s.values())
    assert peak < out + 60e6, (peak, out)


# validate_raw: each broken contract is a DataError naming the split and sample id.


def _tiny() -> RawDataset:
    return generate("mosi", scale=0.01, seed=0)


def test_validate_label_out_of_range_names_split_and_id() -> None:
    raw = _tiny()
    raw.splits["valid"]["label"][2] = 3.5
    bad_id = raw.splits["valid"]["id"][2]
    with pytest.raises(DataError, match=rf"split 'valid'.*{bad_id}.*label 3.5"):
        validate_raw(raw)


def test_validate_length_and_padding_and_dims() -> None:
    raw = _tiny()
    raw.splits["test"]["audio_len"][1] = 0
    with pytest.raises(DataError, match=r"split 'test'.*audio_len 0 outside \[1, 375\]"):
        validate_raw(raw)
    raw = _tiny()
    arr = raw.splits["train"]
    n_valid = arr["vision_len"][0]
    if n_valid < arr["vision"].shape[1]:
        arr["vision"][0, -1, 0] = 1.0
        validate_raw(raw)  # shallow check does not read the values
        with pytest.raises(DataError, match="not zero beyond vision_len"):
            validate_raw(raw, deep=True)
    raw = _tiny()
    with pytest.raises(DataError, match=r"'audio' has feature dim 5, expected 6"):
        validate_raw(raw, dims={"text": 768, "audio": 6, "vision": 20})
    raw = _tiny()
    del raw.splits["train"]["vision_len"]
    with pytest.raises(DataError, match=r"split 'train': missing key\(s\) \['vision_len'\]"):
        validate_raw(raw)
    raw = dataclasses.replace(_tiny(), splits={})
    with pytest.raises(DataError, match="no splits"):
        validate_raw(raw)
