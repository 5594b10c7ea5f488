"""What every data source hands to the canonical store: :class:`RawDataset`.

Both sources (``synth.generate`` and ``mmsa.load_pickle``) return the same in-memory shape so
that the store, the CLI and the tests deal with one contract (docs/CONTRACTS.md). The presets
record the real shapes of CMU-MOSI, CMU-MOSEI and CH-SIMS in one place, so the generator and
the importer's dimension checks cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from sslmm_ray.config import MODALITIES
from sslmm_ray.errors import UserError

SPLITS: tuple[str, ...] = ("train", "valid", "test")
LENGTH_KEYS: dict[str, str] = {m: f"{m}_len" for m in MODALITIES}
SPLIT_KEYS: tuple[str, ...] = ("id", "label", *MODALITIES, *LENGTH_KEYS.values())

# Rows checked per step in the O(data) checks, so that no full-size boolean mask is built.
_CHUNK = 256


class DataError(UserError):
    """Input data is malformed; the message names the split, the key and the sample id."""


class SplitArrays(TypedDict):
    """One split: ``N`` samples, features zero-padded beyond each modality's valid length."""

    id: np.ndarray  # (N,) str
    label: np.ndarray  # (N,) float32
    text: np.ndarray  # (N, T_text, d_text) float32
    audio: np.ndarray  # (N, T_audio, d_audio) float32
    vision: np.ndarray  # (N, T_vision, d_vision) float32
    text_len: np.ndarray  # (N,) int32, 1 <= len <= T
    audio_len: np.ndarray
    vision_len: np.ndarray


@dataclass(frozen=True)
class Preset:
    """The real shapes of one data set (MMSA processed features)."""

    name: str
    dims: Mapping[str, int]
    lengths_unaligned: Mapping[str, int]
    aligned_length: int
    split_sizes: Mapping[str, int]
    label_range: tuple[float, float]
    # Labels are means of annotator scores: MOSI/MOSEI multiples of 1/3, SIMS of 0.2.
    label_step: float

    def lengths(self, aligned: bool) -> dict[str, int]:
        """Maximum frames per modality (aligned: every modality follows the text tokens)."""
        if aligned:
            return {m: self.aligned_length for m in MODALITIES}
        return dict(self.lengths_unaligned)


_MOSI = Preset(
    name="mosi",
    dims={"text": 768, "audio": 5, "vision": 20},
    lengths_unaligned={"text": 50, "audio": 375, "vision": 500},
    aligned_length=50,
    split_sizes={"train": 1284, "valid": 229, "test": 686},
    label_range=(-3.0, 3.0),
    label_step=1.0 / 3.0,
)

PRESETS: dict[str, Preset] = {
    "mosi": _MOSI,
    "mosei": Preset(
        name="mosei",
        dims={"text": 768, "audio": 74, "vision": 35},
        lengths_unaligned={"text": 50, "audio": 500, "vision": 500},
        aligned_length=50,
        split_sizes={"train": 16326, "valid": 1871, "test": 4659},
        label_range=(-3.0, 3.0),
        label_step=1.0 / 3.0,
    ),
    "sims": Preset(
        name="sims",
        dims={"text": 768, "audio": 33, "vision": 709},
        lengths_unaligned={"text": 39, "audio": 400, "vision": 55},
        aligned_length=39,
        split_sizes={"train": 1368, "valid": 456, "test": 457},
        label_range=(-1.0, 1.0),
        label_step=0.2,
    ),
    # MOSI's shapes at any size (--scale 10 gives ~22k samples): for throughput and scaling runs.
    "scalable": Preset(
        name="scalable",
        dims=_MOSI.dims,
        lengths_unaligned=_MOSI.lengths_unaligned,
        aligned_length=_MOSI.aligned_length,
        split_sizes=_MOSI.split_sizes,
        label_range=_MOSI.label_range,
        label_step=_MOSI.label_step,
    ),
}


@dataclass
class RawDataset:
    """A whole data set in memory, as a source produced it (see docs/CONTRACTS.md)."""

    name: str
    label_range: tuple[float, float]
    splits: dict[str, SplitArrays]
    stats: dict[str, Any] = field(default_factory=dict)

    def dims(self) -> dict[str, int]:
        """Feature dimension per modality (taken from the first split)."""
        first = next(iter(self.splits.values()))
        return {m: int(first[m].shape[2]) for m in MODALITIES}

    def max_lengths(self) -> dict[str, int]:
        """Padded length T per modality (taken from the first split)."""
        first = next(iter(self.splits.values()))
        return {m: int(first[m].shape[1]) for m in MODALITIES}

    def counts(self) -> dict[str, int]:
        """Samples per split."""
        return {name: int(s["label"].shape[0]) for name, s in self.splits.items()}


def _fail(split: str, msg: str) -> DataError:
    return DataError(f"split {split!r}: {msg}")


