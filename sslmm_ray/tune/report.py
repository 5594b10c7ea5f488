"""``sslmm report``: the sweep's grid as Markdown and CSV tables and PNG heatmaps.

Everything comes from the cells' ``results/<cell>.json`` (written by the sweep after each cell's
best trial was tested), so a report can be rebuilt at any time, even mid-sweep, from storage
alone. Files go to ``<storage>/report/`` and, when asked, to a local folder too.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from sslmm_ray import storage
from sslmm_ray.storage import StorageOptions
from sslmm_ray.tune.sweep import RESULTS

REPORT_DIR = "report"


def load_results(storage_uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """Every finished cell's result, ordered by (label ratio, missing rate)."""
    files = storage.list_files(storage.join(storage_uri, RESULTS), options, suffix=".json")
    cells = [storage.read_json(f, options) for f in files]
    if not cells:
        raise FileNotFoundError(
            f"{storage_uri} holds no finished cell ({RESULTS}/*.json); run `sslmm tune` first"
        )
    return sorted(cells, key=lambda c: (c["label_ratio"], c["missing_rate"]))


def headline_of(cells: list[dict[str, Any]]) -> str:
    """Non0_acc_2 (MOSI/MOSEI) or Mult_acc_2 (SIMS): the metric reports lead with."""
    return cells[0].get("headline") or cells[0]["metric"].removeprefix("valid_")


def selected_by(cells: list[dict[str, Any]]) -> str:
    """The validation metric that chose each cell's trial and checkpoint."""
    return cells[0]["metric"].removeprefix("valid_")


def rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per cell: grid position, chosen hyper-parameters, test and baseline."""
    out = []
    for c in cells:
        best = c["best"]
        row: dict[str, Any] = {
            "cell": c["cell"],
            "label_ratio": c["label_ratio"],
            "missing_rate": c["missing_rate"],
            **{k: best["config"][k] for k in ("tau", "lambda_rec", "lr", "unlabeled_weight")},
            "trial_id": best["trial_id"],
            "trials": len(c["trials"]),
            f"valid_{headline_of([c])}": best["valid"].get(headline_of([c])),
            f"valid_{selected_by([c])}": best["valid"].get(selected_by([c])),
        }
        row.update({f"test_{k}": v for k, v in best["test"].items()})
        if len(best.get("seeds") or []) > 1:  # the best hyper-parameters under several seeds
            row["seeds"] = len(best["seeds"])
            row.update({f"test_{k}_mean": v for k, v in best["test_mean"].items()})
            row.update({f"test_{k}_std": v for k, v in best["test_std"].items()})
        base = c.get("baseline")
        if base and base.get("test"):
            row.update({f"baseline_test_{k}": v for k, v in base["test"].items()})
        out.append(row)
    return out


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.01 or abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def markdown(table: list[dict[str, Any]], headline: str, selected: str | None = None) -> str:
    """The human table: test headline/MAE/Corr with the chosen tau and lambda_rec."""
    has_baseline = any(f"baseline_test_{headline}" in r for r in table)
    cols = [
        ("label ratio", "label_ratio"), ("missing rate", "missing_rate"), ("tau", "tau"),
        ("lambda_rec", "lambda_rec"), ("lr", "lr"), ("unlabeled w", "unlabeled_weight"),
        (f"valid {headline}", f"valid_{headline}"), (f"test {headline}", f"test_{headline}"),
        ("test MAE", "test_MAE"), ("test Corr", "test_Corr"),
    ]
    if any("seeds" in r for r in table):
        cols += [(f"test {headline} mean", f"test_{headline}_mean"),
                 ("± std", f"test_{headline}_std"), ("test MAE mean", "test_MAE_mean"),
                 ("± std", "test_MAE_std"), ("seeds", "seeds")]
    if has_baseline:
        cols += [(f"baseline {headline}", f"baseline_test_{headline}"),
                 ("baseline MAE", "baseline_test_MAE")]
    cols.append(("trials", "trials"))
    lines = [
        "| " + " | ".join(c for c, _ in cols) + " |",
        "|" + "|".join("---:" for _ in cols) + "|",
    ]
    grid_keys = ("label_ratio", "missing_rate")
    lines += [
        "| " + " | ".join(f"{r[k]:g}" if k in grid_keys else _fmt(r.get(k)) for _, k in cols)
        + " |"
        for r in table
    ]
    note = (
        f"\nBest trial per cell chosen by validation {selected or headline} (best epoch of each "
        "trial); test metrics of its best "
        "checkpoint, evaluated once."
    )
    if any("seeds" in r for r in table):
        note += (" Mean and std: its hyper-parameters retrained under that many training seeds "
                 "(the trial's own first), each tested once.")
    if has_baseline:
        note += " Baseline: supervised only (no pseudo-labels, no reconstruction), defaults."
    return "# SSLMM sweep report\n\n" + "\n".join(lines) + "\n" + note + "\n"


def to_csv(table: list[dict[str, Any]]) -> str:
    fields: list[str] = []
    for r in table:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def cell_labels(table: list[dict[str, Any]], key: str, beside: str | None = None,
                spread: str | None = None) -> dict[tuple[float, float], str]:
    """Each cell's annotation: its value of ``key`` (``± spread``'s value: the std over seeds),
    and ``beside``'s value (the baseline) under it, so the two read side by side."""
    labels = {}
    for r in table:
        value, other = r.get(key), r.get(beside) if beside else None
        if value is None:
            continue
        text = f"{value:.3f}"
        if spread and r.get(spread) is not None:
            text += f" ± {r[spread]:.3f}"
        if other is not None:
            text += f"\nbase {other:.3f}"
        labels[(r["label_ratio"], r["missing_rate"])] = text
    return labels


