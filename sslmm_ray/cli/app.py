"""The Typer apps, the option types the commands share and the console-script entry.

The command modules (data, train, tune, bench) register on these apps when the package is
imported; rendering lives in :mod:`sslmm_ray.cli.render`. Errors a user can fix (bad config,
bad data, bad checkpoint, unreachable storage) print one clear line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
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


def build_config(
    config_file: Path | None, overrides: list[str] | None, **sections: dict[str, Any]
) -> ExperimentConfig:
    """File, then --set overrides, then the explicit flags (flags left unset change nothing)."""
    cfg = config_mod.load(config_file, overrides or [])
    return config_mod.replace(cfg, **sections)


def emit(result: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        out.print_json(json.dumps(result, default=str))
    elif table is not None:
        out.print(table)
    else:
        out.print(result)


def config_option(dotted: str, *flags: str) -> Any:
    """A typer option for a config field, its help taken from the field's description (each
    setting is documented once, in :mod:`sslmm_ray.config`)."""
    return typer.Option(*flags, help=config_mod.describe(dotted))


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"

BreakLock = Annotated[bool, typer.Option(
    "--break-lock", help="Take over the lock of a writer that is gone (its error names it).")]
AllowConfigChange = Annotated[bool, typer.Option(
    "--allow-config-change",
    help="Resume a run directory under settings other than its config.json (kept as "
         "config.before-<time>.json).")]


def float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
