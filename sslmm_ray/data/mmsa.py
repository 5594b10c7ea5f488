"""Read MMSA processed pickles (``aligned_50.pkl``, ``unaligned_50.pkl``, ``unaligned_39.pkl``).

The files are a dict ``{"train", "valid", "test"}`` of dicts holding ``id``, ``raw_text``,
``text`` (N, L, 768), ``text_bert`` (N, 3, L: token ids, attention mask, segment ids),
``audio`` (N, Ta, da), ``vision`` (N, Tv, dv), ``audio_lengths`` / ``vision_lengths``
(unaligned files) and ``regression_labels`` (SIMS also ``regression_labels_T/A/V``, ignored).

Decisions, each counted in ``RawDataset.stats`` so an import is auditable:

- The text length is the attention-mask sum. Aligned files (all three padded lengths equal)
  use it for audio and vision too, as MMSA's own loader does; unaligned files read
  ``audio_lengths`` / ``vision_lengths``.
- Lengths are clipped to [1, T]: MMSA holds some zero lengths, and a model needs at least one
  frame to pool; the first frame (normally zeros) then stands for the empty modality.
- -inf, +inf and NaN (MOSI's audio holds -inf) become 0 (``nonfinite_replaced``).
- Frames at or beyond a length are set to 0 (``padding_values_zeroed`` counts the values that
  were not already 0), so that the contract's zero padding holds.
- Feature dims and padded lengths come from the file (MMSA-FET, wav2vec, OpenFace, ... give any
  shape); the data set name sets only the label range and the metric family. The splits must
  agree with each other.
- A label outside the data set's range, a missing key, feature dims or lengths that differ
  between splits, or a row count that differs from ``id`` is a :class:`DataError` naming the
  split, key or sample id.
- So is any value of the wrong type (the file is untrusted): features must be numeric arrays;
  labels, lengths and ids arrays or flat lists of scalars; ids unique, at most
  :data:`MAX_ID_CHARS` long, and no larger as a fixed-width array than :func:`_ids` allows.
  Nothing the file holds is converted before its type and size are known.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sslmm_ray.data import safe_pickle
from sslmm_ray.data.sources import (
    LENGTH_KEYS,
    MODALITIES,
    PRESETS,
    SPLITS,
    DataError,
    Preset,
    RawDataset,
    SplitArrays,
    validate_raw,
)
from sslmm_ray.errors import UserError

Dataset = Literal["mosi", "mosei", "sims"]
MMSA_DATASETS: tuple[str, ...] = ("mosi", "mosei", "sims")
_REQUIRED = ("id", "text", "text_bert", "audio", "vision", "regression_labels")
_LENGTH_SOURCES = {"audio": "audio_lengths", "vision": "vision_lengths"}
_CHUNK = 256
_LABEL_TOL = 1e-5
#: Longest sample id accepted (MMSA ids are like ``"video$_$clip"``, far shorter).
MAX_ID_CHARS = 1024
_ID_ARRAY_MARGIN = 64 << 20  # bytes a fixed-width id array may take beyond 16x its characters
_NUMERIC = "fiub"
_NUMBER_TYPES = (int, float, bool, np.integer, np.floating, np.bool_)
_ID_TYPES = (str, bytes, int, np.str_, np.bytes_, np.integer)


def load_pickle(path: str | Path, dataset: Dataset, *, aligned: bool | None = None) -> RawDataset:
    """Import one MMSA pickle from a trusted local path (never a URI) as a :class:`RawDataset`.

    ``aligned`` None detects it: aligned iff text, audio and vision share one padded length.
    """
    _preset(dataset)  # fail on a bad name before reading a large file
    data = safe_pickle.load_local(path)  # its errors name the file already
    try:
        raw = from_mmsa_dict(data, dataset, aligned=aligned)
    except DataError as err:
        raise DataError(f"{path}: {err}") from err
    raw.stats["file"] = Path(str(path)).name
    return raw


def from_mmsa_dict(data: Any, dataset: Dataset, *, aligned: bool | None = None) -> RawDataset:
    """Convert an already unpickled MMSA dict (see :func:`load_pickle`)."""
    preset = _preset(dataset)
    if not isinstance(data, Mapping):
        raise DataError(f"expected a dict with keys {SPLITS}, got {type(data).__name__}")
    missing = [s for s in SPLITS if s not in data]
    if missing:
        raise DataError(f"missing split(s) {missing}; the file has keys {_keys(data)}")
    if aligned is None:
        aligned = _detect_aligned(data["train"])
    stats: dict[str, Any] = {
        "source": "mmsa",
        "dataset": dataset,
        "aligned": aligned,
        "nonfinite_replaced": dict.fromkeys(MODALITIES, 0),
        "lengths_clipped": dict.fromkeys(MODALITIES, 0),
        "padding_values_zeroed": dict.fromkeys(MODALITIES, 0),
    }
    splits = {s: _convert_split(s, data[s], preset, aligned, stats) for s in SPLITS}
    raw = RawDataset(name=dataset, label_range=preset.label_range, splits=splits, stats=stats)
    validate_raw(raw)  # dims and lengths are the file's own: every split must agree
    return raw


def _preset(dataset: str) -> Preset:
    if dataset not in MMSA_DATASETS:
        raise UserError(f"unknown MMSA data set {dataset!r}, expected one of {MMSA_DATASETS}")
    return PRESETS[dataset]


def _detect_aligned(split: Any) -> bool:
    """Only real arrays are looked at: anything else fails later with a key-level error."""
    if not isinstance(split, Mapping):
        raise DataError(f"split 'train' is {type(split).__name__}, expected a dict")
    shapes = [getattr(split.get(m), "shape", None) for m in MODALITIES]
    lengths = {s[1] if isinstance(s, tuple) and len(s) > 1 else None for s in shapes}
    return len(lengths) == 1


def _keys(d: Mapping[Any, Any]) -> list[str]:
    """A bounded, printable list of ``d``'s keys for messages (keys come from the file)."""
    keys = sorted(
        k[:40] if isinstance(k, str) and k.isprintable() else safe_pickle.brief(k) for k in d
    )
    return keys if len(keys) <= 20 else [*keys[:20], f"... {len(keys) - 20} more"]


