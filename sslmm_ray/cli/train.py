"""``sslmm pretrain | finetune | evaluate | predict | demo``: the stages and their use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sslmm_ray.cli.app import (
    AllowConfigChange,
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
    out,
)
from sslmm_ray.cli.render import metrics_table
from sslmm_ray.errors import UserError


@app.command()
def pretrain(
    data: Annotated[str, typer.Option(help="Dataset URI.")],
    run_dir: Annotated[str, typer.Option(help="Run directory URI (re-use it to resume).")],
    missing_rate: Annotated[float | None, config_option("missing.rate")] = None,
    protocol: Annotated[ProtocolChoice | None, config_option("missing.protocol")] = None,
    mask_seed: Annotated[int | None, config_option("missing.seed")] = None,
    workers: Annotated[int | None, config_option("pretrain.workers")] = None,
    gpus: Annotated[bool | None, config_option("pretrain.gpus", "--gpus/--no-gpus")] = None,
    precision: Annotated[PrecisionChoice | None, config_option("pretrain.precision")] = None,
    epochs: Annotated[int | None, config_option("pretrain.epochs")] = None,
    max_failures: Annotated[int | None, config_option("pretrain.max_failures")] = None,
    seed: Annotated[int | None, config_option("pretrain.seed")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    s3_endpoint: S3Endpoint = None,
    allow_config_change: AllowConfigChange = False,
    break_lock: BreakLock = False,
    as_json: JsonFlag = False,
) -> None:
    """Self-supervised pre-training on every training sample (labels never read)."""
    from sslmm_ray.train.runner import run_stage

    cfg = build_config(
        config, overrides,
        data={"uri": data, "s3_endpoint": s3_endpoint},
        missing={"rate": missing_rate, "protocol": protocol.value if protocol else None,
                 "seed": mask_seed},
        pretrain={"workers": workers, "gpus": gpus, "epochs": epochs,
                  "precision": precision.value if precision else None,
                  "max_failures": max_failures, "seed": seed},
    )
    result = run_stage("pretrain", cfg, run_dir, allow_config_change=allow_config_change,
                       break_lock=break_lock)
    emit({"run_dir": result.run_dir, "checkpoint": result.checkpoint, "best": result.best},
          as_json)


@app.command()
def finetune(
    data: Annotated[str, typer.Option(help="Dataset URI.")],
    run_dir: Annotated[str, typer.Option(help="Run directory URI (re-use it to resume).")],
    label_ratio: Annotated[float | None, config_option("finetune.label_ratio")] = None,
    missing_rate: Annotated[float | None, config_option("missing.rate")] = None,
    protocol: Annotated[ProtocolChoice | None, config_option("missing.protocol")] = None,
    mask_seed: Annotated[int | None, config_option("missing.seed")] = None,
    pretrained: Annotated[str | None, config_option("finetune.pretrained")] = None,
    tau: Annotated[float | None, config_option("finetune.tau")] = None,
    lambda_rec: Annotated[float | None, config_option("finetune.lambda_rec")] = None,
    pseudo_labels: Annotated[bool | None, config_option(
        "finetune.pseudo_labels", "--pseudo-labels/--no-pseudo-labels")] = None,
    reconstruction: Annotated[bool | None, config_option(
        "finetune.reconstruction", "--reconstruction/--no-reconstruction")] = None,
    graph_labels: Annotated[bool | None, config_option(
        "finetune.graph_labels", "--graph-labels/--no-graph-labels")] = None,
    propagation: Annotated[str | None, config_option("model.propagation")] = None,
    fusion: Annotated[str | None, config_option("model.fusion")] = None,
    workers: Annotated[int | None, config_option("finetune.workers")] = None,
    gpus: Annotated[bool | None, config_option("finetune.gpus", "--gpus/--no-gpus")] = None,
    precision: Annotated[PrecisionChoice | None, config_option("finetune.precision")] = None,
    epochs: Annotated[int | None, config_option("finetune.epochs")] = None,
    max_failures: Annotated[int | None, config_option("finetune.max_failures")] = None,
    seed: Annotated[int | None, config_option("finetune.seed")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    s3_endpoint: S3Endpoint = None,
    allow_config_change: AllowConfigChange = False,
    break_lock: BreakLock = False,
    as_json: JsonFlag = False,
) -> None:
    """Semi-supervised fine-tuning with modality reconstruction; writes metrics.json."""
    from sslmm_ray.train.runner import run_stage

    cfg = build_config(
        config, overrides,
        data={"uri": data, "s3_endpoint": s3_endpoint},
        model={"propagation": propagation, "fusion": fusion},
        missing={"rate": missing_rate, "protocol": protocol.value if protocol else None,
                 "seed": mask_seed},
        finetune={
            "label_ratio": label_ratio, "pretrained": pretrained,
            "tau": tau, "lambda_rec": lambda_rec, "pseudo_labels": pseudo_labels,
            "reconstruction": reconstruction, "graph_labels": graph_labels,
            "workers": workers, "gpus": gpus,
            "precision": precision.value if precision else None, "epochs": epochs,
            "max_failures": max_failures, "seed": seed,
        },
    )
    result = run_stage("finetune", cfg, run_dir, allow_config_change=allow_config_change,
                       break_lock=break_lock)
    if as_json:
        emit({"run_dir": result.run_dir, "checkpoint": result.checkpoint,
               "valid": result.best, "test": result.test}, True)
    else:
        out.print(metrics_table(f"test metrics ({run_dir})", {"test": result.test}))


@app.command()
def evaluate(
    data: Annotated[str, typer.Option(help="Dataset URI.")],
    checkpoint: Annotated[str, typer.Option(help="Checkpoint or run directory (its best).")],
    split: Annotated[str, typer.Option(help="train | valid | test.")] = "test",
    missing_rate: Annotated[float | None, typer.Option(
        help="Test missing rate (default: the one the checkpoint trained under).")] = None,
    protocol: Annotated[ProtocolChoice | None, typer.Option(help="Missingness protocol.")] = None,
    seed: Annotated[int | None, typer.Option(
        "--mask-seed", "--seed",
        help="Seed of the masks (default: the one the checkpoint trained under).")] = None,
    curve: Annotated[bool, typer.Option(
        "--curve", help="Evaluate test missing rates 0.0 to 0.9: JSON + PNG robustness curve.")
    ] = False,
    pseudo: Annotated[bool, typer.Option(
        "--pseudo-labels", help="Offline diagnostic of a fine-tuning run directory: sign "
        "accuracy of its pseudo-labels against the withheld training labels (never fed back)."
    )] = False,
    curve_out: Annotated[str | None, typer.Option(
        "--out", help="Where --curve writes curve.json and curve.png (default: the checkpoint's "
                      "run directory, or ./curve).")] = None,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """MMSA metrics of a checkpoint on a split (or a robustness curve with --curve)."""
    from sslmm_ray import ray_env
    from sslmm_ray.storage import StorageOptions
    from sslmm_ray.train.evaluate import evaluate_checkpoint, robustness_curve

    # Ray Data tasks read the data on any node; the model runs here on the driver.
    ray_env.check_paths_reach_every_node(ray_env.init(), {"--data": data})
    options = StorageOptions.from_env(s3_endpoint)
    proto = protocol.value if protocol else None
    if pseudo:
        from sslmm_ray.train.diagnostics import pseudo_label_report

        emit(pseudo_label_report(checkpoint, options), as_json)
        return
    if curve:
        if missing_rate is not None:
            raise UserError("--curve evaluates every missing rate; drop --missing-rate")
        target = curve_out or str(Path("curve").resolve())
        result = robustness_curve(checkpoint, data, target, options, split=split,
                                  protocol=proto, seed=seed)
        table = Table(title=f"robustness curve ({split}) -> {target}")
        for col in ("missing rate", result["headline"], "MAE", "Corr"):
            table.add_column(col, justify="right")
        for p in result["points"]:
            table.add_row(f"{p['missing_rate']:.1f}", f"{p[result['headline']]:.4f}",
                          f"{p['MAE']:.4f}", f"{p['Corr']:.4f}")
        emit(result, as_json, table)
        return
    result = evaluate_checkpoint(
        checkpoint, data, options, split=split, missing_rate=missing_rate, protocol=proto,
        seed=seed,
    )
    emit(result, as_json, metrics_table(f"{split} metrics", {checkpoint: result}))


@app.command()
def predict(
    data: Annotated[str, typer.Option(help="Dataset URI.")],
    checkpoint: Annotated[str, typer.Option(help="Checkpoint or run directory (its best).")],
    out_uri: Annotated[str, typer.Option("--out", help="Output folder URI for Parquet files.")],
    splits: Annotated[str, typer.Option(help="Comma-separated splits to predict.")] = (
        "train,valid,test"),
    missing_rate: Annotated[float, typer.Option(
        help="Hide modalities on top of what the data lacks (default: nothing).")] = 0.0,
    protocol: Annotated[ProtocolChoice, typer.Option(help="Missingness protocol.")] = (
        ProtocolChoice.modality),
    seed: Annotated[int, typer.Option(
        "--mask-seed", "--seed", help="Seed of the missingness masks.")] = 0,
    concurrency: Annotated[int, typer.Option(help="Ray Data actors running the model.")] = 1,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Batch inference with Ray Data: Parquet of id, prediction and modalities present."""
    from sslmm_ray import ray_env
    from sslmm_ray.storage import StorageOptions
    from sslmm_ray.train.predict import predict as run_predict

    # The model runs in Ray Data actors, which read the data and write the output anywhere.
    ray_env.check_paths_reach_every_node(
        ray_env.init(), {"--data": data, "--checkpoint": checkpoint, "--out": out_uri})
    summary = run_predict(
        checkpoint, data, out_uri, StorageOptions.from_env(s3_endpoint),
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
        missing_rate=missing_rate, protocol=protocol.value, seed=seed, concurrency=concurrency,
    )
    emit(summary, as_json)


@app.command()
def demo(
    work_dir: Annotated[Path, typer.Option(help="Where the demo writes data and runs.")] = Path(
        "demo_runs"),
    scale: Annotated[float, typer.Option(help="Synthetic mosi scale.")] = 0.5,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 12,
    pretrain_epochs: Annotated[int, typer.Option(help="Pre-training epochs.")] = 15,
    aligned: Annotated[bool, typer.Option(help="Word-aligned mosi shapes (faster).")] = True,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 2,
) -> None:
    """Synthetic data -> pre-training, SSLMM and supervised-only fine-tuning on Ray -> metrics."""
    from sslmm_ray.demo import run_demo

    run_demo(work_dir=work_dir.resolve(), scale=scale, epochs=epochs,
             pretrain_epochs=pretrain_epochs, aligned=aligned, workers=workers, console=out)