def _check_split_shapes(split: str, arrays: Mapping[str, np.ndarray]) -> int:
    """Keys, dtypes and shapes of one split; returns N."""
    missing = [k for k in SPLIT_KEYS if k not in arrays]
    if missing:
        raise _fail(split, f"missing key(s) {missing}")
    n = int(np.shape(arrays["id"])[0]) if np.ndim(arrays["id"]) == 1 else -1
    if n < 1:
        shape = np.shape(arrays["id"])
        raise _fail(split, f"key 'id' must be a non-empty 1-D array, got shape {shape}")
    for key in SPLIT_KEYS:
        a = arrays[key]
        if not isinstance(a, np.ndarray):
            raise _fail(split, f"key {key!r} is {type(a).__name__}, expected numpy.ndarray")
        want_ndim = 3 if key in MODALITIES else 1
        if a.ndim != want_ndim or a.shape[0] != n:
            raise _fail(
                split, f"key {key!r} has shape {a.shape}, expected {want_ndim}-D with {n} rows"
            )
    if arrays["id"].dtype.kind != "U":
        raise _fail(split, f"key 'id' has dtype {arrays['id'].dtype}, expected str")
    if len(set(arrays["id"].tolist())) != n:
        raise _fail(split, "sample ids are not unique")
    for key in ("label", *MODALITIES):
        if arrays[key].dtype != np.float32:
            raise _fail(split, f"key {key!r} has dtype {arrays[key].dtype}, expected float32")
    for key in LENGTH_KEYS.values():
        if arrays[key].dtype != np.int32:
            raise _fail(split, f"key {key!r} has dtype {arrays[key].dtype}, expected int32")
    return n


def _check_rows(split: str, arrays: Mapping[str, np.ndarray], lo: float, hi: float) -> None:
    """Per-sample checks (O(N)): labels in range, lengths in [1, T]."""
    ids = arrays["id"]
    label = arrays["label"]
    bad = np.flatnonzero(~np.isfinite(label) | (label < lo) | (label > hi))
    if bad.size:
        i = int(bad[0])
        raise _fail(
            split,
            f"sample id {str(ids[i])!r}: label {float(label[i])} outside [{lo}, {hi}] "
            f"({bad.size} such sample(s))",
        )
    for m in MODALITIES:
        lengths = arrays[LENGTH_KEYS[m]]
        t = arrays[m].shape[1]
        bad = np.flatnonzero((lengths < 1) | (lengths > t))
        if bad.size:
            i = int(bad[0])
            raise _fail(
                split,
                f"sample id {str(ids[i])!r}: {m}_len {int(lengths[i])} outside [1, {t}] "
                f"({bad.size} such sample(s))",
            )


def _check_values(split: str, arrays: Mapping[str, np.ndarray]) -> None:
    """O(data) checks, chunked: finite features and zeros beyond each valid length."""
    ids = arrays["id"]
    for m in MODALITIES:
        feats, lengths = arrays[m], arrays[LENGTH_KEYS[m]]
        frames = np.arange(feats.shape[1])
        for start in range(0, feats.shape[0], _CHUNK):
            block = feats[start : start + _CHUNK]
            finite = np.isfinite(block).all(axis=(1, 2))
            if not finite.all():
                i = start + int(np.flatnonzero(~finite)[0])
                raise _fail(split, f"sample id {str(ids[i])!r}: non-finite values in {m!r}")
            pad = frames[None, :] >= lengths[start : start + _CHUNK, None]
            dirty = (np.abs(block).max(axis=2) * pad).any(axis=1)
            if dirty.any():
                i = start + int(np.flatnonzero(dirty)[0])
                raise _fail(split, f"sample id {str(ids[i])!r}: {m!r} is not zero beyond {m}_len")


def validate_raw(
    raw: RawDataset,
    *,
    dims: Mapping[str, int] | None = None,
    deep: bool = False,
) -> None:
    """Check ``raw`` against the contract, raising :class:`DataError` on the first problem.

    Shapes, dtypes, unique ids, labels within ``raw.label_range`` and lengths within [1, T] are
    always checked (cheap). ``dims`` pins the feature dimensions (e.g. a preset's). ``deep``
    also scans every value for non-finite numbers and non-zero padding (reads all the data).
    """
    if not raw.splits:
        raise DataError(f"data set {raw.name!r} has no splits")
    unknown = sorted(set(raw.splits) - set(SPLITS))
    if unknown:
        raise DataError(f"data set {raw.name!r}: unknown split(s) {unknown}, expected {SPLITS}")
    lo, hi = raw.label_range
    if not lo < hi:
        raise DataError(f"data set {raw.name!r}: empty label range {raw.label_range}")
    expected_dims = dict(dims) if dims is not None else None
    expected_t: dict[str, int] | None = None
    for split, arrays in raw.splits.items():
        _check_split_shapes(split, arrays)
        got_dims = {m: int(arrays[m].shape[2]) for m in MODALITIES}
        got_t = {m: int(arrays[m].shape[1]) for m in MODALITIES}
        if expected_dims is None:
            expected_dims = got_dims
        for m in MODALITIES:
            if got_dims[m] != expected_dims[m]:
                raise _fail(
                    split, f"key {m!r} has feature dim {got_dims[m]}, expected {expected_dims[m]}"
                )
        if expected_t is None:
            expected_t = got_t
        elif got_t != expected_t:
            raise _fail(split, f"padded lengths {got_t} differ from other splits' {expected_t}")
        _check_rows(split, arrays, lo, hi)
        if deep:
            _check_values(split, arrays)
