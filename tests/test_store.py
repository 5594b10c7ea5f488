"""The canonical store on local disk and on a real S3 server: round trip, publish-last, checks."""

from __future__ import annotations

import json
import os
import socket
import stat
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sslmm_ray import storage
from sslmm_ray.data import normalize, store, synth
from sslmm_ray.data.normalize import valid_frames
from sslmm_ray.data.sources import MODALITIES, DataError, RawDataset
from sslmm_ray.storage import StorageError, StorageOptions


@pytest.fixture(scope="module")
def raw() -> RawDataset:
    return synth.generate("mosi", scale=0.05, aligned=True, seed=1)


def _copy(raw: RawDataset) -> RawDataset:
    splits = {s: {k: v.copy() for k, v in a.items()} for s, a in raw.splits.items()}
    return RawDataset(raw.name, raw.label_range, splits, dict(raw.stats))  # type: ignore[arg-type]


def _assert_same(decoded: dict, arrays: dict) -> None:
    """Every source row stored once and unchanged, matched by id (the store permutes rows)."""
    pos = {k: i for i, k in enumerate(decoded["id"].tolist())}
    assert len(pos) == len(decoded["id"]) and set(pos) == set(arrays["id"].tolist())
    order = np.array([pos[k] for k in arrays["id"].tolist()])
    for k in ("label", *MODALITIES, *(f"{m}_len" for m in MODALITIES)):
        np.testing.assert_array_equal(decoded[k][order], arrays[k], err_msg=k)


def _s3_keys(s3, prefix: str) -> list[str]:
    """Object keys under ``prefix``, without the empty 'folder/' markers pyarrow leaves."""
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("/"))


def test_local_round_trip_and_manifest(tmp_path: Path, raw: RawDataset) -> None:
    uri = str(tmp_path / "ds")
    written = store.write_dataset(raw, uri, shard_rows=24)
    manifest = store.open_dataset(uri, verify=True)
    assert manifest.counts == raw.counts()
    assert manifest.dims == raw.dims() and manifest.lengths == raw.max_lengths()
    assert [s.path for s in manifest.shards] == [s.path for s in written.shards]
    assert len(manifest.shard_uris("train")) == -(-raw.counts()["train"] // 24)
    for split, arrays in raw.splits.items():
        _assert_same(store.read_split(manifest, split), arrays)
    mode = stat.S_IMODE(os.stat(Path(uri) / store.MANIFEST).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # readable by others as any file, not mkstemp's 0600
    data = json.loads((Path(uri) / store.MANIFEST).read_text())
    assert {"schema", "shards", "counts", "modalities", "stats"} <= set(data)
    assert all(len(s["sha256"]) == 64 for s in data["shards"])


def test_s3_round_trip(s3, raw: RawDataset) -> None:
    uri = s3.uri(f"store/{uuid.uuid4().hex}")
    store.write_dataset(raw, uri, s3.options, shard_rows=32, compression="zstd")
    manifest = store.open_dataset(uri, s3.options, verify=True)
    for split, arrays in raw.splits.items():
        _assert_same(store.read_split(manifest, split, s3.options), arrays)
    info = store.describe(manifest, s3.options)
    assert info["splits"]["train"]["count"] == raw.counts()["train"]


def test_failed_write_publishes_nothing_and_cleans_up(s3, raw, monkeypatch) -> None:
    prefix = f"store/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    calls = {"n": 0}
    real = store._encode_shard

    def flaky(table, compression):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk on fire")
        return real(table, compression)

    monkeypatch.setattr(store, "_encode_shard", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        store.write_dataset(raw, uri, s3.options, shard_rows=16)
    assert _s3_keys(s3, prefix) == []  # no manifest, no partial generation
    with pytest.raises(DataError, match="manifest.json not found"):
        store.open_dataset(uri, s3.options)


def test_overwrite_deletes_old_generation_after_publish(s3, raw, monkeypatch) -> None:
    prefix = f"store/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    first = store.write_dataset(raw, uri, s3.options, shard_rows=64)
    (old_gen,) = first.generations()

    # a failing overwrite leaves the first dataset complete and readable
    def broken(*a, **k):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as mp:
        mp.setattr(store, "_encode_shard", broken)
        with pytest.raises(RuntimeError):
            store.write_dataset(raw, uri, s3.options, shard_rows=16)
    assert store.open_dataset(uri, s3.options).generations() == {old_gen}
    assert {k.split("/")[2] for k in _s3_keys(s3, prefix)} == {old_gen, store.MANIFEST}

    # the manifest is published before the old shards go
    order: list[str] = []
    real_write, real_delete = storage.write_json, storage.delete

    def write_json(u, *a, **k):
        order.append(f"publish {u}")
        return real_write(u, *a, **k)

    def delete(u, *a, **k):
        order.append(f"delete {u}")
        return real_delete(u, *a, **k)

    monkeypatch.setattr(storage, "write_json", write_json)
    monkeypatch.setattr(storage, "delete", delete)
    second = store.write_dataset(_copy(raw), uri, s3.options, shard_rows=16)
    assert order == [f"publish {uri}/{store.MANIFEST}", f"delete {uri}/{old_gen}"]
    (new_gen,) = second.generations()
    assert {k.split("/")[2] for k in _s3_keys(s3, prefix)} == {new_gen, store.MANIFEST}
    assert store.open_dataset(uri, s3.options, verify=True).counts == raw.counts()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda r: r.splits["train"]["label"].__setitem__(3, 7.0), "outside"),
        (lambda r: r.splits["valid"].pop("audio_len"), "missing key"),
        (
            lambda r: r.splits["test"].__setitem__(
                "vision", np.zeros((*r.splits["test"]["vision"].shape[:2], 21), np.float32)
            ),
            "feature dim 21",
        ),
        (lambda r: r.splits["train"]["audio"].__setitem__((0, 0, 0), np.inf), "non-finite"),
    ],
    ids=["label-out-of-range", "missing-key", "wrong-dim", "non-finite"],
)
def test_bad_input_is_an_error_and_nothing_is_written(s3, raw, corrupt, match) -> None:
    bad = _copy(raw)
    corrupt(bad)
    prefix = f"store/{uuid.uuid4().hex}"
    with pytest.raises(DataError, match=match):
        store.write_dataset(bad, s3.uri(prefix), s3.options)
    assert _s3_keys(s3, prefix) == []


