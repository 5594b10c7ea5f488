"""Synthetic multimodal sentiment data with the real MMSA shapes (presets in ``sources``).

The real data sets cannot be downloaded here, so the demo and the tests run on this generator.
Its latent structure is built so that every part of SSLMM has something to find:

Per sample ``i`` (all draws seeded; the model's parameters are shared by the three splits):

1. **Clusters and sentiment.** A cluster ``c_i`` is drawn uniformly from ``K = 16``. Each
   cluster has a mean ``mu_c`` in a shared latent space of ``k = 8`` dimensions (norm 4) and a
   sentiment centre: the 16 values of ``linspace(-2.2, 2.2)`` on the [-3, 3] scale, handed to
   the clusters by a seeded shuffle. The latent sentiment is ``s_i = centre(c_i) + 0.5 * eps``
   and the shared latent ``z_i = (s_i / 1.4, mu_c[1:] + eps)``. Because the cluster -> sentiment
   map is shuffled, sentiment is not a linear function of the features: a model needs labels
   from many clusters to learn it, while unlabeled samples already show the clusters. This is
   the cluster assumption that pseudo-labels and pre-training exploit; with a monotone map
   (generator version 1) a supervised model trained on 128 labels was as good as one trained
   on 642, and unlabeled data had nothing left to add.
2. **Uneven views of the shared latent.** Modality ``m`` sees a noisy, re-weighted copy
   ``v_{i,m} = (g_m * z_i[0], h_m * z_i[1:]) + sigma_m * eps`` with sentiment gains
   ``g = 0.3 * (1.0, 0.7, 0.35)`` (a weak direct sentiment coordinate), cluster gains
   ``h = (1.0, 0.8, 0.5)`` and view noise ``sigma = (0.3, 0.6, 1.0)`` for (text, audio,
   vision): text shows the clusters best, vision worst. Because every view comes from the same
   ``z``, a missing modality can be partly rebuilt from the present ones (not fully: its view
   noise and private part are its own).
3. **Cross-modal interactions.** Interaction latents ``q_text`` (2 values), ``q_audio`` and
   ``q_vision`` (1 each), standard normal, are part of their modality only. The label adds
   ``0.6 * q_text[0] * q_audio + 0.4 * q_text[1] * q_vision``: that part of the sentiment is
   invisible to any single modality and to a linear model on the concatenation.
4. **Private content.** 4 standard normal dimensions per modality, unrelated to the label.
5. **Label.** ``y_i = s_i + interactions + 0.35 * eps`` (label noise), clipped to [-3, 3] and
   rounded to multiples of 1/3 like averaged annotator scores (so some labels are exactly 0,
   which Has0/Non0 metrics treat differently). SIMS: ``y / 3`` rounded to 0.2 in [-1, 1].
6. **Frames.** The modality latent ``x_{i,m} = (v_{i,m}, q_{i,m}, private)`` (``D = 13`` or 14
   values) is spread over the valid frames with a temporal pattern: an envelope
   ``0.6 + 0.8 * exp(-((t/len - a_i) / b_i)^2)`` (a sentiment peak at the same relative time
   ``a_i`` in every modality) times ``x``, plus a smooth per-sample drift made of 3 random
   sinusoids. Each frame is projected to the feature space by a fixed random matrix
   ``P_m`` (``D x d_m``, Gaussian, with the sentiment coordinate's row doubled as affect
   features weigh affect; audio's 5 MOSI dims lose part of the latent), scaled and offset per
   feature dimension, plus i.i.d. observation noise (0.3).
7. **Lengths and padding.** A per-sample duration fraction (Beta(2, 2) x 1.15, capped at 1, so
   some samples fill the window) sets the text length (at least 2 tokens, like [CLS] [SEP]);
   unaligned audio and vision lengths follow it with +-15 % jitter on their own frame counts.
   Aligned data uses the text length for all three. Frames at or beyond a length are zero.

Features are generated in float32, a block of rows at a time (each block drawn from its own
seeded stream), as ``latent (rows, T, D) @ P (D, d)``: MOSI unaligned at scale 1 needs about
the output's own size (~0.45 GB) plus tens of MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

GENERATOR_VERSION = 2
MIN_SPLIT_SIZE = 8

N_CLUSTERS = 16
SENTIMENT_CENTRES = np.linspace(-2.2, 2.2, N_CLUSTERS)  # handed to clusters by a seeded shuffle
SENTIMENT_SPREAD = 0.5
SHARED_DIM = 8
CLUSTER_SEPARATION = 4.0
LINEAR_SENTIMENT = 0.3  # weight of the direct (linear) sentiment coordinate in every view
SENTIMENT_GAIN = {m: LINEAR_SENTIMENT * g for m, g in
                  {"text": 1.0, "audio": 0.7, "vision": 0.35}.items()}
CLUSTER_GAIN = {"text": 1.0, "audio": 0.8, "vision": 0.5}
VIEW_NOISE = {"text": 0.3, "audio": 0.6, "vision": 1.0}
INTERACTION_DIM = {"text": 2, "audio": 1, "vision": 1}
INTERACTION_WEIGHTS = (0.6, 0.4)  # text[0]*audio, text[1]*vision
PRIVATE_DIM = 4
AFFECT_LOADING = 2.0  # row of P for the sentiment coordinate
LABEL_NOISE = 0.35
DRIFT_TERMS = 3
DRIFT_SCALE = 0.4
OBS_NOISE = 0.3
ROWS_PER_BLOCK = 128


def split_sizes(preset: str, scale: float) -> dict[str, int]:
    """Real split sizes times ``scale``, at least :data:`MIN_SPLIT_SIZE` each."""
    p = _preset(preset)
    if not scale > 0:
        raise UserError(f"scale must be > 0, got {scale}")
    return {s: max(MIN_SPLIT_SIZE, round(n * scale)) for s, n in p.split_sizes.items()}


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class _Model:
    """The generator's fixed parameters, shared by all splits of one seed."""

    cluster_means: np.ndarray  # (K, SHARED_DIM - 1)
    cluster_sentiment: np.ndarray  # (K,) a shuffle of SENTIMENT_CENTRES
    projections: dict[str, np.ndarray]  # (D_m, d_m) float32
    feat_scale: dict[str, np.ndarray]  # (d_m,) float32
    feat_offset: dict[str, np.ndarray]  # (d_m,) float32

    @staticmethod
    def draw(p: Preset, rng: np.random.Generator) -> _Model:
        means = rng.standard_normal((N_CLUSTERS, SHARED_DIM - 1))
        means *= CLUSTER_SEPARATION / np.linalg.norm(means, axis=1, keepdims=True)
        sentiment = rng.permutation(SENTIMENT_CENTRES)
        proj, scale, offset = {}, {}, {}
        for m in MODALITIES:
            d_lat = SHARED_DIM + INTERACTION_DIM[m] + PRIVATE_DIM
            d = p.dims[m]
            w = rng.standard_normal((d_lat, d)) / np.sqrt(d_lat)
            w[0] *= AFFECT_LOADING
            proj[m] = w.astype(np.float32)
            scale[m] = np.exp(0.3 * rng.standard_normal(d)).astype(np.float32)
            offset[m] = (0.3 * rng.standard_normal(d)).astype(np.float32)
        return _Model(means, sentiment, proj, scale, offset)


