"""A real-data benchmark that ships offline: scikit-learn's handwritten digits as MMSA data.

scikit-learn bundles 1,797 real 8x8 images of handwritten digits (UCI optdigits). They become an
MMSA processed pickle with three modalities of different nature, frame counts and scales, so
the benchmark goes through the same ``import-mmsa`` path as CMU-MOSI:

- ``text``: the image rows as a sequence, 8 frames x 8 pixel intensities (0..16);
- ``audio``: the 2-D DCT-II coefficients of the image, one frame of 64 (scales spread over
  three orders of magnitude, as real acoustic features are);
- ``vision``: gradient-orientation histograms (9 unsigned bins, magnitude-weighted) of each
  2x2-pixel cell, 16 frames x 9.

Labels are ``(digit - 4.5) / 1.5`` in [-3, 3]: the sign says digit >= 5, and the scale is
MOSI's, so the MMSA metrics apply unchanged. The split (60/20/20, stratified by digit) is a
pure function of ``seed``; label ratio and missingness come later from the protocols module.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_FRACTIONS = {"train": 0.6, "valid": 0.2, "test": 0.2}
ORIENTATION_BINS = 9
CELL = 2


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise ImportError(
            "the digits benchmark needs scikit-learn: pip install 'sslmm-ray[bench]'"
        ) from err
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def dct_features(images: np.ndarray) -> np.ndarray:
    """(N, 64) orthonormal 2-D DCT-II coefficients, row-major (lowest frequencies first)."""
    from scipy.fft import dctn

    return dctn(images, type=2, axes=(1, 2), norm="ortho").reshape(len(images), -1)


def orientation_histograms(images: np.ndarray) -> np.ndarray:
    """(N, cells, bins): magnitude-weighted unsigned gradient orientations per 2x2 cell."""
    gy, gx = np.gradient(images, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)  # unsigned: [0, pi)
    bins = np.minimum((angle / np.pi * ORIENTATION_BINS).astype(np.int64), ORIENTATION_BINS - 1)
    n, h, w = images.shape
    onehot = np.zeros((n, h, w, ORIENTATION_BINS), np.float32)
    np.put_along_axis(onehot, bins[..., None], magnitude[..., None], axis=-1)
    cells = onehot.reshape(n, h // CELL, CELL, w // CELL, CELL, ORIENTATION_BINS)
    return cells.sum(axis=(2, 4)).reshape(n, -1, ORIENTATION_BINS)


def split_indices(targets: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified by digit: each split holds each digit in the same proportion."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLIT_FRACTIONS}
    for digit in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == digit))
        n_train = int(round(SPLIT_FRACTIONS["train"] * len(members)))
        n_valid = int(round(SPLIT_FRACTIONS["valid"] * len(members)))
        parts["train"].append(members[:n_train])
        parts["valid"].append(members[n_train : n_train + n_valid])
        parts["test"].append(members[n_train + n_valid :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def labels_of(digits: np.ndarray) -> np.ndarray:
    return ((digits.astype(np.float32) - 4.5) / 1.5).astype(np.float32)


def build(seed: int = 0) -> dict[str, Any]:
    """The MMSA dict (``train`` / ``valid`` / ``test``), deterministic in ``seed``."""
    images, digits = _load_digits()
    modalities = {
        "text": images,  # (N, 8 rows, 8 pixels)
        "audio": dct_features(images)[:, None, :],  # (N, 1, 64)
        "vision": orientation_histograms(images),  # (N, 16, 9)
    }
    out: dict[str, Any] = {}
    for split, idx in split_indices(digits, seed).items():
        n, t_text = len(idx), modalities["text"].shape[1]
        bert = np.zeros((n, 3, t_text), np.float32)
        bert[:, 1, :] = 1.0  # every row of the image is a valid "token"
        out[split] = {
            "id": np.array([f"digit{int(i):04d}" for i in idx], dtype=object),
            "raw_text": np.array([f"digit {int(d)}" for d in digits[idx]], dtype=object),
            "text": modalities["text"][idx].astype(np.float32),
            "text_bert": bert,
            "audio": modalities["audio"][idx].astype(np.float32),
            "vision": modalities["vision"][idx].astype(np.float32),
            "audio_lengths": np.full(n, modalities["audio"].shape[1], np.int64),
            "vision_lengths": np.full(n, modalities["vision"].shape[1], np.int64),
            "regression_labels": labels_of(digits[idx]),
        }
    return out


def write_pickle(path: str | Path, seed: int = 0) -> Path:
    """Write the MMSA pickle that ``sslmm data import-mmsa --dataset mosi`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(build(seed), f, protocol=4)
    return path