def test_truncated_shard_on_s3_names_the_file(s3, raw) -> None:
    prefix = f"store/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    manifest = store.write_dataset(raw, uri, s3.options, shard_rows=32)
    victim = manifest.shards[1].path
    key = f"{prefix}/{victim}"
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body[: len(body) // 2])
    with pytest.raises(DataError, match=f"{victim}.*truncated"):
        store.open_dataset(uri, s3.options)


def test_local_shard_checks_name_the_file(tmp_path: Path, raw) -> None:
    uri = str(tmp_path / "ds")
    manifest = store.write_dataset(raw, uri, shard_rows=32)
    mpath = Path(uri) / store.MANIFEST
    pristine = mpath.read_text()
    shard = manifest.shards[0]
    shard_path = Path(uri) / shard.path

    # truncated
    payload = shard_path.read_bytes()
    shard_path.write_bytes(payload[:-100])
    with pytest.raises(DataError, match=f"{shard.path}.*truncated"):
        store.open_dataset(uri)
    # same size, broken footer
    shard_path.write_bytes(payload[:-8] + b"\0" * 8)
    with pytest.raises(DataError, match=f"{shard.path}.*not a readable Parquet"):
        store.open_dataset(uri)
    # same size, flipped byte: only the checksum sees it
    flipped = bytearray(payload)
    flipped[len(payload) // 2] ^= 0xFF
    shard_path.write_bytes(bytes(flipped))
    store.open_dataset(uri)
    with pytest.raises(DataError, match=f"{shard.path}.*checksum"):
        store.open_dataset(uri, verify=True)
    shard_path.write_bytes(payload)
    # missing
    shard_path.rename(shard_path.with_suffix(".bak"))
    with pytest.raises(DataError, match=f"{shard.path}.*missing"):
        store.open_dataset(uri)
    shard_path.with_suffix(".bak").rename(shard_path)

    # a column missing: rewrite the shard without it and make the manifest agree on size
    table = pq.read_table(shard_path).drop_columns(["vision_len"])
    pq.write_table(table, shard_path)
    data = json.loads(pristine)
    data["shards"][0]["bytes"] = shard_path.stat().st_size
    mpath.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{shard.path}: column 'vision_len' missing"):
        store.open_dataset(uri)
    shard_path.write_bytes(payload)

    # the manifest's dimension disagrees with the shards
    data = json.loads(pristine)
    data["modalities"]["audio"]["dim"] += 1
    mpath.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"normalization\['audio'\] must have 6 values"):
        store.open_dataset(uri)  # the manifest's own statistics disagree first
    del data["normalization"]
    mpath.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{shard.path}: column 'audio' has type"):
        store.open_dataset(uri)
    # counts that do not add up
    data = json.loads(pristine)
    data["counts"]["train"] += 1
    mpath.write_text(json.dumps(data))
    with pytest.raises(DataError, match="do not add up"):
        store.open_dataset(uri)
    # a shard path escaping the dataset folder
    data = json.loads(pristine)
    data["shards"][0]["path"] = "../elsewhere.parquet"
    mpath.write_text(json.dumps(data))
    with pytest.raises(DataError, match="escapes"):
        store.open_dataset(uri)
    mpath.write_text("{}")
    with pytest.raises(DataError, match="malformed manifest"):
        store.open_dataset(uri)
    mpath.write_text(pristine)
    assert store.open_dataset(uri, verify=True).counts == raw.counts()


def test_missing_manifest(tmp_path: Path, s3) -> None:
    with pytest.raises(DataError, match="manifest.json not found"):
        store.open_dataset(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="manifest.json not found"):
        store.open_dataset(s3.uri(f"store/{uuid.uuid4().hex}"), s3.options)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_names_it(raw) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options = StorageOptions(endpoint=endpoint, region="us-east-1")
    with pytest.raises(StorageError, match=f"{endpoint}.*unreachable"):
        store.write_dataset(raw, "s3://bucket/ds", options)
    with pytest.raises(StorageError, match=f"{endpoint}.*unreachable"):
        store.open_dataset("s3://bucket/ds", options)


def test_describe_fields(tmp_path: Path, raw) -> None:
    manifest = store.write_dataset(raw, str(tmp_path / "ds"))
    info = store.describe(manifest)
    assert info["counts"] == raw.counts()
    assert info["modalities"]["vision"] == {"dim": 20, "length": 50}
    for split, arrays in raw.splits.items():
        s = info["splits"][split]
        assert s["count"] == len(arrays["id"])
        labels = arrays["label"]
        assert s["label"]["positive"] + s["label"]["negative"] + s["label"]["zero"] == s["count"]
        assert s["label"]["min"] == pytest.approx(float(labels.min()))
        assert s["lengths"]["text"]["max"] == int(arrays["text_len"].max())


def _naive_statistics(arrays: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean and std over the valid frames, in float64, with a full copy (fine for tiny data)."""
    out = {}
    for m in MODALITIES:
        valid = valid_frames(arrays[f"{m}_len"], arrays[m].shape[1])
        x = arrays[m][valid].astype(np.float64)
        out[m] = (x.mean(axis=0), x.std(axis=0))
    return out


def _scale_valid_frames(arrays: dict, m: str, factor: float, offset: float) -> None:
    """x -> factor * x + offset on valid frames only (padding stays zero)."""
    valid = valid_frames(arrays[f"{m}_len"], arrays[m].shape[1])
    arrays[m][valid] = arrays[m][valid] * factor + offset


def test_normalization_statistics_come_from_train_only(tmp_path: Path, raw: RawDataset) -> None:
    base = _copy(raw)
    valid = valid_frames(base.splits["train"]["text_len"], base.splits["train"]["text"].shape[1])
    base.splits["train"]["text"][valid, 0] = 5.0  # a feature constant over valid train frames
    stats = store.write_dataset(base, str(tmp_path / "a"), shard_rows=16).normalization
    want = _naive_statistics(base.splits["train"])
    for m in MODALITIES:
        mean, std = want[m]
        np.testing.assert_allclose(stats[m]["mean"], mean, rtol=1e-9, atol=1e-9, err_msg=m)
        std = np.where(std < 1e-6, 1.0, std)
        np.testing.assert_allclose(stats[m]["std"], std, rtol=1e-9, err_msg=m)
    assert stats["text"]["mean"][0] == 5.0 and stats["text"]["std"][0] == 1.0  # floored

    other = _copy(base)  # valid and test values change a lot: the statistics do not move
    for split in ("valid", "test"):
        for m in MODALITIES:
            _scale_valid_frames(other.splits[split], m, 100.0, 7.0)
    # same shard_rows: the statistics merge per-shard moments, so another sharding may move
    # their last bits (float64 rounding), which is no leak
    assert store.write_dataset(other, str(tmp_path / "b"), shard_rows=16).normalization == stats

    moved = _copy(base)  # train values change: they do
    _scale_valid_frames(moved.splits["train"], "audio", 3.0, 1.0)
    got = store.write_dataset(moved, str(tmp_path / "c"), shard_rows=16).normalization
    np.testing.assert_allclose(got["audio"]["std"], np.array(stats["audio"]["std"]) * 3, rtol=1e-6)
    np.testing.assert_allclose(
        got["audio"]["mean"], np.array(stats["audio"]["mean"]) * 3 + 1, rtol=1e-6
    )
    assert got["text"] == stats["text"] and got["vision"] == stats["vision"]
    # what was written is what a reader gets back
    assert store.open_dataset(str(tmp_path / "c")).normalization == got


def test_statistics_merge_across_chunks(monkeypatch, raw: RawDataset) -> None:
    """Chunked merging equals one chunk, even where sums of x and x^2 would cancel."""
    arrays = _copy(raw).splits["train"]
    _scale_valid_frames(arrays, "vision", 1.0, 1e6)  # mean 1e6, std ~1
    whole = normalize.train_statistics(arrays)
    monkeypatch.setattr(normalize, "CHUNK_VALUES", 1)  # one row per chunk
    chunked = normalize.train_statistics(arrays)
    for m in MODALITIES:
        for k in ("mean", "std"):
            np.testing.assert_allclose(chunked[m][k], whole[m][k], rtol=1e-9, err_msg=(m, k))
    _, std = _naive_statistics(arrays)["vision"]
    np.testing.assert_allclose(chunked["vision"]["std"], std, rtol=1e-6)


def test_decode_normalises_valid_frames_and_keeps_padding_zero(tmp_path: Path, raw) -> None:
    scaled = _copy(raw)
    for split in scaled.splits.values():  # scales and offsets orders of magnitude apart
        _scale_valid_frames(split, "audio", 1000.0, 0.0)
        _scale_valid_frames(split, "vision", 0.01, 5.0)
    manifest = store.write_dataset(scaled, str(tmp_path / "ds"), shard_rows=16)
    norm = normalize.normalizer_for(manifest, True)
    train = store.read_split(manifest, "train", norm=norm)
    for m in MODALITIES:
        valid = valid_frames(train[f"{m}_len"], train[m].shape[1])
        x = train[m][valid].astype(np.float64)
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4, err_msg=m)
        np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-4, err_msg=m)
        assert (train[m][~valid] == 0.0).all(), m  # padding exactly zero
        assert train[m].dtype == np.float32
    test = store.read_split(manifest, "test", norm=norm)
    assert np.abs(test["audio"]).max() < 50  # test uses train's statistics: same scale
    _assert_same(store.read_split(manifest, "test"), scaled.splits["test"])  # raw: unchanged
    assert normalize.normalizer_for(manifest, False) is None


def test_old_manifest_without_statistics_opens_but_cannot_normalise(tmp_path: Path, raw) -> None:
    uri = str(tmp_path / "ds")
    store.write_dataset(raw, uri, shard_rows=32)
    mpath = Path(uri) / store.MANIFEST
    data = json.loads(mpath.read_text())
    assert set(data["normalization"]) == set(MODALITIES)
    bad = json.loads(mpath.read_text())
    bad["normalization"]["audio"]["std"] = bad["normalization"]["audio"]["std"][:-1]
    mpath.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"normalization\['audio'\] must have 5 values"):
        store.open_dataset(uri)
    del data["normalization"]  # as written before statistics existed
    mpath.write_text(json.dumps(data))
    manifest = store.open_dataset(uri, verify=True)
    assert manifest.normalization == {}
    assert store.describe(manifest)["normalization"] is None
    _assert_same(store.read_split(manifest, "valid"), raw.splits["valid"])
    assert normalize.normalizer_for(manifest, False) is None
    with pytest.raises(DataError, match="no normalisation statistics.*data.normalize=false"):
        normalize.normalizer_for(manifest, True)
