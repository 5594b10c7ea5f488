"""Simple peers for the accuracy benchmark, on exactly the data SSLMM sees.

A method's accuracy means little without a bar to clear, so every benchmark cell also trains
five scikit-learn models on the same splits, labeled rows and missing-modality masks:

- regressors (scored like SSLMM, every MMSA metric): ridge (alpha by leave-one-out on the labeled
  rows) and an MLP (one hidden layer of 100);
- sign classifiers (positive = label > 0): logistic regression, self-training around it, and
  label spreading (knn kernel; a test row that no label reaches through the graph gets the
  labeled majority). They predict no score, so only the binary metrics exist for them
  (Has0/Non0 accuracy and F1 from the predicted sign; MAE, Corr and Mult_acc_* are None).

Same data, by construction: rows come from the canonical store the benchmark imported, and the
protocol (label withholding, missingness) is :func:`protocols.apply` with the very
``ProtocolSpec`` objects that :func:`pipeline.finetune_specs` builds for fine-tuning, so a change
to either is followed here. Supervised peers fit on the labeled training rows only; self-training
and label spreading also get the unlabeled training rows, labels withheld (they are 0 after the
protocol anyway). Features: per modality the frames flattened (T x d), every value of a frame the
protocol hides (or padding) treated as unobserved, then mean-imputed with the mean of the rows
the peer fits on, then standardised on those rows. Each peer is seeded by the run seed (label
spreading has no randomness: the seed still moves its labeled rows and masks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from sslmm_ray.config import MODALITIES, FinetuneConfig, MissingConfig
from sslmm_ray.data import pipeline, protocols, store
from sslmm_ray.data.store import Manifest
from sslmm_ray.metrics import compute_metrics, dataset_family
from sslmm_ray.storage import StorageOptions

REGRESSORS: tuple[str, ...] = ("ridge", "mlp")
CLASSIFIERS: tuple[str, ...] = ("logistic", "self_training", "label_spreading")
PEERS: tuple[str, ...] = (*REGRESSORS, *CLASSIFIERS)
#: Peers that also read the unlabeled training rows (features only).
SEMI_SUPERVISED: frozenset[str] = frozenset({"self_training", "label_spreading"})
#: Metrics a predicted sign defines (mosi/mosei and sims names); the others need a score.
SIGN_METRICS: frozenset[str] = frozenset(
    {"Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_2", "F1_score"}
)
#: Sklearn's marker for "no label" in semi-supervised fits.
UNLABELED = -1
RIDGE_ALPHAS = tuple(np.logspace(-2, 4, 13))
MLP_MAX_ITER = 500


@dataclass(frozen=True)
class Split:
    """One split after the protocol: NaN where the peer must not look."""

    ids: np.ndarray  # (N,) object
    x: np.ndarray  # (N, sum_m T_m * d_m) float64, NaN = hidden by the protocol or padding
    label: np.ndarray  # (N,) float32, 0 where withheld
    labeled: np.ndarray  # (N,) bool
    present: np.ndarray  # (N, 3) bool: modality has at least one observed frame


def design(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Model batch -> (features with NaN where unobserved, per-modality presence)."""
    cols, present = [], []
    for m in MODALITIES:
        feats, mask = batch[m], batch[f"{m}_mask"]
        n, t, d = feats.shape
        cols.append(np.where(mask[:, :, None], feats, np.nan).reshape(n, t * d))
        present.append(mask.any(axis=1))
    return np.concatenate(cols, axis=1).astype(np.float64), np.stack(present, axis=1)


def load_splits(
    manifest: Manifest,
    ft: FinetuneConfig,
    options: StorageOptions | None = None,
    splits: tuple[str, ...] = ("train", "test"),
    *,
    missing: MissingConfig | None = None,
) -> dict[str, Split]:
    """Read splits from the store and apply the fine-tuning protocol specs, unchanged."""
    specs = pipeline.finetune_specs(manifest, ft, options, missing=missing)
    out = {}
    for split in splits:
        rows = store.read_split(manifest, split, options)
        batch = protocols.apply(rows, specs[split])
        x, present = design(batch)
        out[split] = Split(
            np.asarray(rows["id"], dtype=object), x, batch["label"], batch["labeled"], present
        )
    return out


