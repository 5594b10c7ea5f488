"""What one Tune trial runs: a fine-tuning ``TorchTrainer`` whose reports are forwarded to Tune.

Train V2 forbids ``ray.train.report`` inside a Tune function and ``Tuner(trainer)`` is gone; the
supported interop is a plain Tune function that builds the trainer with Tune's
``TuneReportCallback`` and calls ``fit()``. Each trial's Train run lives in
``runs/<cell>/<trial_id>``, so a restored trial (same id) resumes its Train run from the latest
checkpoint, and a trial whose run already finished only replays its history to Tune.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from sslmm_ray import ray_env, storage
from sslmm_ray.data.pipeline import SplitCache
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train.rundir import RunDir
from sslmm_ray.train.runlog import RunLog
from sslmm_ray.tune import space

#: Reported with every epoch so ASHA counts epochs even across a resumed Train run.
EPOCHS_DONE = "epochs_done"


class EpochReportCallback(TuneReportCallback):
    """Tune's forwarding callback, plus ``epochs_done`` (= epoch + 1) as ASHA's time axis."""

    def after_report(self, run_context, metrics, checkpoint):  # noqa: D102
        if metrics and "epoch" in metrics[0]:
            metrics = [{**metrics[0], EPOCHS_DONE: int(metrics[0]["epoch"]) + 1}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def trial_dirname(trial: Any) -> str:
    """Short, stable Tune trial folder names (module level: Tune pickles it for restore)."""
    return f"trial_{trial.trial_id}"


def run_dir_of(runs_uri: str, trial_id: str) -> str:
    return storage.join(runs_uri, trial_id)


def is_finished(run_dir: str, options: StorageOptions) -> bool:
    """``metrics.json`` is the last file a Train run publishes."""
    return storage.exists(RunDir(run_dir).metrics, options)


def run_trial(
    config: dict[str, Any], base: dict[str, Any], runs_uri: str, cache: SplitCache | None = None
) -> None:
    """Tune function: fine-tune with the trial's values; never repeat a finished run.

    ``cache``: the sweep's decoded splits (``data.cache_mb``), shared by all its trials."""
    from sslmm_ray.train.runner import build_trainer, finish_stage, prepare_stage

    ray_env.quiet_ray_data()
    cfg = space.trial_config(base, config)
    options = StorageOptions.from_env(cfg.data.s3_endpoint)
    run_dir = run_dir_of(runs_uri, tune.get_context().get_trial_id())
    if is_finished(run_dir, options):
        for epoch in RunLog.read(run_dir, options):
            tune.report({**epoch, EPOCHS_DONE: int(epoch["epoch"]) + 1})
        return
    prep = prepare_stage("finetune", cfg, run_dir, cache=cache)
    result = build_trainer(prep, callbacks=[EpochReportCallback()]).fit()
    finish_stage(prep, result, evaluate_test=False)
