"""``sslmm bench accuracy``: does each part of SSLMM earn its place?

Synthetic mosi at label ratio 0.5 and missing rate 0.5 (modality level), several seeds, every
variant trained through the real ``run_stage`` path. Pre-training sees the same missing data as
fine-tuning (same rate, protocol and seed), and a variant that changes the architecture gets its
own pre-training. ``fully_labeled`` (supervised, every label) is the headroom: roughly what
unlabeled data could be worth at this data size. Reported: test Non0_acc_2, Non0_F1_score, MAE,
Corr, mean and spread.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from sslmm_ray import config as config_mod
from sslmm_ray import ray_env
from sslmm_ray.data import store, synth

METRICS = ("Non0_acc_2", "Non0_F1_score", "MAE", "Corr")

SUPERVISED = ["finetune.pseudo_labels=false", "finetune.reconstruction=false"]

#: name -> (use pre-training, config overrides)
VARIANTS: dict[str, tuple[bool, list[str]]] = {
    "sslmm": (True, []),
    "supervised_only": (False, SUPERVISED),
    "no_pretraining": (False, []),
    "no_pseudo_labels": (True, ["finetune.pseudo_labels=false"]),
    "no_reconstruction": (True, ["finetune.reconstruction=false"]),
    "intra_only": (True, ["model.propagation=intra"]),
    "inter_only": (True, ["model.propagation=inter"]),
    "early_fusion": (False, ["model.fusion=early"]),
    # Not a variant of the method: the supervised model given every training label. It bounds
    # what unlabeled data can add at this data size (the semi-supervised headroom).
    "fully_labeled": (False, [*SUPERVISED, "finetune.label_ratio=1.0"]),
}


def run(
    *, seeds: int = 3, scale: float = 0.5, epochs: int = 12, pretrain_epochs: int = 15,
    label_ratio: float = 0.5, missing_rate: float = 0.5, variants: list[str] | None = None,
    aligned: bool = True, workers: int = 1,
) -> dict[str, Any]:
    from sslmm_ray.train.runner import run_stage

    ray_env.init()
    names = variants or list(VARIANTS)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-acc-") as tmp:
        root = Path(tmp)
        data_uri = str(root / "data")
        store.write_dataset(synth.generate("mosi", scale=scale, aligned=aligned, seed=0), data_uri)
        for seed in range(seeds):
            common = [
                f"data.uri={data_uri}", f"finetune.seed={seed}", f"pretrain.seed={seed}",
                f"finetune.label_ratio={label_ratio}", f"finetune.missing_rate={missing_rate}",
                f"pretrain.missing_rate={missing_rate}", f"finetune.epochs={epochs}",
                f"pretrain.epochs={pretrain_epochs}", f"finetune.workers={workers}",
                f"pretrain.workers={workers}",
            ]
            pretrained: dict[str, str] = {}
            for name in names:
                use_pre, overrides = VARIANTS[name]
                model_overrides = [o for o in overrides if o.startswith("model.")]
                extra = []
                if use_pre:
                    key = ",".join(model_overrides) or "default"
                    if key not in pretrained:
                        pre_dir = str(root / f"seed{seed}" / f"pre-{len(pretrained)}")
                        run_stage("pretrain", config_mod.load(
                            overrides=common + model_overrides), pre_dir)
                        pretrained[key] = pre_dir
                    extra = [f"finetune.pretrained={pretrained[key]}"]
                cfg = config_mod.load(overrides=common + overrides + extra)
                result = run_stage("finetune", cfg, str(root / f"seed{seed}" / name))
                results[name].append({k: result.test[k] for k in METRICS})
    return {
        "setting": {"preset": "mosi", "aligned": aligned, "scale": scale,
                    "label_ratio": label_ratio,
                    "missing_rate": missing_rate, "epochs": epochs,
                    "pretrain_epochs": pretrain_epochs, "seeds": seeds},
        **summarize(results),
        "runs": results,
    }


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Mean and spread per variant, and the comparisons the goal is stated in (points)."""
    summary = {
        name: {k: _spread([r[k] for r in rs]) for k in METRICS} for name, rs in results.items()
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
            if name not in ("sslmm", "supervised_only", "fully_labeled")
        }
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def table(result: dict[str, Any]) -> Table:
    s = result["setting"]
    t = Table(title=f"test metrics, synthetic mosi x{s['scale']}, rho {s['label_ratio']}, "
                    f"missing {s['missing_rate']}, {s['seeds']} seeds (mean ± std)")
    t.add_column("variant")
    for k in METRICS:
        t.add_column(k, justify="right")
    for name, m in result["summary"].items():
        t.add_row(name, *[f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in METRICS])
    return t
