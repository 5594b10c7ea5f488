"""Graph pseudo-labels: label propagation over the training split's kNN graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sslmm_ray.data import graph_labels, protocols


def _clusters(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two well-separated blobs: scores +2 and -2, one labeled row in each."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(5, 0.5, (n, 6)), rng.normal(-5, 0.5, (n, 6))])
    y = np.concatenate([np.full(n, 2.0), np.full(n, -2.0)])
    labeled = np.zeros(2 * n, bool)
    labeled[[0, n]] = True
    return x, y, labeled


def test_labels_follow_the_graph_and_stay_in_range() -> None:
    x, y, labeled = _clusters()
    scores, reached = graph_labels.propagate(x, y, labeled, k=5)
    assert reached.sum() == len(y) - 2 and not reached[labeled].any()
    assert (np.sign(scores[reached]) == np.sign(y[reached])).all()
    assert scores.min() >= -2.0 and scores.max() <= 2.0
    np.testing.assert_array_equal(scores[labeled], y[labeled])


def test_withheld_labels_are_never_read() -> None:
    x, y, labeled = _clusters()
    garbage = np.where(labeled, y, 1e6)
    np.testing.assert_array_equal(graph_labels.propagate(x, y, labeled)[0],
                                  graph_labels.propagate(x, garbage, labeled)[0])


def test_rows_no_labeled_row_reaches_get_none() -> None:
    x, y, labeled = _clusters()
    only_first = labeled.copy()
    only_first[40] = False  # the second blob has no labeled row and no edge to the first
    scores, reached = graph_labels.propagate(x, y, only_first, k=5)
    assert reached[1:40].all() and not reached[40:].any()
    assert (scores[40:] == 0).all()
    assert not graph_labels.propagate(x, y, np.zeros(len(y), bool))[1].any()


def _batch(n: int, seed: int, label_ratio: float = 0.2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.array([f"row{i}" for i in range(n)], dtype=object)
    label = np.where(np.arange(n) % 2 == 0, 1.5, -1.5)
    arrays = {"id": ids, "label": label}
    for m, (t, d) in {"text": (4, 3), "audio": (40, 30), "vision": (2, 5)}.items():
        x = rng.normal(0, 0.3, (n, t, d)).astype(np.float32) + label[:, None, None]
        arrays[m], arrays[f"{m}_len"] = x, np.full(n, t)
    keys = protocols.labeled_keys(ids, label, label_ratio, seed)
    return protocols.apply(arrays, protocols.ProtocolSpec(missing_rate=0.3, seed=seed,
                                                          labeled_keys=keys))


def test_row_features_flatten_small_modalities_and_summarise_long_ones() -> None:
    b = _batch(10, 0)
    feats = graph_labels.row_features(b)
    assert feats.shape == (10, 4 * 3 + 2 * 30 + 2 * 5)  # audio (40 x 30 > 1024): mean and std
    present = b["audio_mask"].any(axis=1)
    mean = b["audio"][present].sum(axis=1) / b["audio_mask"][present].sum(axis=1)[:, None]
    np.testing.assert_allclose(feats[present, 12:42], mean, rtol=1e-5, atol=1e-6)


def test_from_batches_ignores_batch_order_and_leaves_labeled_rows_out() -> None:
    whole = _batch(60, 3)
    keys, scores = graph_labels.from_batches([whole])
    order = np.random.default_rng(0).permutation(60)
    parts = [{k: v[order[i::3]] for k, v in whole.items()} for i in range(3)]
    keys2, scores2 = graph_labels.from_batches(parts)
    np.testing.assert_array_equal(keys, keys2)
    np.testing.assert_array_equal(scores, scores2)
    labeled = set(whole["index"][whole["labeled"]].view(np.uint64).tolist())
    assert labeled.isdisjoint(keys.tolist()) and len(keys) == 60 - len(labeled)
    truth = dict(zip(whole["index"].view(np.uint64).tolist(),
                     np.where(np.arange(60) % 2 == 0, 1.5, -1.5), strict=True))
    agree = np.mean([np.sign(s) == np.sign(truth[k]) for k, s in zip(keys, scores, strict=True)])
    assert agree > 0.9


def test_protocol_carries_graph_labels_to_unlabeled_rows_only() -> None:
    whole = _batch(30, 1)
    keys, scores = graph_labels.from_batches([whole])
    rng = np.random.default_rng(1)
    arrays = {"id": np.array([f"row{i}" for i in range(30)], dtype=object),
              "label": np.where(np.arange(30) % 2 == 0, 1.5, -1.5)}
    for m, (t, d) in {"text": (4, 3), "audio": (40, 30), "vision": (2, 5)}.items():
        arrays[m], arrays[f"{m}_len"] = rng.normal(size=(30, t, d)), np.full(30, t)
    spec = protocols.ProtocolSpec(missing_rate=0.3, seed=1, labeled_keys=protocols.labeled_keys(
        arrays["id"], arrays["label"], 0.2, 1))
    plain = protocols.apply(arrays, spec)
    assert "graph_label" not in plain and "graph_labeled" not in plain
    # half of the keys, shuffled: the spec sorts them with their scores
    pick = rng.permutation(len(keys))[: len(keys) // 2]
    got = protocols.apply(arrays, dataclasses.replace(spec, graph_keys=keys[pick],
                                                      graph_scores=scores[pick]))
    index = got["index"].view(np.uint64)
    want = dict(zip(keys[pick].tolist(), scores[pick].tolist(), strict=True))
    assert not got["graph_labeled"][got["labeled"]].any()
    for i, key in enumerate(index.tolist()):
        assert got["graph_labeled"][i] == (key in want)
        assert got["graph_label"][i] == pytest.approx(want.get(key, 0.0))
    with pytest.raises(ValueError, match="together"):
        protocols.ProtocolSpec(graph_keys=keys)
