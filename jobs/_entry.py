"""Shared body of the ``ray job submit`` entry points in this folder.

Each entry point is ``sslmm <subcommand>`` under another name: it takes exactly the options of
that subcommand (``python jobs/finetune.py --help`` prints them) and exits with the CLI's status,
so a user error (bad option, bad config, unreachable storage) fails the Ray job with the CLI's
one-line message in ``ray job logs``.

Cluster workers may be spot instances that disappear: unless the job's environment says
otherwise, training and trials restart up to ``CLUSTER_MAX_FAILURES`` times
(``SSLMM_MAX_FAILURES``; a config file or ``--max-failures`` still wins). The local ``sslmm``
keeps 0, where a failure is a bug to see at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The repository root when this file runs from a checkout or from a job's working_dir.
ROOT = Path(__file__).resolve().parent.parent
CLUSTER_MAX_FAILURES = "3"


def option_value(args: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``args`` (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def run_then(subcommand: str, then: list[str]) -> None:
    """Run ``sslmm <subcommand> <arguments>``; when it succeeds, ``sslmm <then...>``."""
    try:
        run(subcommand)
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    _main(then)


def run(subcommand: str) -> None:
    """Run ``sslmm <subcommand> <this script's arguments>``."""
    _main([*subcommand.split(), *sys.argv[1:]])


def _main(args: list[str]) -> None:
    # `python jobs/x.py` puts jobs/ (not the working_dir) first on sys.path. When the job ships
    # the package in its working_dir, import that copy: it is the one the Train workers import
    # (Ray puts the working_dir on their path), so driver and workers run the same code.
    if (ROOT / "sslmm_ray" / "__init__.py").is_file() and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from sslmm_ray.cli import main

    os.environ.setdefault("SSLMM_MAX_FAILURES", CLUSTER_MAX_FAILURES)
    sys.argv = ["sslmm", *args]
    try:
        main()
    except Exception as err:
        # A usage error (unknown option, bad value) must end the job with click's one-line
        # message and status 2, not a traceback. typer >= 0.29 vendors click as typer._click,
        # whose exceptions are not click.ClickException, so match on the interface.
        if callable(getattr(err, "show", None)) and isinstance(
            getattr(err, "exit_code", None), int
        ):
            err.show()
            sys.exit(err.exit_code)
        raise
