"""Shard decode speed, format 1 (fixed_size_list) against format 2 (fixed_size_binary), in-process.

One shard of MOSI unaligned rows (~200 KB each) encoded both ways as the store writes it (one
row group, no compression), then per repeat: Parquet bytes -> Arrow table -> numpy arrays of the
RawDataset layout. That is the work each streaming read task does per shard, without Ray.
The figure is docs/DATA.md's ("Storage format").

    python -m sslmm_ray.bench.decode rows=256 repeats=7     # JSON to stdout
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sslmm_ray.config import MODALITIES
from sslmm_ray.data import store, synth
from sslmm_ray.data.sources import PRESETS


def _v1_table(table: pa.Table, arrays: dict[str, np.ndarray]) -> pa.Table:
    """The same rows with format 1's feature columns: fixed_size_list<float32>[T*d]."""
    for m in MODALITIES:
        feats = np.ascontiguousarray(arrays[m], np.float32).reshape(len(arrays[m]), -1)
        lists = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
        table = table.set_column(table.schema.get_field_index(m), m, lists)
    return table


def _time(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(rows: int = 256, repeats: int = 7) -> dict[str, Any]:
    """Seconds per shard (best and median of ``repeats``) for each format; ms per row."""
    scale = 1.05 * rows / PRESETS["mosi"].split_sizes["train"]
    raw = synth.generate("mosi", scale=scale, aligned=False, seed=0)
    arrays = {k: v[:rows] for k, v in raw.splits["train"].items()}
    modalities = {
        m: store.ModalitySpec(dim=raw.dims()[m], length=raw.max_lengths()[m]) for m in MODALITIES
    }
    v2 = store._split_table("train", arrays, store.arrow_schema(modalities))  # type: ignore[arg-type]
    payloads = {
        "v1_fixed_size_list": store._encode_shard(_v1_table(v2, arrays), "none"),
        "v2_fixed_size_binary": store._encode_shard(v2, "none"),
    }
    decoders: dict[str, Callable[[pa.Table], Any]] = {
        "v1_fixed_size_list": lambda t: store.decode_features_v1(t, modalities),
        "v2_fixed_size_binary": lambda t: store.decode_table(t, modalities),
    }
    want = store.decode_table(v2, modalities)
    out: dict[str, Any] = {"rows": rows, "repeats": repeats}
    for name, payload in payloads.items():
        decode = decoders[name]
        got = decode(pq.read_table(pa.BufferReader(payload)))
        assert all(np.array_equal(got[m], want[m]) for m in MODALITIES), name
        times = _time(lambda p=payload, d=decode: d(pq.read_table(pa.BufferReader(p))), repeats)
        out[name] = {
            "bytes": len(payload),
            "best_ms_per_row": 1000 * min(times) / rows,
            "median_ms_per_row": 1000 * statistics.median(times) / rows,
        }
    old, new = out["v1_fixed_size_list"], out["v2_fixed_size_binary"]
    out["speedup_best"] = old["best_ms_per_row"] / new["best_ms_per_row"]
    out["speedup_median"] = old["median_ms_per_row"] / new["median_ms_per_row"]
    return out


def main(argv: list[str]) -> None:
    kwargs = {k: int(v) for k, v in (a.split("=", 1) for a in argv)}
    print(json.dumps(run(**kwargs), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