def _sample_latents(
    n: int, model: _Model, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-sample labels (on the [-3, 3] scale, unrounded) and modality latents ``(n, D_m)``."""
    cluster = rng.integers(0, N_CLUSTERS, n)
    s = model.cluster_sentiment[cluster] + SENTIMENT_SPREAD * rng.standard_normal(n)
    rest = model.cluster_means[cluster] + rng.standard_normal((n, SHARED_DIM - 1))
    latents: dict[str, np.ndarray] = {}
    q: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        view = np.concatenate(
            [SENTIMENT_GAIN[m] * (s / 1.4)[:, None], CLUSTER_GAIN[m] * rest], axis=1
        )
        view += VIEW_NOISE[m] * rng.standard_normal(view.shape)
        q[m] = rng.standard_normal((n, INTERACTION_DIM[m]))
        private = rng.standard_normal((n, PRIVATE_DIM))
        latents[m] = np.concatenate([view, q[m], private], axis=1).astype(np.float32)
    w_a, w_v = INTERACTION_WEIGHTS
    y = (
        s
        + w_a * q["text"][:, 0] * q["audio"][:, 0]
        + w_v * q["text"][:, 1] * q["vision"][:, 0]
        + LABEL_NOISE * rng.standard_normal(n)
    )
    return y, latents


def _quantize_label(y: np.ndarray, p: Preset) -> np.ndarray:
    """Map the [-3, 3] score to the preset's range and annotator step."""
    lo, hi = p.label_range
    y = np.clip(y * (hi / 3.0), lo, hi)
    y = np.round(y / p.label_step) * p.label_step
    return np.clip(y, lo, hi).astype(np.float32)


def _sample_lengths(
    n: int, p: Preset, aligned: bool, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Valid frames per modality, correlated through one duration fraction per sample."""
    t_max = p.lengths(aligned)
    frac = np.minimum(1.0, rng.beta(2.0, 2.0, n) * 1.15)
    text = np.clip(np.round(frac * t_max["text"]), 2, t_max["text"]).astype(np.int32)
    lengths = {"text": text}
    for m in ("audio", "vision"):
        if aligned:
            lengths[m] = text.copy()
        else:
            jitter = rng.uniform(0.85, 1.15, n)
            raw = np.round(frac * jitter * t_max[m])
            lengths[m] = np.clip(raw, 1, t_max[m]).astype(np.int32)
    return lengths


def _fill_modality(
    out: np.ndarray,
    latent: np.ndarray,
    lengths: np.ndarray,
    peak: np.ndarray,
    width: np.ndarray,
    m: str,
    model: _Model,
    seed_key: list[int],
) -> None:
    """Write frames for all rows of one modality into ``out`` (zero-initialised), block-wise."""
    n, t_max, _ = out.shape
    d_lat = latent.shape[1]
    t = np.arange(t_max, dtype=np.float32)
    for b, start in enumerate(range(0, n, ROWS_PER_BLOCK)):
        rng = np.random.default_rng([*seed_key, b])
        rows = slice(start, min(n, start + ROWS_PER_BLOCK))
        c = rows.stop - rows.start
        length = lengths[rows].astype(np.float32)
        rel = t[None, :] / length[:, None]  # (c, T) relative time in the valid window
        envelope = 0.6 + 0.8 * np.exp(-(((rel - peak[rows, None]) / width[rows, None]) ** 2))
        freq = rng.uniform(0.5, 3.0, (c, 1, DRIFT_TERMS)).astype(np.float32)
        phase = rng.uniform(0.0, 2 * np.pi, (c, 1, DRIFT_TERMS)).astype(np.float32)
        basis = np.cos(2 * np.pi * freq * rel[:, :, None] + phase)  # (c, T, J)
        coef = DRIFT_SCALE * rng.standard_normal((c, DRIFT_TERMS, d_lat), dtype=np.float32)
        frames = envelope[:, :, None] * latent[rows, None, :] + basis @ coef  # (c, T, D)
        feats = frames.astype(np.float32) @ model.projections[m]  # (c, T, d)
        feats *= model.feat_scale[m]
        feats += model.feat_offset[m]
        feats += OBS_NOISE * rng.standard_normal(feats.shape, dtype=np.float32)
        feats *= (t[None, :] < length[:, None])[:, :, None]
        out[rows] = feats


def _generate_split(
    p: Preset, model: _Model, split: str, n: int, aligned: bool, seed: int, split_no: int
) -> SplitArrays:
    rng = np.random.default_rng([seed, 1, split_no])
    y, latents = _sample_latents(n, model, rng)
    lengths = _sample_lengths(n, p, aligned, rng)
    peak = rng.uniform(0.15, 0.85, n).astype(np.float32)
    width = rng.uniform(0.15, 0.4, n).astype(np.float32)
    t_max = p.lengths(aligned)
    arrays: dict[str, np.ndarray] = {
        "id": np.array([f"synth-{p.name}-{split}-{i:06d}" for i in range(n)]),
        "label": _quantize_label(y, p),
    }
    for mi, m in enumerate(MODALITIES):
        out = np.zeros((n, t_max[m], p.dims[m]), dtype=np.float32)
        _fill_modality(out, latents[m], lengths[m], peak, width, m, model, [seed, 2, split_no, mi])
        arrays[m] = out
        arrays[LENGTH_KEYS[m]] = lengths[m]
    return SplitArrays(**arrays)  # type: ignore[typeddict-item]


def generate(
    preset: str, *, scale: float = 1.0, aligned: bool = False, seed: int = 0
) -> RawDataset:
    """A synthetic data set with ``preset``'s shapes; identical arrays for identical arguments."""
    p = _preset(preset)
    sizes = split_sizes(preset, scale)
    model = _Model.draw(p, np.random.default_rng([seed, 0]))
    splits = {
        split: _generate_split(p, model, split, sizes[split], aligned, seed, k)
        for k, split in enumerate(SPLITS)
    }
    raw = RawDataset(
        name=f"synthetic-{preset}",
        label_range=p.label_range,
        splits=splits,
        stats={
            "source": "synth",
            "generator_version": GENERATOR_VERSION,
            "preset": preset,
            "scale": float(scale),
            "aligned": bool(aligned),
            "seed": int(seed),
        },
    )
    try:
        validate_raw(raw, dims=p.dims)
    except DataError as err:  # a generator bug, not bad input
        raise AssertionError(f"synth produced invalid data: {err}") from err
    return raw