def heatmap_png(table: list[dict[str, Any]], key: str, title: str,
                beside: str | None = None, spread: str | None = None) -> bytes:
    """Label ratio (rows) x missing rate (columns) of one column, annotated (with ``beside``'s
    value under each, e.g. the baseline's); empty cells grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ratios = sorted({r["label_ratio"] for r in table})
    rates = sorted({r["missing_rate"] for r in table})
    grid = np.full((len(ratios), len(rates)), np.nan)
    for r in table:
        if r.get(key) is not None:
            grid[ratios.index(r["label_ratio"]), rates.index(r["missing_rate"])] = r[key]
    fig, ax = plt.subplots(figsize=(1.2 * len(rates) + 2.5, 1.0 * len(ratios) + 1.8))
    cmap = "viridis_r" if key.endswith("MAE") else "viridis"
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(len(rates)), [f"{m:g}" for m in rates])
    ax.set_yticks(range(len(ratios)), [f"{x:g}" for x in ratios])
    ax.set_xlabel("missing rate")
    ax.set_ylabel("label ratio")
    ax.set_title(title)
    for (ratio, rate), text in cell_labels(table, key, beside, spread).items():
        ax.text(rates.index(rate), ratios.index(ratio), text, ha="center", va="center",
                color="w")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def build(storage_uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """The report's files (name -> bytes) and its rows."""
    cells = load_results(storage_uri, options)
    headline = headline_of(cells)
    table = rows(cells)
    has_baseline = any(f"baseline_test_{headline}" in r for r in table)

    seeds = max((r.get("seeds", 1) for r in table), default=1)

    def heatmap(metric: str) -> bytes:
        key, spread, title = f"test_{metric}", None, f"test {metric}"
        if seeds > 1:
            key, spread = f"{key}_mean", f"{key}_std"
            title += f", mean ± std over {seeds} seeds"
        if has_baseline:
            title += " (base: supervised only)"
        return heatmap_png(table, key, title, spread=spread,
                           beside=f"baseline_test_{metric}" if has_baseline else None)

    files = {
        "report.md": markdown(table, headline, selected_by(cells)).encode(),
        "report.csv": to_csv(table).encode(),
        f"heatmap_{headline}.png": heatmap(headline),
        "heatmap_MAE.png": heatmap("MAE"),
    }
    return {"headline": headline, "rows": table, "files": files}


def write_report(
    storage_uri: str, out_dir: str | Path | None = None, options: StorageOptions | None = None
) -> dict[str, Any]:
    """Build the report and write it to ``<storage>/report/`` (and ``out_dir``)."""
    report = build(storage_uri, options)
    written = []
    for name, data in report["files"].items():
        uri = storage.join(storage_uri, REPORT_DIR, name)
        storage.write_bytes(uri, data, options)
        written.append(uri)
        if out_dir is not None:
            path = Path(out_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(str(path))
    return {
        "headline": report["headline"],
        "rows": report["rows"],
        "markdown": report["files"]["report.md"].decode(),
        "files": written,
    }


__all__ = ["build", "load_results", "write_report"]
