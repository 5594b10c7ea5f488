"""Write small pickles in the real MMSA processed layout, for the importer's tests.

The layout follows the MMSA files (``aligned_50.pkl``, ``unaligned_50.pkl``,
``unaligned_39.pkl``): the real feature dims and padded lengths of each data set, object
arrays of ids and raw text, a BERT ``text_bert`` (N, 3, L) whose row 1 is the attention mask,
``audio_lengths`` as a list (as some MMSA versions store it) and ``vision_lengths`` as an array,
extra keys the importer must ignore, -inf values in audio (as in MOSI), a zero length and
non-zero values in padding. ``corruptions`` break one thing at a time for the error tests.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sslmm_ray.data.sources import PRESETS

SPLIT_NAMES = ("train", "valid", "test")
CORRUPTIONS = ("drop_key", "wrong_dim", "bad_label", "row_mismatch", "payload", "drop_split")


def _split(
    rng: np.random.Generator, dataset: str, aligned: bool, split: str, n: int
) -> dict[str, Any]:
    p = PRESETS[dataset]
    t = p.lengths(aligned)
    lo, hi = p.label_range
    text_len = rng.integers(3, t["text"] + 1, n)
    text_len[0] = t["text"]  # one full-length sample
    if aligned:
        a_len, v_len = text_len.copy(), text_len.copy()
    else:
        a_len = rng.integers(1, t["audio"] + 1, n)
        v_len = rng.integers(1, t["vision"] + 1, n)
        a_len[-1] = 0  # MMSA holds some zero lengths
    d: dict[str, Any] = {
        "id": np.array([f"{dataset}vid{k:03d}$_${split}{k}" for k in range(n)], dtype=object),
        "raw_text": np.array([f"utterance {k} of {split}" for k in range(n)], dtype=object),
    }
    bert = np.zeros((n, 3, t["text"]), dtype=np.float32)
    for k, length in enumerate(text_len):
        bert[k, 0, :length] = rng.integers(100, 30000, length)
        bert[k, 1, :length] = 1.0
    d["text_bert"] = bert
    for m, lengths in (("text", text_len), ("audio", a_len), ("vision", v_len)):
        x = rng.standard_normal((n, t[m], p.dims[m])).astype(np.float32)
        x[np.arange(t[m])[None, :] >= lengths[:, None]] = 0.0
        d[m] = x
    d["audio"][0, 0, 0] = -np.inf  # MOSI-style -inf in valid frames
    d["audio"][1 % n, 1, : min(2, p.dims["audio"])] = -np.inf
    if n > 2:
        d["vision"][2, 0, 0] = np.nan
    if not aligned:
        d["audio_lengths"] = [int(x) for x in a_len]
        d["vision_lengths"] = v_len.astype(np.int64)
        if v_len[1 % n] < t["vision"]:  # garbage in padding, which the importer must zero
            d["vision"][1 % n, -1, :] = 7.0
    labels = np.round(rng.uniform(lo, hi, n) / p.label_step) * p.label_step
    labels[0] = hi  # range ends are valid
    labels[-1] = 0.0
    d["regression_labels"] = np.clip(labels, lo, hi).astype(np.float32)
    d["classification_labels"] = np.sign(d["regression_labels"]) + 1
    if dataset == "sims":
        for suffix in ("T", "A", "V"):
            d[f"regression_labels_{suffix}"] = d["regression_labels"].copy()
    return d


def make_mmsa_dict(
    dataset: str,
    aligned: bool,
    n_per_split: tuple[int, int, int] = (8, 4, 4),
    seed: int = 0,
    **corruptions: Any,
) -> dict[str, Any]:
    """The MMSA dict for ``dataset`` (see :func:`write_mmsa_pickle` for ``corruptions``)."""
    unknown = set(corruptions) - set(CORRUPTIONS)
    if unknown:
        raise TypeError(f"unknown corruption(s) {sorted(unknown)}, expected {CORRUPTIONS}")
    rng = np.random.default_rng(seed)
    data = {
        s: _split(rng, dataset, aligned, s, n)
        for s, n in zip(SPLIT_NAMES, n_per_split, strict=True)
    }
    if corruptions.get("drop_key"):
        split, key = corruptions["drop_key"]
        del data[split][key]
    if corruptions.get("drop_split"):
        del data[corruptions["drop_split"]]
    if corruptions.get("wrong_dim"):
        split, m, dim = corruptions["wrong_dim"]
        x = data[split][m]
        data[split][m] = np.zeros((*x.shape[:2], dim), dtype=np.float32)
    if corruptions.get("bad_label"):
        split, row, value = corruptions["bad_label"]
        data[split]["regression_labels"][row] = value
    if corruptions.get("row_mismatch"):
        split, key = corruptions["row_mismatch"]
        data[split][key] = data[split][key][:-1]
    if corruptions.get("payload") is not None:
        data["train"]["payload"] = corruptions["payload"]
    return data


def write_mmsa_pickle(
    path: str | Path,
    dataset: str,
    aligned: bool,
    n_per_split: tuple[int, int, int] = (8, 4, 4),
    seed: int = 0,
    **corruptions: Any,
) -> Path:
    """Write a small MMSA-layout pickle for ``dataset`` ("mosi", "mosei", "sims") to ``path``.

    Corruptions (one or more): ``drop_key=(split, key)``, ``drop_split=split``,
    ``wrong_dim=(split, modality, dim)``, ``bad_label=(split, row, value)``,
    ``row_mismatch=(split, key)`` (one row fewer), ``payload=obj`` (stored under
    ``train["payload"]``, e.g. an object whose ``__reduce__`` runs a command).
    """
    path = Path(path)
    data = make_mmsa_dict(dataset, aligned, n_per_split, seed, **corruptions)
    with path.open("wb") as f:
        pickle.dump(data, f, protocol=4)
    return path
