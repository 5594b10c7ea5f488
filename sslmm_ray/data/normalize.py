"""Per-modality, per-feature standardisation with training-split statistics.

Why: real feature sets mix scales that differ by orders of magnitude (COVAREP audio next to
BERT text, OpenFace intensities next to pixel counts); on raw features a reconstruction loss is
dominated by the largest feature and the model can fall to chance. Every feature is therefore
mapped to ``(x - mean) / std`` with the mean and std of the *valid* frames of the *training*
split (valid/test never leak into the statistics).

Where: the store's writer computes the moments of each shard of the training split as it writes
it (:func:`split_moments`), merges them in shard order (:func:`merge_moments`) and puts the
result into the manifest (``normalization``); :func:`normalize_features` is the one function that
applies it, called by :func:`sslmm_ray.data.store.decode_table` on every decode path (Ray Data
pipeline, batch prediction, benchmarks). Padding frames stay exactly zero, and the protocols
zero missing content afterwards as before. ``data.normalize=false`` switches it off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sslmm_ray.config import MODALITIES
from sslmm_ray.data.sources import DataError

if TYPE_CHECKING:
    from sslmm_ray.data.store import Manifest

#: A std below ``STD_FLOOR``, or below ``STD_FLOOR_REL * |mean|`` (about one float32 rounding
#: step of the values), is not signal: the feature is treated as constant and gets std 1
#: (centred, never divided by ~0).
STD_FLOOR = 1e-6
STD_FLOOR_REL = 1e-7
#: Values per statistics chunk (~32 MiB as float64): bounds the temporaries whatever the size
#: of the split, while keeping numpy's per-call overhead negligible.
CHUNK_VALUES = 1 << 22

#: {modality: {"mean": [...], "std": [...]}}, as stored in the manifest.
Statistics = dict[str, dict[str, list[float]]]


class Moments:
    """Count, mean and sum of squared deviations per feature, merged chunk by chunk.

    Chan et al.'s pairwise update: each chunk's moments are computed around the chunk's own
    mean in float64 and merged, which stays exact where sums of x and x^2 would cancel (a
    feature with mean 1e6 and std 1).
    """

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros(dim, np.float64)

    def update(self, frames: np.ndarray) -> None:
        """Add ``frames`` of shape (k, dim)."""
        k = len(frames)
        if k == 0:
            return
        x = frames.astype(np.float64)
        chunk = Moments(x.shape[1])
        chunk.count = k
        chunk.mean = x.mean(axis=0)
        x -= chunk.mean
        np.square(x, out=x)
        chunk.m2 = x.sum(axis=0)
        self.merge(chunk)

    def merge(self, other: Moments) -> None:
        """Add the moments of another part of the data (Chan's update; ``other`` unchanged)."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + (other.m2 + delta**2 * (self.count * other.count / total))
        self.count = total

    def finish(self) -> dict[str, list[float]]:
        """Mean and population std, the std floored to 1 for constant features."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        std[std < np.maximum(STD_FLOOR, STD_FLOOR_REL * np.abs(self.mean))] = 1.0
        return {"mean": self.mean.tolist(), "std": std.tolist()}


def valid_frames(lengths: np.ndarray, length: int) -> np.ndarray:
    """(N, T) bool: frame index < the row's valid length."""
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def split_moments(arrays: Mapping[str, np.ndarray]) -> dict[str, Moments]:
    """Per modality, the moments of the valid frames of ``arrays`` (a split or part of one).

    One pass over row chunks; no copy of the whole split is made. The streaming writer
    computes these per shard and merges them in shard order (:func:`merge_moments`).
    """
    out: dict[str, Moments] = {}
    for m in MODALITIES:
        feats, lengths = arrays[m], arrays[f"{m}_len"]
        n, t, d = feats.shape
        moments = Moments(d)
        step = max(1, CHUNK_VALUES // max(1, t * d))
        for start in range(0, n, step):
            chunk = feats[start : start + step]
            moments.update(chunk[valid_frames(lengths[start : start + step], t)])
        out[m] = moments
    return out


def merge_moments(parts: Iterable[Mapping[str, Moments]]) -> dict[str, Moments]:
    """The moments of the union of ``parts``, merged in the order given (deterministic)."""
    out: dict[str, Moments] = {}
    for part in parts:
        for m, moments in part.items():
            if m not in out:
                out[m] = Moments(len(moments.mean))
            out[m].merge(moments)
    return out


def finish_statistics(moments: Mapping[str, Moments]) -> Statistics:
    """Moments -> the manifest's statistics; non-finite ones are a :class:`DataError`."""
    out: Statistics = {}
    for m in MODALITIES:
        stats = moments[m].finish()
        if not np.isfinite(stats["mean"]).all() or not np.isfinite(stats["std"]).all():
            raise DataError(f"train split: '{m}' holds non-finite values in valid frames")
        out[m] = stats
    return out


def train_statistics(arrays: Mapping[str, np.ndarray]) -> Statistics:
    """Per-modality, per-feature mean and std over the valid frames of one split (train)."""
    return finish_statistics(split_moments(arrays))


def check_statistics(stats: Any, dims: Mapping[str, int]) -> str | None:
    """Why ``stats`` (from a manifest) is unusable for these dims, or None when it is fine."""
    if not isinstance(stats, dict) or set(stats) != set(dims):
        return f"normalization must hold exactly the modalities {sorted(dims)}"
    for m, d in dims.items():
        entry = stats[m]
        if not isinstance(entry, dict) or set(entry) != {"mean", "std"}:
            return f"normalization['{m}'] must hold 'mean' and 'std'"
        try:
            mean = np.asarray(entry["mean"], np.float64)
            std = np.asarray(entry["std"], np.float64)
        except (TypeError, ValueError):
            return f"normalization['{m}'] holds non-numeric values"
        if mean.shape != (d,) or std.shape != (d,):
            return f"normalization['{m}'] must have {d} values per statistic"
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            return f"normalization['{m}'] holds a non-finite mean or a std <= 0"
    return None


@dataclass(frozen=True)
class Normalizer:
    """Float32 ``mean`` and ``1/std`` per modality, ready to apply to decoded batches."""

    mean: dict[str, np.ndarray]
    inv_std: dict[str, np.ndarray]

    @classmethod
    def from_statistics(cls, stats: Statistics) -> Normalizer:
        return cls(
            mean={m: np.asarray(s["mean"], np.float32) for m, s in stats.items()},
            inv_std={m: (1.0 / np.asarray(s["std"], np.float64)).astype(np.float32)
                     for m, s in stats.items()},
        )


def normalizer_for(manifest: Manifest, enabled: bool) -> Normalizer | None:
    """The normaliser a model trained with ``data.normalize=enabled`` needs, or None.

    A store written before statistics existed cannot serve a normalised model: one-line error.
    """
    if not enabled:
        return None
    if not manifest.normalization:
        raise DataError(
            f"{manifest.uri}: the manifest has no normalisation statistics (written by an "
            "older sslmm-ray or without a train split); re-run `sslmm data synth` / "
            "`sslmm data import-mmsa`, or set data.normalize=false"
        )
    return Normalizer.from_statistics(manifest.normalization)


def normalize_features(arrays: dict[str, Any], norm: Normalizer | None) -> dict[str, Any]:
    """``(x - mean) / std`` on valid frames; padding frames stay exactly 0.

    Returns a new dict with new feature arrays: decoded arrays are read-only views of Arrow
    buffers, so nothing is changed in place. ``norm=None`` returns ``arrays`` unchanged.
    """
    if norm is None:
        return arrays
    out = dict(arrays)
    for m, mean in norm.mean.items():
        x = arrays[m]
        y = np.subtract(x, mean, dtype=np.float32)
        y *= norm.inv_std[m]
        y[~valid_frames(arrays[f"{m}_len"], x.shape[1])] = 0.0
        out[m] = y
    return out
