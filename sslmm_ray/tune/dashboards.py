"""``sslmm dashboards``: a sweep's TensorBoard files and Tune results, fetched to a local folder,
with the commands that open them.

The files live under the sweep's storage (often S3), where neither TensorBoard nor a browser
reaches without credentials and an endpoint. This copies what the dashboards read, and nothing
else (no checkpoints), so a laptop can open a cluster's sweep::

    <out>/runs/<cell>/<trial_id>/tensorboard/    each trial's Train run: per-epoch metrics
    <out>/baseline/<cell>/tensorboard/           the supervised-only run of the cell
    <out>/<cell>/trial_<id>/                     Tune's record: params.json, result.json,
                                                 progress.csv and its own event files

The Optuna studies are not copied: an RDB is opened where it is, and a local sweep's journal
file is read in place.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from sslmm_ray import storage
from sslmm_ray.storage import StorageOptions
from sslmm_ray.tune.sweep import BASELINE, RUNS, SWEEP_FILE, Layout

TUNE_FILES = ("params.json", "result.json", "progress.csv")


def _wanted(rel: str) -> bool:
    """A dashboard file: TensorBoard events of a Train run, or Tune's per-trial record."""
    parts = rel.split("/")
    if parts[0] in (RUNS, BASELINE):
        return "tensorboard" in parts[:-1]
    return (len(parts) == 3 and parts[0].startswith("cell_") and parts[1].startswith("trial_")
            and (parts[2] in TUNE_FILES or parts[2].startswith("events.out.tfevents")))


def fetch(storage_uri: str, out_dir: str | Path,
          options: StorageOptions | None = None) -> dict[str, Any]:
    """Copy the sweep's dashboard files into ``out_dir``; return what was copied and the
    commands that open TensorBoard and optuna-dashboard on them."""
    root = storage_uri.rstrip("/")
    sweep_file = storage.join(root, SWEEP_FILE)
    if not storage.exists(sweep_file, options):
        raise FileNotFoundError(f"{root} holds no sweep ({SWEEP_FILE}); run `sslmm tune` first")
    saved = storage.read_json(sweep_file, options)
    out = Path(out_dir)
    prefix = root + "/"
    copied = []
    for uri in storage.list_files(root, options):
        rel = uri[len(prefix):]
        if not _wanted(rel):
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(uri, options))
        copied.append(rel)
    studies = Layout(root).optuna_storage(saved.get("tune", {}).get("optuna_storage"))
    commands = {"tensorboard": f"tensorboard --logdir {shlex.quote(str(out))}"}
    if studies:
        commands["optuna_dashboard"] = f"optuna-dashboard {shlex.quote(studies)}"
    return {
        "out": str(out),
        "files": copied,
        "event_files": sum("tfevents" in rel for rel in copied),
        "optuna_storage": studies,
        "commands": commands,
    }


__all__ = ["fetch"]
