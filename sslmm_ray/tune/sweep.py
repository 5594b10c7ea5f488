"""``sslmm tune``: one Tuner per (label ratio, missing rate) cell, resumable, tested once.

Cells run side by side: each cell's Tuner runs in a driver thread (:func:`_side_by_side`)
that searches the cell, tests its best trial and runs its baseline; the trials themselves are
Ray work anywhere on the cluster. ``max(1, tune.max_concurrent_trials // tune.concurrency)``
cells run at a time, so at most ``max_concurrent_trials`` trials are in flight; a finished
cell's place goes to the next one at once. While one cell is tested or runs its baseline, the
others train. (A thread needs no Ray worker process of its own, as a Ray task per cell did.)

Storage layout under the sweep's URI (local or S3)::

    sweep.json                 the settings the sweep started with (a re-run must match them)
    optuna.journal             every cell's Optuna study, "<sweep>.<cell>" (a local sweep's
                               default; ``tune.optuna_storage`` puts them in an RDB instead)
    cell_label0.5_missing0.3/  Tune's experiment folder of the cell (trials, searcher state)
    runs/<cell>/<trial_id>/    each trial's Train run: config.json, checkpoints, history.json,
                               tensorboard/, best.json, metrics.json
    runs/<cell>/seed<k>/       the best hyper-parameters under training seed + k (``--seeds``)
    baseline/<cell>/           the supervised-only run of the cell (``--baseline``)
    results/<cell>.json        the cell's outcome; written last, so it marks a finished cell

Re-running the same command resumes: finished cells (a results file) are skipped, an interrupted
cell is restored with ``Tuner.restore`` (searcher state included, unfinished and errored trials
resumed under their own ids, so from their Train runs' checkpoints), and a trial whose Train
run finished is never trained again.

Faults: Tune restarts a failed trial up to ``tune.max_failures`` times (its Train run resumes from
its checkpoint). A cell with a trial still errored after that gets no results file: the other
cells go on, the sweep then fails naming the cell, and re-running the command retries it. One
sweep at a time writes a storage folder (:mod:`sslmm_ray.locks`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import tune

from sslmm_ray import locks, ray_env, storage
from sslmm_ray import metrics as mmsa
from sslmm_ray.config import ExperimentConfig, from_dict
from sslmm_ray.data import store
from sslmm_ray.data.pipeline import SplitCache
from sslmm_ray.errors import UserError
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import checkpoint as ckpt
from sslmm_ray.train import rundir
from sslmm_ray.train.evaluate import evaluate_checkpoint
from sslmm_ray.train.rundir import RunDir
from sslmm_ray.train.runlog import RunLog
from sslmm_ray.train.stages import FINETUNE
from sslmm_ray.tune import space, trial
from sslmm_ray.tune.space import Cell

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
RESULTS = "results"
RUNS = "runs"
OPTUNA_JOURNAL = "optuna.journal"
BASELINE = "baseline"
#: Resources of the Tune trial function itself: it only drives a TorchTrainer, whose workers
#: hold the CPUs. ``max_concurrent_trials`` bounds how many run at once.
TRIAL_DRIVER_RESOURCES = {"CPU": 0.01}  # Tune rejects an empty bundle
#: Settings that may differ between runs of the same sweep (the grid can grow).
_MAY_CHANGE = {
    ("tune", "label_ratios"), ("tune", "missing_rates"), ("data", "s3_endpoint"),
    ("tune", "max_failures"), ("finetune", "max_failures"),  # failure budgets, not results
    ("tune", "max_concurrent_trials"),  # how many cells run at once, not what they find
}
#: The Tune function of every trial (``run_sweep(trial_fn=...)`` wraps it, e.g. in tests).
TrialFn = Callable[..., None]


class CellFailed(RuntimeError):
    """A cell's search ended with errored trials; it is not recorded as done."""


class SweepIncomplete(UserError):
    """Some cells failed; the finished ones are kept and a re-run retries the others."""


