"""The experimental protocols, in the one place every stage calls.

* Label ratio: a seeded subset of the training split, stratified by sentiment sign, keeps its
  labels; the others get label 0 and ``labeled=False`` *before* any batch leaves this module, so
  no loss can read a withheld label.
* Missing modalities, two protocols:

  - ``modality`` (default): each (sample, modality) is missing, at least one modality kept per
    sample. Drawing each with probability ``r`` and then restoring one of the all-missing samples
    would miss fewer than ``r`` of the modalities, so the per-draw probability ``q`` is calibrated
    to ``q - q**3 / 3 = r``: the fraction of missing (sample, modality) pairs is then ``r``. With
    three modalities and one kept, at most 2/3 can be missing; a larger ``r`` is refused (a
    capped rate would label results with a rate that was never applied).
  - ``frame``: each valid frame of each modality is missing with probability ``r``; a sample
    left with no frame at all keeps its frame with the largest draw.

Randomness is a counter-based hash of ``(seed, sample id, stream, position)`` (splitmix64),
vectorised over the batch: the same sample gets the same mask in every split, batch, worker,
epoch and process, whatever the batch composition. Missing content is zeroed here, before the
model sees it, and the model gets the observed-frame masks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from sslmm_ray.config import MAX_MODALITY_RATE, MODALITIES, check_reachable
from sslmm_ray.errors import UserError

_U64 = np.uint64
_STREAM_LABEL = 1
_STREAM_MODALITY = 2
_STREAM_FRAME = 3


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def sample_keys(ids: np.ndarray | list[str]) -> np.ndarray:
    """A stable 64-bit key per sample id: BLAKE2b-64 of its UTF-8 bytes.

    A cryptographic digest, not a checksum pair: keys decide label membership, so two ids must
    not collide (CRC-style sums of similar ids can). Independent of row order and process.
    """
    ids = np.asarray(ids, dtype=object).reshape(-1)
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
            for i in ids
        ),
        dtype=np.uint64,
        count=len(ids),
    )


def uniforms(seed: int, keys: np.ndarray, stream: int, width: int = 1) -> np.ndarray:
    """``(len(keys), width)`` uniforms in [0, 1), a pure function of (seed, key, stream, col)."""
    base = _splitmix64(_splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], _U64)) ^ _U64(stream))
    h = _splitmix64(keys.astype(_U64)[:, None] ^ base)
    h = _splitmix64(h + np.arange(width, dtype=_U64)[None, :])
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def labeled_mask(ids: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Which training rows keep their label: ``round(ratio * n)`` per sentiment-sign stratum."""
    return labeled_mask_of_keys(sample_keys(ids), labels, ratio, seed)


def labeled_mask_of_keys(
    keys: np.ndarray, labels: np.ndarray, ratio: float, seed: int
) -> np.ndarray:
    """:func:`labeled_mask` from the rows' :func:`sample_keys` (the store's label index)."""
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"label ratio must be in (0, 1], got {ratio}")
    keys = np.asarray(keys, _U64)
    u = uniforms(seed, keys, _STREAM_LABEL)[:, 0]
    signs = np.sign(np.asarray(labels, np.float64))
    keep = np.zeros(len(keys), dtype=bool)
    for s in (-1.0, 0.0, 1.0):
        members = np.flatnonzero(signs == s)
        n_keep = int(round(ratio * len(members)))
        if n_keep:
            keep[members[np.argsort(u[members], kind="stable")[:n_keep]]] = True
    if len(keys) and not keep.any():
        keep[np.argmin(u)] = True
    return keep


