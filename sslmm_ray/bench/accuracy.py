"""``sslmm bench accuracy``: does SSLMM beat simple peers, and does each part earn its place?

Two data sets, one procedure:

- ``digits`` (default, the evidence): scikit-learn's handwritten digits written as an MMSA
  pickle (:mod:`sslmm_ray.bench.digits`) and imported through the real ``import-mmsa`` path
  (``mmsa.load_pickle`` + ``store.write_dataset``). The split is fixed (seed 0); run seeds vary
  the labeled rows, the missing modalities and the initialisation. Cells (label ratio, missing
  rate) 0.1:0.5 and 0.5:0.5, 5 seeds, epochs and every other setting from the config defaults
  (the benchmark follows the model's defaults rather than pinning its own), plus the five
  simple peers of :mod:`sslmm_ray.bench.peers` on the same store, rows, labels and masks.
- ``synthetic``: the generator's mosi shapes, cell 0.5:0.5, 3 seeds, 12 fine-tuning and 15
  pre-training epochs. A functional check that the parts run and interact, not evidence: the
  generator was designed for it.

Every SSLMM variant is trained through the real ``run_stage`` path. Pre-training sees the same
missing data as fine-tuning (same rate, protocol and seed), and a variant that changes the
architecture gets its own pre-training. ``fully_labeled`` (supervised, every label) is the
headroom: roughly what unlabeled data could be worth at this data size. Reported per cell and
method: every seed's test metrics (lists in seed order) and their mean and spread.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table

from sslmm_ray import config as config_mod
from sslmm_ray import ray_env
from sslmm_ray.bench import peers as peers_mod
from sslmm_ray.data import store
from sslmm_ray.errors import UserError

#: Columns of the printed table (the JSON holds every metric a run reports).
TABLE_METRICS = ("Non0_acc_2", "MAE")

SUPERVISED = ["finetune.pseudo_labels=false", "finetune.reconstruction=false"]

#: name -> (use pre-training, config overrides)
VARIANTS: dict[str, tuple[bool, list[str]]] = {
    "sslmm": (True, []),
    "supervised_only": (False, SUPERVISED),
    "no_pretraining": (False, []),
    "no_pseudo_labels": (True, ["finetune.pseudo_labels=false"]),  # teacher's and graph's
    "no_graph_labels": (True, ["finetune.graph_labels=false"]),  # the teacher's alone
    "no_reconstruction": (True, ["finetune.reconstruction=false"]),
    "intra_only": (True, ["model.propagation=intra"]),
    "inter_only": (True, ["model.propagation=inter"]),
    "early_fusion": (True, ["model.fusion=early"]),  # pre-trained too: only the graph differs
    # Not a variant of the method: the supervised model given every training label. It bounds
    # what unlabeled data can add at this data size (the semi-supervised headroom).
    "fully_labeled": (False, [*SUPERVISED, "finetune.label_ratio=1.0"]),
}
NOT_ABLATIONS = frozenset({"sslmm", "supervised_only", "fully_labeled"})

DATASETS = ("digits", "synthetic")
#: The digits split is one fixed data set, as the synthetic one is: seeds vary the protocol.
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Defaults:
    """What each data set runs when the caller leaves an option out (None = config default)."""

    seeds: int
    cells: tuple[tuple[float, float], ...]
    epochs: int | None
    pretrain_epochs: int | None
    peers: bool


DEFAULTS: dict[str, Defaults] = {
    "digits": Defaults(seeds=5, cells=((0.1, 0.5), (0.5, 0.5)), epochs=None,
                       pretrain_epochs=None, peers=True),
    # The setting of the synthetic table in README.md (kept so it stays reproducible).
    "synthetic": Defaults(seeds=3, cells=((0.5, 0.5),), epochs=12, pretrain_epochs=15,
                          peers=False),
}


def parse_cells(text: str) -> list[tuple[float, float]]:
    """``"0.1:0.5,0.5:0.5"`` -> [(label ratio, missing rate), ...]."""
    cells = []
    for part in text.split(","):
        try:
            ratio, rate = (float(v) for v in part.strip().split(":"))
        except ValueError:
            raise UserError(
                f"cell {part!r} is not RATIO:RATE (e.g. --cells 0.1:0.5,0.5:0.5)"
            ) from None
        if not (0.0 < ratio <= 1.0 and 0.0 <= rate < 1.0):
            raise UserError(f"cell {part!r}: label ratio must be in (0, 1], missing rate in [0, 1)")
        cells.append((ratio, rate))
    return cells


def parse_names(text: str | None, known: Sequence[str], what: str) -> list[str] | None:
    """Comma-separated subset of ``known``; "none" is the empty list, None the default."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown {what} {unknown}; choose from {', '.join(known)} (or none)")
    return names


