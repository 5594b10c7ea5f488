"""MMSA evaluation metrics for multimodal sentiment regression, vectorised in numpy.

The definitions follow MMSA's ``MetricsTop`` (``__eval_mosei_regression`` for MOSI and MOSEI,
``__eval_sims_regression`` for CH-SIMS) so that numbers are comparable with published tables:

MOSI / MOSEI (labels in [-3, 3]):
    Has0_acc_2, Has0_F1_score   negative (< 0) vs non-negative (>= 0), every sample.
    Non0_acc_2, Non0_F1_score   negative vs positive (> 0), samples whose TRUE label is 0 removed.
    Mult_acc_5, Mult_acc_7      ``np.round`` (half to even, as MMSA) of values clipped to
                                [-2, 2] and [-3, 3].
    MAE                         mean |pred - label| on the raw (unclipped) values.
    Corr                        Pearson correlation on the raw values.
CH-SIMS (labels in [-1, 1]): predictions and labels are clipped to [-1, 1] first (MAE and Corr
    included), then binned with MMSA's edges, each bin being the half-open interval (lo, hi]:
    2 classes [-1.01, 0, 1.01], 3 classes [-1.01, -0.1, 0.1, 1.01],
    5 classes [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01]. F1_score is on the 2-class bins.
F1 is sklearn's ``f1_score(average="weighted")``: per-class F1 weighted by true support, a class
with no true and no predicted sample contributing 0 (sklearn's zero_division=0 result).

Where MMSA would produce NaN or crash we return a defined value instead, so a training loop or a
Tune trial never dies on an evaluation corner case:
    * Corr is 0.0 when undefined (constant predictions or constant labels, or one sample);
    * Non0_acc_2 and Non0_F1_score are 0.0 when every true label is exactly 0.
MMSA rounds MOSI/MOSEI results to 4 decimals; we return full precision and leave rounding to
reports. Binning compares in the input's floating dtype, as MMSA does, so a float32 value equal
to float32(0.1) falls in the same bin as in MMSA.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sslmm_ray.errors import UserError

__all__ = [
    "METRIC_NAMES",
    "compute_metrics",
    "dataset_family",
    "headline_metric",
    "selection_metric",
    "higher_is_better",
]

METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "mosi": (
        "Has0_acc_2",
        "Has0_F1_score",
        "Non0_acc_2",
        "Non0_F1_score",
        "Mult_acc_5",
        "Mult_acc_7",
        "MAE",
        "Corr",
    ),
    "sims": ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"),
}
METRIC_NAMES["mosei"] = METRIC_NAMES["mosi"]

_HEADLINE = {"mosi": "Non0_acc_2", "mosei": "Non0_acc_2", "sims": "Mult_acc_2"}
_LOWER_IS_BETTER = frozenset({"MAE"})

SIMS_EDGES_2 = (-1.01, 0.0, 1.01)
SIMS_EDGES_3 = (-1.01, -0.1, 0.1, 1.01)
SIMS_EDGES_5 = (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01)


def dataset_family(dataset: str) -> str:
    """Map a data set name to its metric family: "mosi", "mosei" or "sims".

    Accepts the plain names and decorated ones such as "synthetic-mosi", "MOSEI" or "simsv2"
    (one of the name's tokens starts with the family), so synthetic presets score like the real
    data set they imitate.
    """
    name = dataset.strip().lower()
    if name in METRIC_NAMES:
        return name
    found = {
        fam
        for token in re.split(r"[^a-z0-9]+", name)
        for fam in METRIC_NAMES
        if token.startswith(fam)
    }
    if len(found) != 1:
        raise UserError(
            f"cannot tell the metric family of dataset {dataset!r}: "
            f"expected a name containing one of {sorted(METRIC_NAMES)}"
        )
    return found.pop()


def headline_metric(dataset: str) -> str:
    """The paper's "binary accuracy": Non0_acc_2 for MOSI/MOSEI, Mult_acc_2 for SIMS."""
    return _HEADLINE[dataset_family(dataset)]


def higher_is_better(name: str) -> bool:
    """Direction of a metric, for model selection and Tune's ``mode`` (MAE is the only loss)."""
    known = set().union(*METRIC_NAMES.values())
    if name not in known:
        raise UserError(f"unknown metric {name!r}; known: {sorted(known)}")
    return name not in _LOWER_IS_BETTER


def selection_metric(choice: str, dataset: str) -> tuple[str, str]:
    """(metric, mode) of a ``finetune.selection`` choice: MAE, Corr or the headline metric."""
    name = headline_metric(dataset) if choice == "headline" else choice
    return name, "max" if higher_is_better(name) else "min"


def compute_metrics(preds: Any, labels: Any, dataset: str) -> dict[str, float]:
    """All MMSA regression metrics of ``dataset``'s family, as plain floats.

    ``preds`` and ``labels`` are numpy arrays, torch tensors (any device, grad or not) or
    sequences, flattened to one value per sample.
    """
    family = dataset_family(dataset)
    y_pred = _as_flat_float(preds, "preds")
    y_true = _as_flat_float(labels, "labels")
    if y_pred.shape != y_true.shape:
        raise ValueError(f"preds and labels differ in size: {y_pred.size} vs {y_true.size} values")
    if y_pred.size == 0:
        raise ValueError("cannot compute metrics on zero samples")
    out = _sims(y_pred, y_true) if family == "sims" else _mosei(y_pred, y_true)
    return {k: float(v) for k, v in out.items()}


def _as_flat_float(x: Any, what: str) -> np.ndarray:
    """Flatten to a 1-D floating array, keeping float32/float64 so binning matches MMSA."""
    if hasattr(x, "detach"):  # torch tensor: no torch import needed here
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x).reshape(-1)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    n_bad = int(np.count_nonzero(~np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"{what} hold {n_bad} non-finite value(s) (NaN or inf)")
    return arr


def _mosei(y_pred: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    non0 = y_true != 0
    if non0.any():
        non0_acc = _accuracy(y_pred[non0] > 0, y_true[non0] > 0)
        non0_f1 = _weighted_f1(y_true[non0] > 0, y_pred[non0] > 0)
    else:  # MMSA crashes here; see the module docstring
        non0_acc = non0_f1 = 0.0
    has0_true, has0_pred = y_true >= 0, y_pred >= 0
    return {
        "Has0_acc_2": _accuracy(has0_pred, has0_true),
        "Has0_F1_score": _weighted_f1(has0_true, has0_pred),
        "Non0_acc_2": non0_acc,
        "Non0_F1_score": non0_f1,
        "Mult_acc_5": _round_acc(y_pred, y_true, 2.0),
        "Mult_acc_7": _round_acc(y_pred, y_true, 3.0),
        "MAE": _mae(y_pred, y_true),
        "Corr": _pearson(y_pred, y_true),
    }


def _sims(y_pred: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    y_pred = np.clip(y_pred, -1.0, 1.0)
    y_true = np.clip(y_true, -1.0, 1.0)
    pred2, true2 = _bins(y_pred, SIMS_EDGES_2), _bins(y_true, SIMS_EDGES_2)
    return {
        "Mult_acc_2": _accuracy(pred2, true2),
        "Mult_acc_3": _accuracy(_bins(y_pred, SIMS_EDGES_3), _bins(y_true, SIMS_EDGES_3)),
        "Mult_acc_5": _accuracy(_bins(y_pred, SIMS_EDGES_5), _bins(y_true, SIMS_EDGES_5)),
        "F1_score": _weighted_f1(true2, pred2),
        "MAE": _mae(y_pred, y_true),
        "Corr": _pearson(y_pred, y_true),
    }


def _bins(x: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Class i for x in (edges[i], edges[i+1]]; edges cast to x's dtype as MMSA's comparisons."""
    return np.searchsorted(np.asarray(edges, dtype=x.dtype), x, side="left") - 1


def _round_acc(y_pred: np.ndarray, y_true: np.ndarray, bound: float) -> float:
    p = np.round(np.clip(y_pred, -bound, bound))
    t = np.round(np.clip(y_true, -bound, bound))
    return _accuracy(p, t)


def _accuracy(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def _mae(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    return float(np.mean(np.abs(y_pred.astype(np.float64) - y_true.astype(np.float64))))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0.0 when undefined (a constant side), instead of NaN and a warning."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    x = x.astype(np.float64) - x.mean(dtype=np.float64)
    y = y.astype(np.float64) - y.mean(dtype=np.float64)
    denom = np.sqrt(np.dot(x, x) * np.dot(y, y))
    if not np.isfinite(denom) or denom <= 0.0:
        return 0.0
    return float(np.clip(np.dot(x, y) / denom, -1.0, 1.0))


def _weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn ``f1_score(y_true, y_pred, average="weighted")`` for any discrete labels."""
    classes, inv = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    n, k = y_true.size, classes.size
    t, p = inv[:n], inv[n:]
    tp = np.bincount(t[t == p], minlength=k).astype(np.float64)
    support = np.bincount(t, minlength=k).astype(np.float64)
    predicted = np.bincount(p, minlength=k).astype(np.float64)
    denom = support + predicted  # = 2TP + FP + FN
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(k), where=denom > 0)
    total = support.sum()
    return float(np.dot(f1, support) / total) if total > 0 else 0.0
