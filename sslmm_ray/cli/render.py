"""Tables for people: rich renderings of results (the --json forms print the dicts)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table


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


def normalization_line(summary: dict[str, Any] | None) -> str:
    """One line: are train statistics stored, and how far apart are the feature scales."""
    if summary is None:
        return "normalisation: no statistics (older store: re-write it, or data.normalize=false)"
    return "normalisation: train mean/std per feature; std " + ", ".join(
        f"{m} {s['std_min']:.3g}..{s['std_max']:.3g}" for m, s in summary.items()
    )


def figures_table(name: str, result: dict[str, Any]) -> Table:
    """A benchmark's nested figures, one dotted key per row."""
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
    return table


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
