"""Offline diagnostics of a fine-tuning run: how right were its pseudo-labels?

Training never reads a withheld label. This module does, after the fact and on purpose, to
score what the teacher told the student: it re-creates the run's labeled/unlabeled split of
the training rows, asks the run's best checkpoint (the EMA teacher) for pseudo-labels on the
unlabeled rows exactly as fine-tuning does (same views, confidence and threshold), and
compares their sign with the withheld labels, and does the same for the graph pseudo-labels
that fine-tuning used where the teacher was unsure (:mod:`sslmm_ray.data.graph_labels`,
recomputed as the run computed them). Nothing here feeds back into training or selection; it
answers "did pseudo-labelling help or mislead this run?".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sslmm_ray import storage
from sslmm_ray.config import from_dict
from sslmm_ray.data import pipeline, protocols, store
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import checkpoint as ckpt
from sslmm_ray.train.objectives import pseudo_labels
from sslmm_ray.train.rundir import RunDir


def pseudo_label_report(
    run_dir: str, options: StorageOptions | None = None, *, batch_size: int = 256
) -> dict[str, Any]:
    """Sign accuracy of the run's pseudo-labels against the withheld training labels."""
    cfg = from_dict(storage.read_json(RunDir(run_dir).config, options), run_dir)
    ft = cfg.finetune
    model, meta = ckpt.load_model(run_dir, options)
    manifest = store.open_dataset(cfg.data.uri, options)
    ckpt.check_compatible(meta, manifest.dims, manifest.lengths, run_dir, cfg.data.uri)
    labeled = pipeline.labeled_split_keys(manifest, "train", ft.label_ratio, ft.seed, options)
    if labeled is None:
        return {"run_dir": run_dir, "unlabeled": 0, "label_ratio": ft.label_ratio}
    # Every label visible: this is the offline scorer, not training.
    spec = protocols.ProtocolSpec(**pipeline.missing_spec(cfg.missing))
    ds = pipeline.split_dataset(manifest, "train", spec, options, normalize=meta.normalize)
    graph_keys = np.zeros(0, np.uint64)
    graph_scores = np.zeros(0, np.float32)
    if ft.pseudo_labels and ft.graph_labels:
        train_spec = protocols.ProtocolSpec(**pipeline.missing_spec(cfg.missing),
                                            labeled_keys=labeled)
        graph = pipeline.with_graph_labels(manifest, cfg, train_spec, options)
        assert graph.graph_keys is not None and graph.graph_scores is not None
        graph_keys, graph_scores = graph.graph_keys, graph.graph_scores
    lo, hi = manifest.label_range
    generator = torch.Generator().manual_seed(ft.seed)
    mus, confs, truths, graphs = [], [], [], []
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        keys = batch["index"].numpy().view(np.uint64)
        rows = torch.from_numpy(~np.isin(keys, labeled))
        if not rows.any():
            continue
        sub = {k: v[rows] for k, v in batch.items()}
        mu, conf = pseudo_labels(model, sub, ft.views, ft.view_mask_prob, ft.view_segment_prob,
                                 ft.confidence_kappa, generator, (hi - lo) / 2.0)
        mus.append(mu.numpy())
        confs.append(conf.numpy())
        truths.append(sub["label"].numpy())
        found, score = protocols.lookup(keys[rows.numpy()], graph_keys, graph_scores)
        graphs.append(np.where(found, score, np.nan))  # NaN: no graph label
    mu, conf, truth, graph = (np.concatenate(x) for x in (mus, confs, truths, graphs))
    kept = conf >= ft.tau
    nonzero = truth != 0
    from_graph = ~kept & ~np.isnan(graph)
    used = kept | from_graph
    target = np.where(kept, mu, graph)
    return {
        "run_dir": run_dir,
        "label_ratio": ft.label_ratio,
        "tau": ft.tau,
        "unlabeled": int(len(truth)),
        "pseudo_label_fraction": float(kept.mean()),
        "sign_accuracy_kept": _sign_accuracy(mu[kept & nonzero], truth[kept & nonzero]),
        "sign_accuracy_all": _sign_accuracy(mu[nonzero], truth[nonzero]),
        "mae_kept": float(np.abs(mu[kept] - truth[kept]).mean()) if kept.any() else None,
        "graph_label_fraction": float(from_graph.mean()),
        "sign_accuracy_graph": _sign_accuracy(graph[from_graph & nonzero],
                                              truth[from_graph & nonzero]),
        # what the pseudo-label term trained on: the teacher's where kept, else the graph's
        "sign_accuracy_used": _sign_accuracy(target[used & nonzero], truth[used & nonzero]),
    }


def _sign_accuracy(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Non0 sign agreement (MMSA's Non0_acc_2 rule: a prediction of 0 counts as negative)."""
    if not len(truth):
        return None
    return float(((pred > 0) == (truth > 0)).mean())