@dataclass(frozen=True)
class Layout:
    root: str

    def cell_dir(self, cell: Cell) -> str:
        return storage.join(self.root, cell.name)

    def runs(self, cell: Cell) -> str:
        return storage.join(self.root, RUNS, cell.name)

    def baseline(self, cell: Cell) -> str:
        return storage.join(self.root, BASELINE, cell.name)

    def result(self, cell: Cell) -> str:
        return storage.join(self.root, RESULTS, f"{cell.name}.json")

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rpartition("/")[2]

    def study(self, cell: Cell) -> str:
        """The cell's Optuna study name: the sweep's folder name and the cell."""
        return f"{self.name}.{cell.name}"

    def optuna_storage(self, configured: str | None) -> str | None:
        """``tune.optuna_storage``, or a journal file in a local sweep's folder (an s3://
        sweep keeps its studies in memory unless given an RDB the head can reach)."""
        if configured:
            return configured
        if storage.is_remote(self.root):
            return None
        return storage.join(self.root.removeprefix("file://"), OPTUNA_JOURNAL)


def sweep_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The base config every trial starts from: the tune section sets the trial scale."""
    data = cfg.to_dict()
    data["finetune"]["workers"] = cfg.tune.workers_per_trial
    return from_dict(data, "tune")


def check_plan(cfg: ExperimentConfig, info: ray_env.ClusterInfo) -> None:
    """Concurrency x workers per trial (+ Ray Data headroom) must fit, before anything runs."""
    t, ft = cfg.tune, cfg.finetune
    ray_env.check_fits(
        info,
        workers=t.concurrency * t.workers_per_trial,
        cpus_per_worker=ft.cpus_per_worker,
        use_gpu=ft.gpus,
        what=(
            f"tune with {t.concurrency} concurrent trials x {t.workers_per_trial} workers "
            f"(--concurrency x --workers-per-trial)"
        ),
    )
    if t.max_concurrent_trials is not None:
        ray_env.check_fits(
            info,
            workers=cells_at_once(cfg, info, len(t.label_ratios) * len(t.missing_rates))
            * t.concurrency * t.workers_per_trial,
            cpus_per_worker=ft.cpus_per_worker,
            use_gpu=ft.gpus,
            what=(f"tune with --max-concurrent-trials {t.max_concurrent_trials} x "
                  f"{t.workers_per_trial} workers"),
        )


def cells_at_once(cfg: ExperimentConfig, info: ray_env.ClusterInfo, cells: int) -> int:
    """How many cells search side by side: ``max_concurrent_trials // concurrency``, >= 1.

    Default limit: the trials whose workers fit beside Ray Data's headroom (and, with GPUs,
    the GPUs); on an autoscaling cluster (``SSLMM_AUTOSCALING=1``), where nodes come on
    demand, every cell at once.
    """
    t, ft = cfg.tune, cfg.finetune
    limit = t.max_concurrent_trials
    if limit is None:
        if ray_env.autoscaling():
            return max(cells, 1)
        per_trial = t.workers_per_trial * ft.cpus_per_worker
        limit = int((info.cpus - ray_env.DATA_HEADROOM_CPUS + 1e-9) // per_trial)
        if ft.gpus:
            limit = min(limit, int(info.gpus // t.workers_per_trial))
    return max(1, min(limit // t.concurrency, cells))


def _check_same_sweep(cfg: ExperimentConfig, layout: Layout, options: StorageOptions) -> None:
    """Refuse to mix two different sweeps in one storage folder; record the first one."""
    uri = storage.join(layout.root, SWEEP_FILE)
    current = cfg.to_dict()
    if not storage.exists(uri, options):
        storage.write_json(uri, current, options)
        return
    saved = storage.read_json(uri, options)
    # A key the saved sweep lacks was added by a later version (e.g. ``precision``): that
    # sweep ran with its default.
    default = ExperimentConfig().to_dict()
    diffs = [
        f"{section}.{key}: {was!r} -> {value!r}"
        for section, values in current.items()
        for key, value in values.items()
        if (section, key) not in _MAY_CHANGE
        and (was := saved.get(section, {}).get(key, default[section][key])) != value
    ]
    if diffs:
        raise UserError(
            f"{layout.root} already holds a sweep with other settings ({'; '.join(diffs)}); "
            "re-run with the same settings to resume it, or use a new --storage"
        )
    for key in ("label_ratios", "missing_rates"):  # the grid may grow between runs
        current["tune"][key] = sorted(set(saved["tune"][key]) | set(current["tune"][key]))
    storage.write_json(uri, current, options)


def run_sweep(
    cfg: ExperimentConfig,
    storage_uri: str,
    *,
    baseline: bool = False,
    verbose: int = 1,
    break_lock: bool = False,
    trial_fn: TrialFn = trial.run_trial,
) -> dict[str, Any]:
    """Search every cell of the grid (resuming what is there) and return the cells' results.

    ``verbose`` is Tune's (0 keeps stdout clean for ``--json``). The storage folder is locked
    for the whole sweep (``break_lock`` takes over a stale lock)."""
    started = time.monotonic()
    cfg = sweep_config(cfg)
    info = ray_env.init()
    if not info.local:  # trials run Ray Data first, on worker nodes an autoscaler must release
        ray_env.pin_ray_data_actors()
    ray_env.check_paths_reach_every_node(info, {
        "--storage": storage_uri, "--data": cfg.data.uri, "--pretrained": cfg.finetune.pretrained,
    })
    check_plan(cfg, info)
    options = StorageOptions.from_env(cfg.data.s3_endpoint)
    manifest = store.open_dataset(cfg.data.uri, options)
    selected = FINETUNE.selection(cfg, manifest.family)
    headline = mmsa.headline_metric(manifest.family)
    layout = Layout(storage_uri.rstrip("/"))
    with locks.hold(layout.root, options, what="sweep storage", break_lock=break_lock,
                    break_hint="--break-lock"):
        _check_same_sweep(cfg, layout, options)
        cells = space.grid(cfg.tune.label_ratios, cfg.tune.missing_rates)
        done: dict[str, dict[str, Any]] = {}
        skipped, failed = [], []
        for cell in cells:
            if storage.exists(layout.result(cell), options):
                log.info("cell %s: finished earlier, skipped", cell.name)
                skipped.append(cell.name)
                done[cell.name] = storage.read_json(layout.result(cell), options)
        todo = [c for c in cells if c.name not in done]
        cache: SplitCache | None = None
        if todo and cfg.data.cache_mb > 0:  # once, for every trial of the sweep
            cache = SplitCache.build(manifest, cfg, options)
        studies = layout.optuna_storage(cfg.tune.optuna_storage)
        if todo and studies:
            # Once, here: cells that open a new RDB side by side race to create its tables.
            space.optuna_storage(studies)
        width = cells_at_once(cfg, info, len(todo))

        def search(cell: Cell) -> dict[str, Any]:
            return run_cell(cfg, cell, layout, options, selected, headline, baseline=baseline,
                            verbose=verbose, trial_fn=trial_fn, cache=cache)

        crashes: list[BaseException] = []  # raised once the running cells are done
        for cell, outcome in _side_by_side(search, todo, width, stop=lambda: bool(crashes)):
            if isinstance(outcome, CellFailed):
                log.error("%s", outcome)
                failed.append(str(outcome))
            elif isinstance(outcome, BaseException):
                crashes.append(outcome)
            else:
                done[cell.name] = outcome
        if crashes:
            raise crashes[0]
        results = [done[c.name] for c in cells if c.name in done]
    if failed:
        raise SweepIncomplete(
            f"{len(failed)} of {len(cells)} cells did not finish ({' | '.join(failed)}); "
            f"finished cells are kept: re-run the same command to retry the others"
        )
    return {
        "storage": storage_uri,
        "optuna_storage": layout.optuna_storage(cfg.tune.optuna_storage),
        "studies": {c.name: layout.study(c) for c in cells},
        "metric": selected[0],
        "mode": selected[1],
        "cells": results,
        "skipped": skipped,
        "wall_s": time.monotonic() - started,
    }


def _tuner(
    cfg: ExperimentConfig, cell: Cell, layout: Layout, selected: tuple[str, str],
    verbose: int = 1, trial_fn: TrialFn = trial.run_trial, cache: SplitCache | None = None,
) -> tune.Tuner:
    """A new Tuner for the cell, or the interrupted one restored from storage.

    Optuna and ASHA score a trial by its best-so-far validation value (``best_<metric>``, as
    the train loop reports it), the same value the final choice of checkpoint uses; a trial's
    last epoch would rank trials by where training happened to end.
    """
    metric, mode = f"best_{selected[0]}", selected[1]
    options = StorageOptions.from_env(cfg.data.s3_endpoint)
    storage_path, fs = storage.ray_storage(layout.root, options)
    exp_path, _ = storage.ray_storage(layout.cell_dir(cell), options)
    trainable = _register(cell, tune.with_resources(
        # the cache travels by reference: its blocks stay where the sweep put them
        tune.with_parameters(trial_fn, base=cfg.to_dict(), runs_uri=layout.runs(cell),
                             **({"cache": cache} if cache is not None else {})),
        TRIAL_DRIVER_RESOURCES,
    ))
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        log.info("cell %s: restoring the interrupted search", cell.name)
        return tune.Tuner.restore(
            exp_path,
            trainable=trainable,
            resume_unfinished=True,
            # Same trial id, so its Train run (runs/<cell>/<trial_id>) resumes from its own
            # checkpoint; restart_errored would make a new trial and train it from scratch.
            resume_errored=True,
            restart_errored=False,
            storage_filesystem=fs,
        )
    t = cfg.tune
    scheduler = None
    if t.asha:
        from ray.tune.schedulers import ASHAScheduler

        # max_t one past the last epoch: ASHA stops a trial that reaches max_t, which would
        # kill a trial that is finishing normally before it publishes best.json/metrics.json.
        scheduler = ASHAScheduler(
            time_attr=trial.EPOCHS_DONE,
            max_t=cfg.finetune.epochs + 1,
            grace_period=1,
            reduction_factor=2,
        )
    return tune.Tuner(
        trainable,
        param_space=space.param_space(cell),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=space.make_searcher(
                metric, mode, t.seed, storage=layout.optuna_storage(t.optuna_storage),
                study_name=layout.study(cell), param_space=space.param_space(cell)),
            scheduler=scheduler,
            num_samples=t.samples,
            max_concurrent_trials=t.concurrency,
            trial_dirname_creator=trial.trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=cell.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            verbose=verbose,
            # Restored searches keep the failure budget they started with (Tune's rule).
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
        ),
    )


def _side_by_side(
    fn: Callable[[Cell], dict[str, Any]], cells: list[Cell], width: int,
    stop: Callable[[], object] = lambda: None,
) -> Iterator[tuple[Cell, dict[str, Any] | BaseException]]:
    """``fn(cell)`` for every cell, ``width`` at a time in threads, yielded as each finishes;
    no new cell starts once ``stop()`` is true (the running ones still finish: the sweep's
    lock must outlive every writer).

    Tune runs a Tuner from a non-main thread (it then leaves signal handlers alone). The
    threads are daemons: a driver stopped mid-sweep exits like a killed one, and a re-run
    resumes (cells are results-file atomic, trials checkpointed).
    """
    finished: queue.Queue[tuple[Cell, dict[str, Any] | BaseException]] = queue.Queue()

    def run(cell: Cell) -> None:
        try:
            finished.put((cell, fn(cell)))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            finished.put((cell, err))

    waiting, running = list(cells), 0
    while running or (waiting and not stop()):
        while waiting and running < width and not stop():
            cell = waiting.pop(0)
            threading.Thread(target=run, args=(cell,), name=f"sslmm-{cell.name}",
                             daemon=True).start()
            running += 1
        yield finished.get()
        running -= 1


_REGISTRY_LOCK = threading.Lock()


def _register(cell: Cell, trainable: Any) -> str:
    """Register the cell's trainable under a name of its own; the Tuner gets the name.

    Tune keys a trainable by name in one registry per Ray job: two cells searching at once
    under one function name would run each other's trials (measured: both cells' trials wrote
    to the second cell's runs). The registry is not thread-safe ("dictionary changed size during
    iteration" with two cells registering at once), and a Tuner given a name registers nothing.
    """
    name = f"sslmm_trial_{cell.name}"
    with _REGISTRY_LOCK:
        tune.register_trainable(name, trainable)
    return name


def run_cell(
    cfg: ExperimentConfig,
    cell: Cell,
    layout: Layout,
    options: StorageOptions,
    selected: tuple[str, str],
    headline: str,
    *,
    baseline: bool = False,
    verbose: int = 1,
    trial_fn: TrialFn = trial.run_trial,
    cache: SplitCache | None = None,
) -> dict[str, Any]:
    """Search one cell, test its best trial once, optionally run its baseline; publish.

    ``selected`` is the (metric, mode) that ranks trials and checkpoints; ``headline`` the
    metric that reports show (Non0_acc_2 or Mult_acc_2). A trial still errored after its
    restarts raises :class:`CellFailed` before anything is published: a results file would mark
    the cell done, and its search would never be completed."""
    metric, mode = selected
    started, started_at = time.monotonic(), time.time()
    grid = _tuner(cfg, cell, layout, selected, verbose, trial_fn, cache).fit()
    search_wall_s = time.monotonic() - started
    errored = [r for r in grid if r.error]
    if errored:
        detail = "; ".join(_first_line(r.error) for r in errored)[:1000]
        raise CellFailed(f"cell {cell.name}: {len(errored)} of {len(grid)} trials errored "
                         f"({detail})")
    trials = [_trial_record(r, layout.runs(cell), metric, mode, options) for r in grid]
    trials = [t for t in trials if t is not None]
    scored = [t for t in trials if not math.isnan(t["best_valid"])]
    if not scored:
        errors = "; ".join(str(r.error) for r in grid if r.error)[:2000]
        raise RuntimeError(f"cell {cell.name}: no trial reported {metric} ({errors})")
    best = _best(scored, lambda t: t["best_valid"], mode)
    best_ckpt, best_metrics = best_checkpoint(
        best["run_dir"], metric, options, mode=mode,
        epochs=None if best["finished"] else best["epochs"],
    )
    test = evaluate_checkpoint(best_ckpt, cfg.data.uri, options, split="test")
    seeds = [{"seed": cfg.finetune.seed, "run_dir": best["run_dir"], "test": test},
             *run_seeds(cfg, cell, layout, options, best["config"])]
    result = {
        "cell": cell.name,
        "label_ratio": cell.label_ratio,
        "missing_rate": cell.missing_rate,
        "metric": metric,
        "mode": mode,
        "headline": headline,
        "best": {
            "trial_id": best["trial_id"],
            "run_dir": best["run_dir"],
            "checkpoint": best_ckpt,
            "config": best["config"],
            "valid": _strip(best_metrics, "valid_"),
            "test": test,
            # the best hyper-parameters under tune.seeds training seeds (the trial first)
            "seeds": seeds,
            "test_mean": {k: float(np.mean([s["test"][k] for s in seeds])) for k in test},
            "test_std": {k: float(np.std([s["test"][k] for s in seeds])) for k in test},
        },
        "trials": trials,
        "baseline": run_baseline(cfg, cell, layout, options) if baseline else None,
        "search_wall_s": search_wall_s,
        "tune_wall_s": time.monotonic() - started,
        # wall-clock seconds since the epoch: when cells ran side by side
        "started_at": started_at,
        "finished_at": time.time(),
    }
    storage.write_json(layout.result(cell), result, options)
    return result


def _first_line(error: BaseException) -> str:
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _strip(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _best(items: list[Any], key: Any, mode: str) -> Any:
    return max(items, key=key) if mode == "max" else min(items, key=key)


def _trial_record(
    result: Any, runs_uri: str, metric: str, mode: str, options: StorageOptions
) -> dict[str, Any] | None:
    """One trial as recorded by its own Train run (history.json), not Tune's copy.

    Only the epochs Tune saw count: a trial that ASHA stops keeps training until its actor is
    killed, and what it logs after the decision depends on timing, not on the seed.
    """
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id is None:
        return None
    run_dir = trial.run_dir_of(runs_uri, trial_id)
    history = RunLog.read(run_dir, options)
    seen = (result.metrics or {}).get(trial.EPOCHS_DONE)
    if seen is not None:
        history = history[: int(seen)]
    values = [h[metric] for h in history if metric in h and not math.isnan(h[metric])]
    return {
        "trial_id": trial_id,
        "run_dir": run_dir,
        "config": {k: result.config[k] for k in (*space.CONSTANTS, *space.SEARCHED)},
        "epochs": len(history),
        "best_valid": _best(values, float, mode) if values else math.nan,
        "finished": trial.is_finished(run_dir, options),
        "error": str(result.error)[:500] if result.error else None,
        "time_s": _time_of(result),
        **_when(result),
    }


def _time_of(result: Any) -> float:
    """Seconds the trial ran, as Tune recorded them (0 when unknown)."""
    return float((result.metrics or {}).get("time_total_s") or 0.0)


def _when(result: Any) -> dict[str, float | None]:
    """When the trial ran, in seconds since the epoch, from what Tune recorded: its last report
    (``timestamp``, whole seconds) less the seconds it had run by then (``time_total_s``). The
    trial ran at least over [started_at, last_report_at] (to Tune's 1 s resolution); None when
    it never reported."""
    stamp = (result.metrics or {}).get("timestamp")
    if stamp is None:
        return {"started_at": None, "last_report_at": None}
    return {"started_at": float(stamp) - _time_of(result), "last_report_at": float(stamp)}


def best_checkpoint(
    run_dir: str, metric: str, options: StorageOptions, *, mode: str = "max",
    epochs: int | None = None,
) -> tuple[str, dict]:
    """The run's best checkpoint: ``best.json`` when the run finished, else the best kept one
    among its first ``epochs`` (a trial stopped by ASHA never writes ``best.json``)."""
    best_file = RunDir(run_dir).best
    if epochs is None and storage.exists(best_file, options):
        best = storage.read_json(best_file, options)
        return best["checkpoint"], best["metrics"]
    kept = []  # (epoch, value, checkpoint uri, metrics)
    for meta_uri in storage.list_files(run_dir, options, suffix="/" + rundir.CHECKPOINT_META):
        meta = storage.read_json(meta_uri, options)
        value = meta.get("metrics", {}).get(metric)
        if value is not None:
            kept.append((int(meta.get("epoch", 0)), value, meta_uri.rpartition("/")[0],
                         meta["metrics"]))
    if not kept:
        raise ckpt.CheckpointError(f"{run_dir}: no checkpoint reports {metric}")
    # Retention may have dropped every checkpoint Tune saw (the run kept training after ASHA's
    # decision): then the best kept one is all there is.
    candidates = [k for k in kept if epochs is None or k[0] < epochs] or kept
    _, _, uri, metrics = _best(candidates, lambda c: c[1], mode)
    return uri, metrics


def run_seeds(
    cfg: ExperimentConfig, cell: Cell, layout: Layout, options: StorageOptions,
    values: dict[str, Any],
) -> list[dict[str, Any]]:
    """The cell's best hyper-parameters retrained under ``finetune.seed + 1 .. seeds - 1``
    (initialisation, batch order, labeled rows; the masks stay the cell's), each tested once.

    Each run has its own folder (``runs/<cell>/seed<k>``): a killed sweep resumes it from its
    checkpoint, and a finished one is read back, not trained again."""
    best = space.trial_config(cfg, values).to_dict()
    out = []
    for k in range(1, cfg.tune.seeds):
        data = {**best, "finetune": {**best["finetune"], "seed": best["finetune"]["seed"] + k}}
        run_dir = storage.join(layout.runs(cell), f"seed{k}")
        summary = _finetune_once(from_dict(data, "seed"), run_dir, options)
        out.append({"seed": data["finetune"]["seed"], "run_dir": run_dir,
                    "test": summary["test"]})
    return out


def _finetune_once(cfg: ExperimentConfig, run_dir: str, options: StorageOptions) -> dict[str, Any]:
    """Fine-tune into ``run_dir`` unless it finished before; its ``metrics.json`` summary."""
    from sslmm_ray.train.runner import run_stage

    metrics_uri = RunDir(run_dir).metrics
    if not storage.exists(metrics_uri, options):
        run_stage("finetune", cfg, run_dir)
    return storage.read_json(metrics_uri, options)


def run_baseline(
    cfg: ExperimentConfig, cell: Cell, layout: Layout, options: StorageOptions
) -> dict[str, Any]:
    """Supervised-only fine-tuning of the cell at default hyper-parameters (runs once)."""
    run_dir = layout.baseline(cell)
    data = cfg.to_dict()
    data["missing"]["rate"] = cell.missing_rate
    data["finetune"].update(
        label_ratio=cell.label_ratio,
        pseudo_labels=False,
        reconstruction=False,
        pretrained=space.cell_pretrained(
            data["finetune"]["pretrained"], cell.label_ratio, cell.missing_rate
        ),
    )
    summary = _finetune_once(from_dict(data, "baseline"), run_dir, options)
    return {"run_dir": run_dir, "valid": summary["valid"], "test": summary["test"]}