def _fail(split: str, key: str, msg: str) -> DataError:
    return DataError(f"split {split!r} key {key!r}: {msg}")


def _array(
    split: str, d: Mapping[str, Any], key: str, ndim: int, n: int | None, kinds: str = _NUMERIC
) -> np.ndarray:
    """``d[key]`` as an array with ``ndim`` dims, ``n`` rows and a dtype kind in ``kinds``.

    Lists are taken for 1-D keys only, and only flat lists of numbers: converting nested or
    aliased lists could cost far more than the file (a list of a million references to one
    long list), so they are refused before numpy sees them.
    """
    if key not in d:
        raise _fail(split, key, f"missing (the split has keys {_keys(d)})")
    return _as_array(split, key, d[key], ndim, n, kinds)


def _as_array(
    split: str, key: str, value: Any, ndim: int, n: int | None, kinds: str = _NUMERIC
) -> np.ndarray:
    """See :func:`_array`."""
    if isinstance(value, np.ndarray):
        a = value
    elif ndim == 1 and isinstance(value, list | tuple) and kinds == _NUMERIC:
        if not all(isinstance(x, _NUMBER_TYPES) for x in value):
            raise _fail(split, key, "expected a flat list of numbers")
        a = np.asarray(value, dtype=np.float64)
    else:
        raise _fail(split, key, f"expected a numpy array, got {type(value).__name__}")
    if a.dtype.kind not in kinds:
        what = "numeric" if kinds == _NUMERIC else "ids (str or int)"
        raise _fail(split, key, f"dtype {a.dtype} is not {what}")
    if ndim == 1 and a.ndim == 2 and a.shape[1] == 1:
        a = a.reshape(-1)  # (N, 1) labels or lengths
    if a.ndim != ndim:
        raise _fail(split, key, f"expected {ndim} dimensions, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise _fail(split, key, f"{a.shape[0]} rows, expected {n} (as many as 'id')")
    return a


def _features(split: str, d: Mapping[str, Any], m: str, n: int) -> np.ndarray:
    a = _array(split, d, m, 3, n)
    if a.shape[1] < 1 or a.shape[2] < 1:
        raise _fail(split, m, f"no frames or no features (shape {a.shape})")
    a = np.asarray(a, dtype=np.float32)
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, dtype=np.float32, order="C")
    return a


def _lengths(
    split: str, key: str, values: np.ndarray, t_max: int, m: str, stats: dict[str, Any]
) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise _fail(split, key, "non-finite lengths")
    lengths = np.rint(values).astype(np.int64)
    clipped = np.clip(lengths, 1, t_max)
    stats["lengths_clipped"][m] += int((clipped != lengths).sum())
    return clipped.astype(np.int32)


