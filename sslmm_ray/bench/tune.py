"""``sslmm bench tune``: how well a sweep keeps its trial slots busy, cells side by side vs one
cell at a time.

A 2x2 grid (label ratio x missing rate), ``samples`` trials per cell, ``concurrency`` trials per
cell at once, on a tiny synthetic data set; the same sweep twice in one run:

* side by side: ``max_concurrent_trials = slots`` (default 4), so two cells search at once;
* sequential: ``max_concurrent_trials = concurrency``, one cell at a time (the former behaviour).

Scheduling efficiency = sum of the trials' own run times (Tune's ``time_total_s``) / (trial
slots x the sweep's wall time), where a mode's slots are the trials it may run at once. 1.0
means no slot ever idled: start-up of trial actors and Train worker groups, each cell's test
evaluation and Tune's bookkeeping between trials pull it down. The wall-time ratio is the
speed-up a user sees. Goal: side-by-side efficiency >= 0.9 (0.80 was measured for one cell,
4 trials, concurrency 2, before cells ran side by side).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sslmm_ray import config as config_mod
from sslmm_ray.data import store, synth
from sslmm_ray.tune.sweep import run_sweep

__all__ = ["run"]

GOAL = 0.9


def _sweep(data_uri: str, root: Path, overrides: list[str], limit: int) -> dict[str, Any]:
    cfg = config_mod.load(overrides=[*overrides, f"tune.max_concurrent_trials={limit}"])
    result = run_sweep(cfg, str(root), verbose=0)  # stdout stays JSON
    trial_s = [t["time_s"] for c in result["cells"] for t in c["trials"]]
    return {
        "trial_slots": limit,
        "wall_s": result["wall_s"],
        "trials": len(trial_s),
        "sum_trial_s": sum(trial_s),
        "efficiency": sum(trial_s) / (limit * result["wall_s"]),
        "cells": {c["cell"]: (c["started_at"], c["finished_at"]) for c in result["cells"]},
    }


def run(
    *,
    samples: int = 2,
    concurrency: int = 2,
    slots: int = 4,
    epochs: int = 2,
    scale: float = 0.05,
    hidden: int = 16,
    work_dir: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the 2x2 sweep side by side and then one cell at a time; timings and ratios."""
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-tune-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        data_uri = str(root / "data")
        store.write_dataset(synth.generate("mosi", scale=scale, aligned=True, seed=seed), data_uri)
        overrides = [
            f"data.uri={data_uri}", f"model.hidden={hidden}", f"finetune.epochs={epochs}",
            f"tune.samples={samples}", f"tune.concurrency={concurrency}", f"tune.seed={seed}",
            "tune.label_ratios=[0.3,0.7]", "tune.missing_rates=[0.3,0.5]",
        ]
        side = _sweep(data_uri, root / "side_by_side", overrides, slots)
        one = _sweep(data_uri, root / "sequential", overrides, concurrency)
    return {
        "grid": "2x2",
        "samples_per_cell": samples,
        "concurrency_per_cell": concurrency,
        "epochs": epochs,
        "side_by_side": side,
        "sequential": one,
        "speedup": one["wall_s"] / side["wall_s"],
        "goal": GOAL,
        "meets_goal": side["efficiency"] >= GOAL,
    }
