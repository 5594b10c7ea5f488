"""``sslmm tune | report | dashboards``: the (label ratio x missing rate) sweep, its report and
the files its dashboards read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sslmm_ray.cli.app import (
    BreakLock,
    ConfigFile,
    JsonFlag,
    Overrides,
    PrecisionChoice,
    ProtocolChoice,
    S3Endpoint,
    app,
    build_config,
    config_option,
    emit,
    float_list,
    out,
)


@app.command()
def tune(
    data: Annotated[str, typer.Option(help="Dataset URI.")],
    storage_uri: Annotated[str, typer.Option("--storage", help="Sweep storage URI (path or "
                                             "s3://); re-run the same command to resume.")],
    label_ratios: Annotated[str | None, typer.Option(
        help="Comma-separated label ratios, e.g. 0.1,0.3,0.5,0.7.")] = None,
    missing_rates: Annotated[str | None, typer.Option(
        help="Comma-separated missing rates, e.g. 0.0,0.3,0.5,0.6 (modality-level: <= 2/3).")
    ] = None,
    protocol: Annotated[ProtocolChoice | None, config_option("missing.protocol")] = None,
    samples: Annotated[int | None, config_option("tune.samples")] = None,
    concurrency: Annotated[int | None, config_option("tune.concurrency")] = None,
    max_concurrent_trials: Annotated[int | None, config_option(
        "tune.max_concurrent_trials")] = None,
    workers_per_trial: Annotated[int | None, config_option("tune.workers_per_trial")] = None,
    gpus: Annotated[bool | None, typer.Option(
        "--gpus/--no-gpus", help="One GPU per trial worker (nccl); the cluster needs "
        "concurrency x workers-per-trial GPUs.")] = None,
    precision: Annotated[PrecisionChoice | None, config_option("finetune.precision")] = None,
    pretrained: Annotated[str | None, typer.Option(
        help="Pre-training checkpoint or run dir; may contain {missing_rate}.")] = None,
    epochs: Annotated[int | None, config_option("finetune.epochs")] = None,
    asha: Annotated[bool | None, config_option("tune.asha", "--asha/--no-asha")] = None,
    baseline: Annotated[bool, typer.Option(
        "--baseline", help="Also run each cell's supervised-only baseline.")] = False,
    seed: Annotated[int | None, config_option("tune.seed")] = None,
    seeds: Annotated[int | None, config_option("tune.seeds")] = None,
    max_failures: Annotated[int | None, config_option("tune.max_failures")] = None,
    optuna_storage: Annotated[str | None, config_option("tune.optuna_storage")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    s3_endpoint: S3Endpoint = None,
    break_lock: BreakLock = False,
    as_json: JsonFlag = False,
) -> None:
    """Hyper-parameter search (Ray Tune + Optuna) in every (label ratio, missing rate) cell."""
    from sslmm_ray.tune.sweep import run_sweep

    cfg = build_config(
        config, overrides,
        data={"uri": data, "s3_endpoint": s3_endpoint},
        missing={"protocol": protocol.value if protocol else None},
        finetune={"pretrained": pretrained,
                  "epochs": epochs, "gpus": gpus,
                  "precision": precision.value if precision else None},
        tune={
            "label_ratios": float_list(label_ratios, "--label-ratios") if label_ratios else None,
            "missing_rates": (float_list(missing_rates, "--missing-rates")
                              if missing_rates else None),
            "samples": samples, "concurrency": concurrency,
            "max_concurrent_trials": max_concurrent_trials,
            "workers_per_trial": workers_per_trial, "asha": asha, "seed": seed, "seeds": seeds,
            "max_failures": max_failures, "optuna_storage": optuna_storage,
        },
    )
    result = run_sweep(cfg, storage_uri, baseline=baseline, verbose=0 if as_json else 1,
                       break_lock=break_lock)
    if as_json:
        emit(result, True)
        return
    metric = result["metric"].removeprefix("valid_")
    table = Table(title=f"sweep {storage_uri} ({result['wall_s']:.0f} s)")
    for col in ("cell", "tau", "lambda_rec", f"valid {metric}", f"test {metric}", "test MAE"):
        table.add_column(col)
    for c in result["cells"]:
        best = c["best"]
        table.add_row(c["cell"], f"{best['config']['tau']:.3f}",
                      f"{best['config']['lambda_rec']:.3g}", f"{best['valid'][metric]:.4f}",
                      f"{best['test'][metric]:.4f}", f"{best['test']['MAE']:.4f}")
    out.print(table)
    if result["optuna_storage"]:
        out.print(f"Optuna studies: optuna-dashboard {result['optuna_storage']}",
                  highlight=False, soft_wrap=True)


@app.command()
def report(
    storage_uri: Annotated[str, typer.Argument(help="Sweep storage URI (as given to tune).")],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Also write the report files to this local folder.")] = None,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Markdown/CSV tables and heatmaps of a sweep's test metrics (into <storage>/report/)."""
    from sslmm_ray.storage import StorageOptions
    from sslmm_ray.tune.report import write_report

    result = write_report(storage_uri, out_dir, StorageOptions.from_env(s3_endpoint))
    if as_json:
        emit({k: result[k] for k in ("headline", "rows", "files")}, True)
    else:
        out.print(result["markdown"], markup=False, highlight=False, soft_wrap=True)
        out.print("written: " + ", ".join(result["files"]), highlight=False, soft_wrap=True)


@app.command()
def dashboards(
    storage_uri: Annotated[str, typer.Argument(help="Sweep storage URI (as given to tune).")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Local folder for the TensorBoard files and Tune's trial records.")],
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Fetch a sweep's TensorBoard files and Tune results; print the commands that open them."""
    from sslmm_ray.storage import StorageOptions
    from sslmm_ray.tune.dashboards import fetch

    result = fetch(storage_uri, out_dir, StorageOptions.from_env(s3_endpoint))
    if as_json:
        emit(result, True)
        return
    out.print(f"{len(result['files'])} files ({result['event_files']} TensorBoard event files) "
              f"in {result['out']}", highlight=False, soft_wrap=True)
    for command in result["commands"].values():
        out.print(command, markup=False, highlight=False, soft_wrap=True)
