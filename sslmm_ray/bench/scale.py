"""``sslmm bench data --scale 1,10``: memory stays flat and throughput holds as data grows.

For each scale of the ``scalable`` preset (MOSI's shapes, ~200 KB per row), each in fresh
processes so that every peak is its own:

* **writer**: ``sslmm data synth --preset scalable --scale S`` in a child; its peak RSS.
* **driver** and **training worker**: a child opens the store and runs a ``TorchTrainer`` with
  one worker that streams the training split (the default path: no cache) into a trivial
  consumer for a few epochs; the worker reports its peak private memory (sampled every batch),
  its peak RSS and rows/s (median of the epochs after the first), the child its own peak RSS.

The result gives each figure per scale and the ratios largest / smallest scale: peaks within
1.3x and rows/s within 0.8x mean that nothing holds the data set in memory. The worker's RSS
also counts the pages of Ray's shared object store that it has read (see :func:`_anon_mb`),
which grow with the blocks read up to the store's fixed size: its private memory is the
figure that says whether the worker itself holds the data.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run"]

_WRITER = """
import resource, sys, time
from sslmm_ray.cli import main
sys.argv = ["sslmm", "data", "synth", "--preset", "scalable", "--scale", sys.argv[1],
            "--out", sys.argv[2]]
started = time.perf_counter()
try:
    main()
except SystemExit as exit_:
    if exit_.code:
        raise
print("BENCH", time.perf_counter() - started,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _anon_mb() -> float:
    """This process's private resident memory (Linux ``RssAnon``).

    A Ray worker maps the object store's shared memory, and every page of it that it reads
    counts in its RSS, so its RSS grows with the number of distinct blocks read even though
    the object store's size is fixed; the private part is what the process itself holds.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: list[str], timeout: float) -> str:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "SSLMM_PROGRESS": "0"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed: {done.stderr[-2000:]}")
    return done.stdout


def _write(scale: float, uri: str, timeout: float) -> dict[str, float]:
    out = _child(["-c", _WRITER, str(scale), uri], timeout)
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH "))
    seconds, rss_kib = line.split()[1:]
    return {"seconds": round(float(seconds), 2), "peak_rss_mb": round(float(rss_kib) / 1024, 1)}


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train

    from sslmm_ray.bench.data import _consume

    shard = ray.train.get_dataset_shard("train")
    rates, peak_anon = [], _anon_mb()

    def sampled(batches):
        nonlocal peak_anon
        for batch in batches:
            peak_anon = max(peak_anon, _anon_mb())
            yield batch

    for _ in range(config["epochs"]):
        started = time.perf_counter()
        rows, _ = _consume(
            sampled(shard.iter_torch_batches(
                batch_size=config["batch_size"], prefetch_batches=config["prefetch_batches"]
            )),
            0.0,
        )
        rates.append(rows / (time.perf_counter() - started))
    # A file, not ray.train.report: Train V2 keeps only metrics that come with a checkpoint.
    Path(config["out"]).write_text(json.dumps({
        "rows_per_s": statistics.median(rates[1:] or rates), "peak_rss_mb": _peak_mb(),
        "peak_private_mb": peak_anon,
    }))


def stream(uri: str, epochs: int, batch_size: int = 64) -> dict[str, Any]:
    """One streaming run (in this process, which should be fresh): worker and driver figures."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sslmm_ray import config as config_mod
    from sslmm_ray import ray_env
    from sslmm_ray.data import pipeline, protocols, store

    ray_env.init()
    data = config_mod.DatasetConfig()
    manifest = store.open_dataset(uri)
    spec = protocols.ProtocolSpec(missing_rate=0.5, seed=0)
    train = pipeline.split_dataset(manifest, "train", spec, shuffle_seed=0)
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-scale-run-") as tmp:
        out = Path(tmp) / "worker.json"  # the worker runs on this machine
        TorchTrainer(
            _worker_loop,
            train_loop_config={"epochs": epochs, "batch_size": batch_size,
                               "prefetch_batches": data.prefetch_batches, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=tmp, name="scale"),
            datasets={"train": train},
        ).fit()
        metrics = json.loads(out.read_text())
    return {
        "train_rows": manifest.counts["train"],
        "rows_per_s": round(metrics["rows_per_s"], 1),
        "worker_peak_rss_mb": round(metrics["peak_rss_mb"], 1),
        "worker_peak_private_mb": round(metrics["peak_private_mb"], 1),
        "driver_peak_rss_mb": round(_peak_mb(), 1),
    }


def run(
    *, scales: tuple[float, ...] = (1.0, 10.0), epochs: int = 3, timeout: float = 3600.0
) -> dict[str, Any]:
    """Write and stream each scale in fresh processes; per-scale figures and the ratios."""
    if len(scales) < 2:
        raise ValueError("give at least two scales, e.g. 1,10")
    per_scale: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sslmm-bench-scale-") as tmp:
        for scale in scales:
            uri = str(Path(tmp) / f"scalable-{scale:g}")
            writer = _write(scale, uri, timeout)
            out = _child(["-m", "sslmm_ray.bench.scale", uri, str(epochs)], timeout)
            streamed = json.loads(out[out.index("{"): out.rindex("}") + 1])
            per_scale[f"{scale:g}"] = {
                "writer_seconds": writer["seconds"],
                "writer_peak_rss_mb": writer["peak_rss_mb"],
                **streamed,
            }
    small, large = per_scale[f"{min(scales):g}"], per_scale[f"{max(scales):g}"]
    ratios = {
        key: round(large[key] / small[key], 3)
        for key in ("writer_peak_rss_mb", "driver_peak_rss_mb", "worker_peak_private_mb",
                    "worker_peak_rss_mb", "rows_per_s", "train_rows")
    }
    return {
        "preset": "scalable",
        "epochs": epochs,
        "scales": per_scale,
        "ratio_largest_to_smallest": ratios,
        "goal": "writer, driver and worker private peaks <= 1.3x, rows_per_s ratio >= 0.8",
    }


if __name__ == "__main__":
    print(json.dumps(stream(sys.argv[1], int(sys.argv[2]))))
