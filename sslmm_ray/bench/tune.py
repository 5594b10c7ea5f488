"""``sslmm bench tune``: how well a sweep keeps its trial slots busy.

One cell, ``samples`` trials, ``concurrency`` at once, on a tiny synthetic data set. Scheduling
efficiency = (sum of the trials' own run times / concurrency) / the search's wall time: 1.0
means the slots were never idle; start-up of trial actors, Train worker groups and Tune's own
bookkeeping between trials pull it down. Goal: at least 0.8. The trial times are Tune's
``time_total_s``, the wall time is ``Tuner.fit()`` of the cell (test evaluation excluded).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sslmm_ray import config as config_mod
from sslmm_ray.data import store, synth
from sslmm_ray.tune.sweep import run_sweep

__all__ = ["run"]

GOAL = 0.8


def run(
    *,
    samples: int = 4,
    concurrency: int = 2,
    epochs: int = 2,
    scale: float = 0.05,
    hidden: int = 16,
    workers_per_trial: int = 1,
    work_dir: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the small sweep and return its timings and the efficiency ratio."""
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-tune-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        data_uri = str(root / "data")
        store.write_dataset(synth.generate("mosi", scale=scale, aligned=True, seed=seed), data_uri)
        cfg = config_mod.load(overrides=[
            f"data.uri={data_uri}", f"model.hidden={hidden}", f"finetune.epochs={epochs}",
            f"tune.samples={samples}", f"tune.concurrency={concurrency}",
            f"tune.workers_per_trial={workers_per_trial}", f"tune.seed={seed}",
            "tune.label_ratios=[0.5]", "tune.missing_rates=[0.3]",
        ])
        result = run_sweep(cfg, str(root / "sweep"), verbose=0)  # stdout stays JSON
    cell = result["cells"][0]
    trial_s = [t["time_s"] for t in cell["trials"]]
    wall = cell["search_wall_s"]
    efficiency = sum(trial_s) / concurrency / wall if wall > 0 else float("nan")
    return {
        "samples": samples,
        "concurrency": concurrency,
        "workers_per_trial": workers_per_trial,
        "epochs": epochs,
        "search_wall_s": wall,
        "trial_s": trial_s,
        "sum_trial_s": sum(trial_s),
        "efficiency": efficiency,
        "goal": GOAL,
        "meets_goal": efficiency >= GOAL,
    }