def calibrated_draw_prob(rate: float) -> float:
    """The per-(sample, modality) probability whose at-least-one-kept result misses ``rate``."""
    if rate <= 0.0:
        return 0.0
    if rate >= MAX_MODALITY_RATE:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid - mid**3 / 3 < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def modality_presence(keys: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """``(N, 3)`` bool: which modalities each sample keeps (modality-level protocol)."""
    u = uniforms(seed, keys, _STREAM_MODALITY, width=len(MODALITIES))
    present = u >= calibrated_draw_prob(rate)
    none = ~present.any(axis=1)
    present[none, np.argmax(u[none], axis=1)] = True
    return present


def frame_observed(
    keys: np.ndarray, lengths: dict[str, np.ndarray], max_len: dict[str, int], rate: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Per modality ``(N, T)`` bool: valid frames that survive the frame-level protocol."""
    total = sum(max_len[m] for m in MODALITIES)
    u = uniforms(seed, keys, _STREAM_FRAME, width=total)
    valid = np.concatenate(
        [np.arange(max_len[m])[None, :] < lengths[m][:, None] for m in MODALITIES], axis=1
    )
    observed = valid & (u >= rate)
    empty = ~observed.any(axis=1)
    if empty.any():
        best = np.argmax(np.where(valid[empty], u[empty], -1.0), axis=1)
        observed[np.flatnonzero(empty), best] = True
    out, start = {}, 0
    for m in MODALITIES:
        out[m] = observed[:, start : start + max_len[m]]
        start += max_len[m]
    return out


@dataclass(frozen=True, eq=False)
class ProtocolSpec:
    """Everything that decides what a batch hides: rates, protocol, seed, labeled keys.

    ``labeled_keys`` (from :func:`labeled_keys`) lists the rows that keep their label; ``None``
    means every row is labeled (valid, test), an empty array that none is (pre-training).
    Compared by identity (it holds an array); small enough to ship to every Ray Data task.
    """

    missing_rate: float = 0.0
    protocol: Literal["modality", "frame"] = "modality"
    seed: int = 0
    labeled_keys: np.ndarray | None = None  # sorted uint64 keys; None = every row labeled
    # Graph pseudo-labels of unlabeled training rows (sslmm_ray.data.graph_labels): sorted
    # keys and their scores. None: batches carry no graph_label / graph_labeled columns.
    graph_keys: np.ndarray | None = None
    graph_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.missing_rate < 1.0:
            raise UserError(f"missing rate must be in [0, 1), got {self.missing_rate}")
        if self.protocol not in ("modality", "frame"):
            raise UserError(f"protocol must be 'modality' or 'frame', got {self.protocol!r}")
        if self.labeled_keys is not None:
            keys = np.unique(np.asarray(self.labeled_keys, dtype=np.uint64).reshape(-1))
            object.__setattr__(self, "labeled_keys", keys)
        if (self.graph_keys is None) != (self.graph_scores is None):
            raise ValueError("graph_keys and graph_scores go together")
        if self.graph_keys is not None:
            keys = np.asarray(self.graph_keys, dtype=np.uint64).reshape(-1)
            scores = np.asarray(self.graph_scores, dtype=np.float32).reshape(-1)
            if keys.shape != scores.shape:
                raise ValueError(f"{len(keys)} graph keys but {len(scores)} scores")
            order = np.argsort(keys, kind="stable")
            object.__setattr__(self, "graph_keys", keys[order])
            object.__setattr__(self, "graph_scores", scores[order])
        check_reachable(self.missing_rate, self.protocol, "missing rate")


def observed_masks(
    arrays: dict[str, Any], spec: ProtocolSpec, keys: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per modality ``(N, T)`` masks of frames that are valid and observed under ``spec``."""
    if keys is None:
        keys = sample_keys(arrays["id"])
    max_len = {m: arrays[m].shape[1] for m in MODALITIES}
    lengths = {m: np.asarray(arrays[f"{m}_len"]) for m in MODALITIES}
    if spec.protocol == "frame" and spec.missing_rate > 0:
        return frame_observed(keys, lengths, max_len, spec.missing_rate, spec.seed)
    masks = {m: np.arange(max_len[m])[None, :] < lengths[m][:, None] for m in MODALITIES}
    if spec.missing_rate > 0:
        present = modality_presence(keys, spec.missing_rate, spec.seed)
        for j, m in enumerate(MODALITIES):
            masks[m] &= present[:, j : j + 1]
    return masks


def apply(
    arrays: dict[str, Any], spec: ProtocolSpec, *, inplace: bool = False
) -> dict[str, np.ndarray]:
    """Decoded rows -> the model batch (docs/CONTRACTS.md), with hidden content removed.

    ``inplace``: the caller hands over feature arrays it owns (fresh from normalisation, as
    :func:`sslmm_ray.data.pipeline.decode_batch` does), so hidden frames are zeroed in them
    instead of in a copy. Read-only or non-float32 arrays are copied regardless. Why: the
    copy (``np.where``) cost about as much as normalising; zeroing in place is a few
    microseconds per MOSI row (docs/DATA.md, "Streaming throughput").
    """
    keys = sample_keys(arrays["id"])
    masks = observed_masks(arrays, spec, keys)
    # "index" is the sample's stable key (as int64): the same in every batch, worker and epoch.
    batch: dict[str, np.ndarray] = {"index": keys.view(np.int64)}
    for m in MODALITIES:
        mask = masks[m]
        feats = arrays[m]
        if not (inplace and feats.dtype == np.float32 and feats.flags.writeable):
            feats = np.array(feats, dtype=np.float32)  # a copy: never change the caller's
        # assignment, not multiply: NaN or inf garbage in a hidden slot must become exactly 0
        feats[~mask] = np.float32(0.0)
        batch[m] = feats
        batch[f"{m}_mask"] = mask
    if spec.labeled_keys is None:
        labeled = np.ones(len(keys), dtype=bool)
    else:
        labeled = _member(keys, spec.labeled_keys)
    batch["labeled"] = labeled
    batch["label"] = np.where(labeled, np.asarray(arrays["label"], np.float32), np.float32(0.0))
    if spec.graph_keys is not None:
        assert spec.graph_scores is not None
        found, scores = lookup(keys, spec.graph_keys, spec.graph_scores)
        found &= ~labeled
        batch["graph_label"] = np.where(found, scores, np.float32(0.0)).astype(np.float32)
        batch["graph_labeled"] = found
    return batch


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``keys in sorted_keys`` by binary search (O(B log L), no sort of the batch)."""
    if sorted_keys.size == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[pos] == keys


def lookup(
    keys: np.ndarray, sorted_keys: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per key: whether ``sorted_keys`` holds it, and its entry of ``values`` (0 where not)."""
    if sorted_keys.size == 0:
        return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=values.dtype)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    found = sorted_keys[pos] == keys
    return found, np.where(found, values[pos], 0).astype(values.dtype)


def labeled_keys(ids: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Sorted keys of the labeled training rows, to ship to Ray Data tasks."""
    return labeled_keys_of_keys(sample_keys(ids), labels, ratio, seed)


def labeled_keys_of_keys(
    keys: np.ndarray, labels: np.ndarray, ratio: float, seed: int
) -> np.ndarray:
    """:func:`labeled_keys` from the rows' keys: the same draw, no id hashing."""
    keys = np.asarray(keys, _U64)
    return np.sort(keys[labeled_mask_of_keys(keys, labels, ratio, seed)])
