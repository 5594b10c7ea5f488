"""Graph pseudo-labels: label propagation over the training split's kNN graph.

Why: with few labels the teacher's own pseudo-labels are rarely confident (on the digits
benchmark at label ratio 0.1, tau 0.95 kept 0.1-0.3% of the unlabeled rows), while the
unlabeled rows' input features already say which rows are alike: label spreading on them beat
the network by 4-8 points (README, "Real-data benchmark"). Propagating the labels along that
graph once, before fine-tuning, gives every unlabeled row a pseudo-label that the fine-tuning
loss uses where the teacher is not confident (:func:`sslmm_ray.train.objectives.finetune_loss`).

The graph: each row is a vector of its modalities as the model sees them (normalised, hidden
content zero, i.e. the training mean); a modality with more than ``MAX_FLAT_VALUES`` values per
row is summarised by its mean and std over observed frames. Columns are standardised, each row
is linked to its ``k`` nearest rows (Euclidean; the link is made symmetric), and labels spread
as in Zhou et al. (2004), "Learning with local and global consistency":

    F <- alpha * S F + (1 - alpha) Y,   M <- alpha * S M + (1 - alpha) L,   S = D^-1/2 W D^-1/2

with ``Y`` the labels on labeled rows (0 elsewhere) and ``L`` their indicator. ``F / M`` is a
weighted mean of labels (weights: the graph's walks to labeled rows), so it stays in the label
range and is a score, not a class: one rule for regression and for every label scale. A row
no walk of ``iterations`` steps links to a labeled row gets none.

Labels withheld by the protocol are never read: only ``label`` where ``labeled`` is True.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from sslmm_ray.config import MODALITIES

#: A modality with more values than this per row (frames x features) enters the graph as its
#: mean and std over observed frames: a 50 x 768 text sequence flattened would make distances
#: slow and dominated by that one modality.
MAX_FLAT_VALUES = 1024
#: Rows per chunk of the pairwise-distance computation (bounds memory to chunk x N floats).
DISTANCE_CHUNK = 2048


def row_features(batch: Mapping[str, Any]) -> np.ndarray:
    """``(B, F)`` float32: the rows of a model batch as graph vectors (module docstring)."""
    parts = []
    for m in MODALITIES:
        if m not in batch:
            continue
        x = np.asarray(batch[m], np.float32)
        b, t, d = x.shape
        if t * d <= MAX_FLAT_VALUES:
            parts.append(x.reshape(b, t * d))
            continue
        mask = np.asarray(batch[f"{m}_mask"], bool)[..., None]
        count = np.maximum(mask.sum(axis=1), 1)
        mean = (x * mask).sum(axis=1) / count
        var = (np.square(x - mean[:, None]) * mask).sum(axis=1) / count
        parts.append(np.concatenate([mean, np.sqrt(var)], axis=1))
    return np.concatenate(parts, axis=1)


def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sparse symmetric ``(N, N)`` 0/1 adjacency: each row linked to its ``k`` nearest."""
    n = x.size(0)
    k = min(k, n - 1)
    cols = []
    for start in range(0, n, DISTANCE_CHUNK):
        d = torch.cdist(x[start : start + DISTANCE_CHUNK], x)
        d[torch.arange(d.size(0)), torch.arange(start, start + d.size(0))] = float("inf")
        cols.append(d.topk(k, dim=1, largest=False).indices)
    col = torch.cat(cols).reshape(-1)
    row = torch.arange(n).repeat_interleave(k)
    edges = torch.unique(torch.stack([torch.cat([row, col]), torch.cat([col, row])]), dim=1)
    return torch.sparse_coo_tensor(
        edges, torch.ones(edges.size(1), dtype=x.dtype), (n, n), check_invariants=True
    )


def propagate(
    features: np.ndarray,
    labels: np.ndarray,
    labeled: np.ndarray,
    *,
    k: int = 10,
    alpha: float = 0.5,
    iterations: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Propagated scores ``(N,)`` and which rows a labeled row reaches ``(N,)`` bool.

    Labeled rows keep their own label (propagation only fills in the others).
    """
    labeled = np.asarray(labeled, bool)
    n = len(labeled)
    if n < 2 or not labeled.any():
        return np.zeros(n, np.float32), np.zeros(n, bool)
    x = torch.as_tensor(features, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    w = knn_graph(x, k).coalesce()
    deg = torch.zeros(n, dtype=torch.float64).index_add_(0, w.indices()[0], w.values())
    scale = deg.clamp(min=1).rsqrt()
    s = torch.sparse_coo_tensor(
        w.indices(), w.values() * scale[w.indices()[0]] * scale[w.indices()[1]], (n, n),
        check_invariants=True,
    ).coalesce()
    own = torch.as_tensor(labeled, dtype=torch.float64)
    y = torch.as_tensor(np.where(labeled, labels, 0.0), dtype=torch.float64)
    start = torch.stack([y, own], dim=1)  # (N, 2): label mass and labeled mass
    state = start.clone()
    for _ in range(iterations):
        state = alpha * torch.sparse.mm(s, state) + (1 - alpha) * start
    mass = state[:, 1]
    reached = (mass > 0).numpy() & ~labeled
    scores = np.where(reached, (state[:, 0] / mass.clamp(min=1e-300)).numpy(), 0.0)
    scores = np.where(labeled, labels, scores)
    return scores.astype(np.float32), reached


def from_batches(
    batches: Iterable[Mapping[str, Any]], *, k: int = 10, alpha: float = 0.5,
    iterations: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Graph labels of the unlabeled rows of a split's model batches: (sorted keys, scores).

    The batches carry the protocol already (``labeled``, hidden content zeroed), so the graph
    sees exactly what fine-tuning sees. Rows no labeled row reaches are left out.
    """
    keys, feats, labels, labeled = [], [], [], []
    for batch in batches:
        keys.append(np.asarray(batch["index"]).view(np.uint64))
        feats.append(row_features(batch))
        labels.append(np.asarray(batch["label"], np.float64))
        labeled.append(np.asarray(batch["labeled"], bool))
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.float32)
    key = np.concatenate(keys)
    order = np.argsort(key, kind="stable")  # a row order that does not depend on the reader
    is_labeled = np.concatenate(labeled)[order]
    scores, reached = propagate(
        np.concatenate(feats)[order], np.concatenate(labels)[order], is_labeled,
        k=k, alpha=alpha, iterations=iterations,
    )
    return key[order][reached], scores[reached]