def preprocessing() -> Any:
    """Mean imputation of unobserved values, then standardisation (fitted on the fit rows)."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # keep_empty_features: a column no fit row observes becomes 0 instead of vanishing, so
    # train and test keep one layout.
    return make_pipeline(
        SimpleImputer(strategy="mean", keep_empty_features=True), StandardScaler()
    )


def estimator(name: str, seed: int) -> Any:
    """The peer's sklearn estimator (after preprocessing), seeded where it has randomness."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier

    def logistic() -> LogisticRegression:
        return LogisticRegression(max_iter=2000, random_state=seed)

    if name == "ridge":
        return RidgeCV(alphas=RIDGE_ALPHAS)
    if name == "mlp":
        return MLPRegressor(hidden_layer_sizes=(100,), max_iter=MLP_MAX_ITER, random_state=seed)
    if name == "logistic":
        return logistic()
    if name == "self_training":
        return SelfTrainingClassifier(logistic())  # positional: `estimator` in every version
    if name == "label_spreading":
        return LabelSpreading(kernel="knn", max_iter=1000)
    raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")


def fit_predict(name: str, train: Split, test: Split, seed: int) -> np.ndarray:
    """Fit on the rows the peer may see; test predictions (scores, or signs as +-1)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import Pipeline

    rows = np.ones(len(train.label), bool) if name in SEMI_SUPERVISED else train.labeled
    if name in REGRESSORS:
        y = train.label[rows].astype(np.float64)
    else:
        y = np.where(train.label > 0, 1, 0)
        y = np.where(train.labeled, y, UNLABELED)[rows]
    model = Pipeline([("prep", preprocessing()), ("model", estimator(name, seed))])
    with warnings.catch_warnings():
        # A few hundred MLP iterations may stop short of sklearn's tolerance: intended.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        model.fit(train.x[rows], y)
        if name != "label_spreading":
            pred = np.asarray(model.predict(test.x))
        else:
            # sklearn divides by zero (NaN, then "negative" by argmax) for a test row whose
            # neighbours sit in a knn component no label reached: give it the labeled majority.
            warnings.simplefilter("ignore", category=RuntimeWarning)
            proba = model.predict_proba(test.x)
            pred = model.classes_[np.argmax(np.nan_to_num(proba, nan=-1.0), axis=1)]
            majority = int(y[y != UNLABELED].mean() >= 0.5)
            pred[~np.isfinite(proba).all(axis=1)] = majority
    if name in REGRESSORS:
        return pred.astype(np.float64)
    return np.where(pred == 1, 1.0, -1.0)


def score(name: str, pred: np.ndarray, labels: np.ndarray, dataset: str) -> dict[str, Any]:
    """MMSA metrics; for a sign classifier only those a sign defines, the others None."""
    metrics: dict[str, Any] = compute_metrics(pred, labels, dataset)
    if name in CLASSIFIERS:
        metrics = {k: (v if k in SIGN_METRICS else None) for k, v in metrics.items()}
    return metrics


def run(
    manifest: Manifest,
    ft: FinetuneConfig,
    seed: int,
    names: tuple[str, ...] | list[str] = PEERS,
    options: StorageOptions | None = None,
    *,
    missing: MissingConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """Every named peer's test metrics for one (cell, seed), as ``ft`` and ``missing``
    define the cell."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; choose from {PEERS}")
    data = load_splits(manifest, ft, options, missing=missing)
    family = dataset_family(manifest.family)
    out = {}
    for name in names:
        pred = fit_predict(name, data["train"], data["test"], seed)
        out[name] = score(name, pred, data["test"].label, family)
    return out