def _clean(feats: np.ndarray, lengths: np.ndarray, m: str, stats: dict[str, Any]) -> None:
    """In place, a block of rows at a time: non-finite -> 0, padding -> 0 (both counted)."""
    frames = np.arange(feats.shape[1])
    for start in range(0, feats.shape[0], _CHUNK):
        block = feats[start : start + _CHUNK]
        bad = ~np.isfinite(block)
        count = int(bad.sum())
        if count:
            block[bad] = 0.0
            stats["nonfinite_replaced"][m] += count
        pad = frames[None, :] >= lengths[start : start + _CHUNK, None]
        if pad.any():
            stats["padding_values_zeroed"][m] += int(np.count_nonzero(block[pad]))
            block[pad] = 0.0


def _ids(split: str, d: Mapping[str, Any]) -> np.ndarray:
    """The ``id`` key as a (N,) str array, its size checked before numpy pads every id to the
    longest (a million references to one long string would otherwise take terabytes)."""
    value = d["id"]
    if isinstance(value, list | tuple):  # checked element by element below, before numpy
        items = list(value)
    else:
        items = _as_array(split, "id", value, 1, None, kinds="OUSiu").tolist()
    for x in items:
        if not isinstance(x, _ID_TYPES) or (isinstance(x, int) and not -(2**63) <= x < 2**64):
            raise _fail(split, "id", f"ids must be str or 64-bit int, not {safe_pickle.brief(x)}")
    texts = [str(x) for x in items]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(split, "id", f"id {safe_pickle.brief(text)} is not valid unicode") from None
    if len(set(texts)) != len(texts):
        raise _fail(split, "id", "sample ids are not unique")
    longest = max(map(len, texts), default=0)
    if longest > MAX_ID_CHARS:
        raise _fail(split, "id", f"an id of {longest} characters (at most {MAX_ID_CHARS})")
    if 4 * len(texts) * longest > _ID_ARRAY_MARGIN + 16 * sum(map(len, texts)):
        raise _fail(split, "id", f"ids of very uneven lengths (the longest has {longest})")
    return np.array(texts) if texts else np.zeros(0, dtype="<U1")


def _labels(split: str, d: Mapping[str, Any], ids: np.ndarray, preset: Preset) -> np.ndarray:
    labels = _array(split, d, "regression_labels", 1, len(ids)).astype(np.float64)
    lo, hi = preset.label_range
    bad = np.flatnonzero(
        ~np.isfinite(labels) | (labels < lo - _LABEL_TOL) | (labels > hi + _LABEL_TOL)
    )
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"split {split!r} sample id {str(ids[i])!r}: label {labels[i]} outside the "
            f"{preset.name} range [{lo}, {hi}] ({bad.size} such sample(s) in the split)"
        )
    return np.clip(labels, lo, hi).astype(np.float32)


def _convert_split(
    split: str, d: Any, preset: Preset, aligned: bool, stats: dict[str, Any]
) -> SplitArrays:
    if not isinstance(d, Mapping):
        raise DataError(f"split {split!r} is {type(d).__name__}, expected a dict")
    for key in (*_REQUIRED, *(() if aligned else _LENGTH_SOURCES.values())):
        if key not in d:
            raise _fail(split, key, f"missing (the split has keys {_keys(d)})")
    ids = _ids(split, d)
    n = len(ids)
    if n == 0:
        raise _fail(split, "id", "no samples")
    out: dict[str, np.ndarray] = {"id": ids, "label": _labels(split, d, ids, preset)}
    feats = {m: _features(split, d, m, n) for m in MODALITIES}
    bert = _array(split, d, "text_bert", 3, n)
    t_text = feats["text"].shape[1]
    if bert.shape[1] < 2 or bert.shape[2] != t_text:
        raise _fail(split, "text_bert", f"shape {bert.shape}, expected ({n}, 3, {t_text})")
    mask_len = (np.nan_to_num(bert[:, 1, :].astype(np.float64)) > 0).sum(axis=1)
    lengths = {"text": _lengths(split, "text_bert", mask_len, t_text, "text", stats)}
    for m in ("audio", "vision"):
        t_max = feats[m].shape[1]
        if aligned:
            if t_max != t_text:
                raise _fail(split, m, f"{t_max} frames, but aligned data has {t_text} (text)")
            lengths[m] = lengths["text"].copy()
        else:
            key = _LENGTH_SOURCES[m]
            lengths[m] = _lengths(split, key, _array(split, d, key, 1, n), t_max, m, stats)
    for m in MODALITIES:
        _clean(feats[m], lengths[m], m, stats)
        out[m] = feats[m]
        out[LENGTH_KEYS[m]] = lengths[m]
    return SplitArrays(**out)  # type: ignore[typeddict-item]
