"""Writers in bounded memory: the synthetic source written shard by shard, and the label index.

``store.write_source`` asks each shard for exactly the rows the stored permutation puts there;
``synth.SynthSource`` makes any row by its index. These tests check that what is written equals
the in-memory generator's data set, that the Ray path writes the same bytes, that a child
process under an address-space limit far below the data set's size writes it, and that the
label index gives the labeled keys the old scan gave, old stores (no index) included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_store import _assert_same  # one definition of "stored = source"

from sslmm_ray.config import FinetuneConfig
from sslmm_ray.data import normalize, pipeline, store, synth
from sslmm_ray.data.sources import MODALITIES, SPLITS, DataError

ROOT = Path(__file__).resolve().parents[1]
SEED = 4


@pytest.fixture(scope="module")
def source() -> synth.SynthSource:
    return synth.SynthSource("mosi", scale=0.05, aligned=False, seed=SEED)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory, source) -> store.Manifest:
    uri = str(tmp_path_factory.mktemp("writers") / "streamed")
    store.write_source(source, uri, shard_rows=16, seed=SEED, parallel=False)
    return store.open_dataset(uri, verify=True)


def test_chunks_and_rows_by_index_equal_generate(source) -> None:
    raw = synth.generate("mosi", scale=0.05, aligned=False, seed=SEED)
    assert raw.stats == source.stats and raw.stats["generator_version"] == 3
    for split in SPLITS:
        parts = list(source.chunks(split, rows=7))
        for k, want in raw.splits[split].items():
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want, k)
    picked = np.array([9, 0, 3, 3, 41])  # any rows, any order, alone or together
    some = source.rows("train", picked)
    for k, want in raw.splits["train"].items():
        np.testing.assert_array_equal(some[k], want[picked], k)
        np.testing.assert_array_equal(source.rows("train", [41])[k][0], want[41], k)


def test_streamed_store_round_trips_and_equals_the_in_memory_write(
    tmp_path: Path, streamed: store.Manifest
) -> None:
    raw = synth.generate("mosi", scale=0.05, aligned=False, seed=SEED)
    for split, arrays in raw.splits.items():
        _assert_same(store.read_split(streamed, split), arrays)
    assert streamed.counts == raw.counts() and streamed.stats == raw.stats
    # the same bytes as writing the generated data set whole, and the same statistics
    whole = store.write_dataset(raw, str(tmp_path / "whole"), shard_rows=16, seed=SEED)
    assert [s.sha256 for s in streamed.shards] == [s.sha256 for s in whole.shards]
    assert [s.sha256 for s in streamed.label_index] == [s.sha256 for s in whole.label_index]
    assert streamed.normalization == whole.normalization
    one_pass = normalize.train_statistics(raw.splits["train"])  # the whole split at once
    for m in MODALITIES:
        for k in ("mean", "std"):
            np.testing.assert_allclose(streamed.normalization[m][k], one_pass[m][k],
                                       rtol=1e-9, atol=1e-12, err_msg=(m, k))
    # rows of one split are spread over its shards in the permuted order
    first = store.read_split(dataclasses.replace(streamed, shards=streamed.shards[:1]), "train")
    n = raw.counts()["train"]
    want = raw.splits["train"]["id"][store.row_order(n, SEED, "train")[:16]]
    assert first["id"].tolist() == want.tolist()


def test_label_index_gives_the_scan_keys(streamed: store.Manifest, monkeypatch) -> None:
    assert {e.split for e in streamed.label_index} == set(SPLITS)
    assert all(e.path.startswith(next(iter(streamed.generations())) + "/labels-")
               for e in streamed.label_index)
    scanned = dataclasses.replace(streamed, label_index=[])  # as a store without the index
    cases = [(split, ratio, seed) for split in ("train", "valid")
             for ratio in (0.05, 0.3, 0.5, 0.99) for seed in (0, 7)]
    want = {c: pipeline.labeled_split_keys(scanned, *c) for c in cases}
    # with the index, no shard is read for it
    monkeypatch.setattr(pipeline, "iter_split_tables", lambda *a, **k: 1 / 0)
    for c in cases:
        got = pipeline.labeled_split_keys(streamed, *c)
        assert got.dtype == want[c].dtype and np.array_equal(got, want[c]), c
    assert pipeline.labeled_split_keys(streamed, "train", 1.0, 0) is None
    ft = FinetuneConfig(label_ratio=0.25, seed=3)
    specs = pipeline.finetune_specs(streamed, ft)
    monkeypatch.undo()
    old = pipeline.finetune_specs(scanned, ft)
    for split in ("train", "valid"):
        assert np.array_equal(specs[split].labeled_keys, old[split].labeled_keys)


def test_store_without_label_index_still_works(tmp_path: Path, source) -> None:
    uri = str(tmp_path / "ds")
    written = store.write_source(source, uri, shard_rows=32, seed=SEED, parallel=False)
    mpath = Path(uri) / store.MANIFEST
    data = json.loads(mpath.read_text())
    del data["label_index"]  # as written before the index existed
    mpath.write_text(json.dumps(data))
    old = store.open_dataset(uri, verify=True)
    assert old.label_index == [] and store.read_label_index(old, "train") is None
    ft = FinetuneConfig(label_ratio=0.4, seed=1)
    got = pipeline.finetune_specs(old, ft)
    want = pipeline.finetune_specs(written, ft)
    for split in ("train", "valid"):
        assert np.array_equal(got[split].labeled_keys, want[split].labeled_keys)


def test_broken_label_index_is_one_line_naming_the_file(tmp_path: Path, source) -> None:
    uri = str(tmp_path / "ds")
    manifest = store.write_source(source, uri, shard_rows=32, seed=SEED, parallel=False)
    entry = manifest.label_index_for("train")
    path = Path(uri) / entry.path
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 3] ^= 0xFF  # same size: only the checksum sees it
    path.write_bytes(bytes(payload))
    with pytest.raises(DataError, match=r"labels-train\.parquet: checksum mismatch"):
        pipeline.labeled_split_keys(store.open_dataset(uri), "train", 0.5, 0)
    with pytest.raises(DataError, match=r"labels-train\.parquet: checksum mismatch"):
        store.open_dataset(uri, verify=True)
    path.unlink()
    with pytest.raises(DataError, match=r"labels-train\.parquet: label index listed in the "
                                        "manifest is missing"):
        store.open_dataset(uri)
    mpath = Path(uri) / store.MANIFEST
    data = json.loads(mpath.read_text())
    data["label_index"][0]["path"] = "../elsewhere.parquet"
    mpath.write_text(json.dumps(data))
    with pytest.raises(DataError, match="escapes the dataset folder"):
        store.open_dataset(uri)
    data["label_index"][0]["rows"] = "many"
    mpath.write_text(json.dumps(data))
    with pytest.raises(DataError, match="malformed label index entry"):
        store.open_dataset(uri)


# ---------------------------------------------------------------- Ray tasks


def test_ray_tasks_write_the_same_store(ray_cluster, s3, tmp_path: Path, source) -> None:
    here = store.write_source(source, str(tmp_path / "here"), shard_rows=48, seed=SEED,
                              parallel=False)
    uri = s3.uri(f"writers/{uuid.uuid4().hex}")
    remote = store.write_source(source, uri, s3.options, shard_rows=48, seed=SEED, parallel=True)
    assert len(remote.shards) > 3
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in here.shards]
    assert [s.sha256 for s in remote.label_index] == [s.sha256 for s in here.label_index]
    assert remote.normalization == here.normalization
    opened = store.open_dataset(uri, s3.options, verify=True)
    ft = FinetuneConfig(label_ratio=0.3, seed=2)
    got, want = pipeline.finetune_specs(opened, ft, s3.options), pipeline.finetune_specs(here, ft)
    assert np.array_equal(got["train"].labeled_keys, want["train"].labeled_keys)


@dataclasses.dataclass(frozen=True)
class _BrokenSource(synth.SynthSource):
    """Test rows 20-29 hold a label out of range (a generator bug, found by the writer)."""

    def rows(self, split, indices):
        out = super().rows(split, indices)
        if split == "test":
            bad = (np.asarray(indices) >= 20) & (np.asarray(indices) < 30)
            out["label"][bad] = 9.0
        return out


def test_failed_ray_write_raises_the_task_error_and_leaves_nothing(ray_cluster, s3) -> None:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    prefix = f"writers/{uuid.uuid4().hex}"
    source = _BrokenSource("mosi", scale=0.05, seed=SEED)
    with pytest.raises(DataError, match=r"split 'test': sample id 'synth-mosi-test-0000\d\d'.*"
                                        r"label 9\.0 outside") as err:
        store.write_source(source, s3.uri(prefix), s3.options, shard_rows=8, parallel=True)
    assert "\n" not in str(err.value)
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    assert not [o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("/")]


# ---------------------------------------------------------------- bounded memory

#: Address space the child may add above its baseline: far below the data set it writes.
HEADROOM = 48 << 20
BOUNDED_SCALE = 0.4  # scalable (MOSI shapes, unaligned): 880 rows, ~0.2 MB each

_CHILD = textwrap.dedent("""
    import json, re, resource, sys
    from sslmm_ray.data import store, synth

    def vm_peak():
        status = open("/proc/self/status").read()
        return int(re.search(r"VmPeak:\\s+(\\d+) kB", status).group(1)) << 10

    out, headroom, scale = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    # Warm up: lazy imports and Arrow's thread pools, on a data set of 8 rows per split.
    store.write_source(synth.SynthSource("scalable", scale=1e-6), out + "/warm", shard_rows=4)
    baseline = vm_peak()
    resource.setrlimit(resource.RLIMIT_AS, (baseline + headroom, baseline + headroom))
    try:
        synth.generate("scalable", scale=scale)
        whole = "fits"
    except MemoryError:
        whole = "MemoryError"
    manifest = store.write_source(
        synth.SynthSource("scalable", scale=scale), out + "/ds", shard_rows=16
    )
    print(json.dumps({"baseline": baseline, "peak": vm_peak(), "whole": whole,
                      "bytes": sum(s.bytes for s in manifest.shards)}))
""")


def test_writer_runs_in_bounded_memory(tmp_path: Path) -> None:
    """A child limited to its baseline + 48 MiB of address space writes a ~177 MB data set.

    Only the writer's modules are imported (numpy, pyarrow; no torch, no Ray); glibc and Arrow
    allocate from one arena and the system allocator, so that reserved-but-unused address
    space (per-thread arenas, jemalloc's reservations) does not count against the limit. The
    in-memory generator under the same limit fails, as a control.
    """
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "ARROW_DEFAULT_MEMORY_POOL": "system",
        "MALLOC_ARENA_MAX": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(HEADROOM), str(BOUNDED_SCALE)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["whole"] == "MemoryError"
    assert got["bytes"] > 3 * HEADROOM, got  # the data set is far larger than the headroom
    assert got["peak"] <= got["baseline"] + HEADROOM, got
    manifest = store.open_dataset(str(tmp_path / "ds"))
    assert manifest.counts == synth.split_sizes("scalable", BOUNDED_SCALE)
    assert sum(s.bytes for s in manifest.shards) == got["bytes"]