def write_data(dataset: str, root: Path, *, scale: float = 0.5, aligned: bool = True) -> str:
    """The benchmark's canonical store under ``root``: digits via the MMSA import path."""
    uri = str(root / "data")
    if dataset == "digits":
        from sslmm_ray.bench import digits
        from sslmm_ray.data import mmsa

        # The two calls `sslmm data import-mmsa --dataset mosi` makes.
        pickle_path = digits.write_pickle(root / "digits.pkl", seed=DIGITS_SPLIT_SEED)
        store.write_dataset(mmsa.load_pickle(pickle_path, "mosi"), uri)
    elif dataset == "synthetic":
        from sslmm_ray.data import synth

        store.write_dataset(synth.generate("mosi", scale=scale, aligned=aligned, seed=0), uri)
    else:
        raise UserError(f"unknown benchmark data set {dataset!r}; choose from {DATASETS}")
    return uri


@dataclass
class CellSeed:
    """One (cell, seed): the overrides every variant shares, and its pre-training runs."""

    data_uri: str
    root: Path
    label_ratio: float
    missing_rate: float
    seed: int
    epochs: int | None
    pretrain_epochs: int | None
    workers: int
    #: The caller's ``--set`` overrides: below the cell's keys, above the config defaults.
    overrides: tuple[str, ...] = ()
    #: Pre-training runs by (missing rate, seed, model overrides), shared between cells: it
    #: reads no label, so cells that differ only in label ratio reuse it.
    pretrained: dict[str, str] = field(default_factory=dict)

    def common(self) -> list[str]:
        out = [
            f"data.uri={self.data_uri}", *self.overrides, f"finetune.seed={self.seed}",
            f"pretrain.seed={self.seed}", f"finetune.label_ratio={self.label_ratio}",
            f"missing.rate={self.missing_rate}", f"missing.seed={self.seed}",
            f"finetune.workers={self.workers}",
            f"pretrain.workers={self.workers}",
        ]
        if self.epochs is not None:
            out.append(f"finetune.epochs={self.epochs}")
        if self.pretrain_epochs is not None:
            out.append(f"pretrain.epochs={self.pretrain_epochs}")
        return out

    def run_variant(self, name: str) -> dict[str, float]:
        """Test metrics of one variant, trained through ``run_stage`` like any user run."""
        from sslmm_ray.train.runner import run_stage

        use_pre, overrides = VARIANTS[name]
        model_overrides = [o for o in overrides if o.startswith("model.")]
        extra = []
        if use_pre:
            key = f"r{self.missing_rate}-s{self.seed}-" + (",".join(model_overrides) or "default")
            if key not in self.pretrained:
                pre_dir = str(self.root / f"pre-{len(self.pretrained)}")
                cfg = config_mod.load(overrides=self.common() + model_overrides)
                run_stage("pretrain", cfg, pre_dir)
                self.pretrained[key] = pre_dir
            extra = [f"finetune.pretrained={self.pretrained[key]}"]
        cfg = config_mod.load(overrides=self.common() + overrides + extra)
        return dict(run_stage("finetune", cfg, str(self.root / name)).test)

    def run_peers(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The peers on the protocol the ``sslmm`` variant's fine-tuning config defines."""
        cfg = config_mod.load(overrides=self.common())
        manifest = store.open_dataset(self.data_uri)
        return peers_mod.run(manifest, cfg.finetune, self.seed, names, missing=cfg.missing)


def run(
    *, dataset: str = "digits", seeds: int | None = None,
    cells: Sequence[tuple[float, float]] | None = None, variants: Sequence[str] | None = None,
    peers: bool | None = None, epochs: int | None = None, pretrain_epochs: int | None = None,
    scale: float = 0.5, aligned: bool = True, workers: int = 1, overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Every (cell, seed): the chosen variants, then the peers, on one imported store.

    ``overrides`` (``section.key=value``) apply to every stage, under the cell's and the
    variant's own keys: a way to try other model settings without pinning them here.
    """
    if dataset not in DEFAULTS:
        raise UserError(f"unknown benchmark data set {dataset!r}; choose from {DATASETS}")
    d = DEFAULTS[dataset]
    seeds = d.seeds if seeds is None else seeds
    cells = list(d.cells if cells is None else cells)
    names = list(VARIANTS) if variants is None else list(variants)
    peer_names = list(peers_mod.PEERS) if (d.peers if peers is None else peers) else []
    epochs = d.epochs if epochs is None else epochs
    pretrain_epochs = d.pretrain_epochs if pretrain_epochs is None else pretrain_epochs
    config_mod.load(overrides=overrides)  # a bad --set fails now, not after the data is written
    if names:
        ray_env.init()
    started = time.perf_counter()
    out_cells = []
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-acc-") as tmp:
        root = Path(tmp)
        data_uri = write_data(dataset, root, scale=scale, aligned=aligned)
        manifest = store.open_dataset(data_uri)
        pretrained: dict[str, str] = {}
        for ratio, rate in cells:
            results: dict[str, list[dict[str, Any]]] = {n: [] for n in [*names, *peer_names]}
            pseudo: list[dict[str, Any]] = []
            for seed in range(seeds):
                cs = CellSeed(data_uri, root / f"rho{ratio}-r{rate}" / f"seed{seed}", ratio, rate,
                              seed, epochs, pretrain_epochs, workers, tuple(overrides),
                              pretrained)
                for name in names:
                    results[name].append(cs.run_variant(name))
                    if name == "sslmm":  # offline: scored against withheld labels, never fed back
                        from sslmm_ray.train.diagnostics import pseudo_label_report

                        pseudo.append(pseudo_label_report(str(cs.root / name)))
                if peer_names:
                    for name, metrics in cs.run_peers(peer_names).items():
                        results[name].append(metrics)
            out_cells.append(
                {"label_ratio": ratio, "missing_rate": rate, **summarize(results), "runs": results,
                 "pseudo_labels": pseudo}
            )
    setting: dict[str, Any] = {
        "dataset": dataset, "counts": manifest.counts, "dims": manifest.dims,
        "lengths": manifest.lengths, "seeds": list(range(seeds)), "epochs": epochs,
        "pretrain_epochs": pretrain_epochs, "workers": workers, "overrides": list(overrides),
        "variants": names,
        "peers": peer_names, "wall_s": time.perf_counter() - started,
    }
    if dataset == "digits":
        setting["split_seed"] = DIGITS_SPLIT_SEED
    else:
        setting.update(preset="mosi", aligned=aligned, scale=scale)
    return {"setting": setting, "cells": out_cells}


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and spread per method, and the comparisons the goal is stated in (points)."""
    summary = {
        name: {k: _spread([r[k] for r in rs]) for k in rs[0]}
        for name, rs in results.items() if rs
    }
    out: dict[str, Any] = {"summary": summary}
    acc = {name: m["Non0_acc_2"]["mean"] for name, m in summary.items()}
    if "supervised_only" in acc:
        base = acc["supervised_only"]
        if "sslmm" in acc:
            out["gain_vs_supervised_points"] = 100 * (acc["sslmm"] - base)
        if "fully_labeled" in acc:
            out["headroom_points"] = 100 * (acc["fully_labeled"] - base)
    if "sslmm" in acc:
        # What removing each part (or replacing the graph by early fusion) costs.
        out["ablation_cost_points"] = {
            name: 100 * (acc["sslmm"] - value) for name, value in acc.items()
            if name in VARIANTS and name not in NOT_ABLATIONS
        }
    peer_acc = {n: v for n, v in acc.items() if n in peers_mod.PEERS}
    if peer_acc:  # the bar SSLMM has to clear
        best = max(peer_acc, key=lambda n: peer_acc[n])
        out["best_peer"] = best
        if "sslmm" in acc:
            out["gain_vs_best_peer_points"] = 100 * (acc["sslmm"] - peer_acc[best])
    return out


def _spread(values: list[float | None]) -> dict[str, float | None]:
    """Mean and std over seeds; None for a metric the method does not define (a classifier's
    MAE)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(present)), "std": float(np.std(present))}


def _kind(name: str) -> str:
    if name in peers_mod.REGRESSORS:
        return "peer (regressor)"
    if name in peers_mod.CLASSIFIERS:
        return "peer (sign classifier)"
    return "headroom" if name == "fully_labeled" else "SSLMM variant"


def table(result: dict[str, Any]) -> Group:
    """One table per cell: method, Non0_acc_2 and MAE (mean ± std over seeds)."""
    s = result["setting"]
    where = "digits (real)" if s["dataset"] == "digits" else (
        f"synthetic mosi x{s['scale']} (functional check, not evidence)")
    tables = []
    for cell in result["cells"]:
        t = Table(title=f"test metrics, {where}, rho {cell['label_ratio']}, "
                        f"missing {cell['missing_rate']}, {len(s['seeds'])} seeds (mean ± std)")
        t.add_column("method")
        t.add_column("kind")
        for k in TABLE_METRICS:
            t.add_column(k, justify="right")
        for name, m in cell["summary"].items():
            t.add_row(name, _kind(name), *[_cell_text(m[k]) for k in TABLE_METRICS])
        tables.append(t)
    return Group(*tables)


def _cell_text(spread: dict[str, float | None]) -> str:
    if spread["mean"] is None:
        return "—"
    return f"{spread['mean']:.4f} ± {spread['std']:.4f}"
