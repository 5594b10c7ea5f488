"""Storage format 2: raw float32 blobs decoded zero-copy, rows permuted by seed, v1 upgraded.

Local disk only, no Ray: the Ray paths decode through the same ``store.decode_table``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from sslmm_ray import cli
from sslmm_ray.data import store, synth
from sslmm_ray.data.sources import MODALITIES, SPLITS, DataError, RawDataset


@pytest.fixture(scope="module")
def raw() -> RawDataset:
    """Unaligned MOSI shapes (50 / 375 / 500 frames), a few dozen rows per split."""
    return synth.generate("mosi", scale=0.02, aligned=False, seed=3)


def _modalities(raw: RawDataset) -> dict[str, store.ModalitySpec]:
    return {
        m: store.ModalitySpec(dim=raw.dims()[m], length=raw.max_lengths()[m]) for m in MODALITIES
    }


def _table(raw: RawDataset, split: str = "train") -> pa.Table:
    modalities = _modalities(raw)
    return store._split_table(split, raw.splits[split], store.arrow_schema(modalities))


def _assert_rows(decoded: dict, arrays: dict, rows: np.ndarray | slice) -> None:
    """Decoded rows equal ``arrays[rows]``: values, dtype float32 and (N, T, d) shape."""
    assert decoded["id"].tolist() == arrays["id"][rows].tolist()
    for m in MODALITIES:
        want = arrays[m][rows]
        assert decoded[m].dtype == np.float32 and decoded[m].shape == want.shape, m
        np.testing.assert_array_equal(decoded[m], want, err_msg=m)
        np.testing.assert_array_equal(decoded[f"{m}_len"], arrays[f"{m}_len"][rows], err_msg=m)
    np.testing.assert_array_equal(decoded["label"], arrays["label"][rows])


def _by_id(decoded: dict, arrays: dict) -> np.ndarray:
    """Positions in ``arrays`` of the decoded rows (the store permutes rows)."""
    pos = {k: i for i, k in enumerate(arrays["id"].tolist())}
    return np.array([pos[k] for k in decoded["id"].tolist()])


def test_schema_is_fixed_size_binary_per_modality(raw: RawDataset) -> None:
    schema = store.arrow_schema(_modalities(raw))
    assert schema.field("text").type == pa.binary(50 * 768 * 4)
    assert schema.field("vision").type == pa.binary(500 * 20 * 4)
    assert schema.field("audio_len").type == pa.int32()
    assert schema.field("label").type == pa.float32()
    assert store.FORMAT_VERSION == 2


def test_local_round_trip_every_modality(tmp_path: Path, raw: RawDataset) -> None:
    uri = str(tmp_path / "ds")
    store.write_dataset(raw, uri, shard_rows=7)
    manifest = store.open_dataset(uri, verify=True)
    assert manifest.format_version == 2 and manifest.seed == 0
    for split, arrays in raw.splits.items():
        got = store.read_split(manifest, split)
        _assert_rows(got, arrays, _by_id(got, arrays))
        assert sorted(got["id"].tolist()) == sorted(arrays["id"].tolist())
    on_disk = json.loads((Path(uri) / store.MANIFEST).read_text())
    assert on_disk["format_version"] == 2 and on_disk["seed"] == 0


def test_decode_is_a_zero_copy_view_even_of_a_slice(raw: RawDataset) -> None:
    arrays = raw.splits["train"]
    table = _table(raw)
    sliced = table.slice(5, 9)  # offset 5 into the same buffers
    got = store.decode_table(sliced, _modalities(raw))
    _assert_rows(got, arrays, slice(5, 14))
    for m in MODALITIES:
        chunk = sliced.column(m).chunk(0)
        assert chunk.offset == 5
        start = chunk.buffers()[1].address + 5 * chunk.type.byte_width
        assert got[m].__array_interface__["data"][0] == start, m  # no copy
        assert not got[m].flags.writeable  # a view of Arrow memory: never written in place


def test_decode_multi_chunk_and_empty(raw: RawDataset) -> None:
    arrays = raw.splits["train"]
    table = _table(raw)
    chunked = pa.concat_tables([table.slice(3, 4), table.slice(10, 6), table.slice(0, 2)])
    assert chunked.column("text").num_chunks == 3
    got = store.decode_table(chunked, _modalities(raw))
    _assert_rows(got, arrays, np.r_[3:7, 10:16, 0:2])
    empty = store.decode_table(table.slice(0, 0), _modalities(raw))
    assert empty["vision"].shape == (0, 500, 20) and empty["vision"].dtype == np.float32


def test_wrong_length_blob_is_one_line_naming_column_and_shard(
    tmp_path: Path, raw: RawDataset
) -> None:
    modalities = _modalities(raw)
    table = _table(raw)
    short = pa.array([b"\0" * (modalities["audio"].nbytes - 4)] * table.num_rows,
                     pa.binary(modalities["audio"].nbytes - 4))
    bad = table.set_column(table.schema.get_field_index("audio"), "audio", short)
    with pytest.raises(DataError, match=r"^x\.parquet: column 'audio' holds fixed_size_binary"
                       r"\[7496\] per row, expected fixed_size_binary\[7500\] \(375x5 float32"):
        store.decode_table(bad, modalities, where="x.parquet")

    # the same shard on disk, with a manifest that agrees on its size and checksums
    uri = str(tmp_path / "ds")
    manifest = store.write_dataset(raw, uri, shard_rows=16)
    shard = next(s for s in manifest.shards if s.split == "train")
    path = Path(uri) / shard.path
    on_disk = pq.read_table(path)
    pq.write_table(on_disk.set_column(on_disk.schema.get_field_index("audio"), "audio",
                                      short.slice(0, on_disk.num_rows)), path)
    payload = path.read_bytes()
    data = json.loads((Path(uri) / store.MANIFEST).read_text())
    entry = next(s for s in data["shards"] if s["path"] == shard.path)
    entry.update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                 xxh3=xxhash.xxh3_64_hexdigest(payload))
    (Path(uri) / store.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{shard.path}: column 'audio' has type") as opened:
        store.open_dataset(uri)
    unchecked = store.Manifest.from_json(uri, data)  # a reader that skipped open_dataset
    with pytest.raises(DataError, match=f"{shard.path}: column 'audio' holds") as read:
        store.read_split(unchecked, "train")
    for err in (opened, read):
        assert "\n" not in str(err.value)


def _downgrade_to_v1(uri: str) -> None:
    """Rewrite a format 2 store as format 1 wrote it: fixed_size_list<float32> features."""
    mpath = Path(uri) / store.MANIFEST
    data = json.loads(mpath.read_text())
    fields = []
    for entry in data["shards"]:
        path = Path(uri) / entry["path"]
        table = pq.read_table(path)
        for m in MODALITIES:
            spec = store.ModalitySpec(**data["modalities"][m])
            chunk = table.column(m).combine_chunks()
            flat = np.frombuffer(chunk.buffers()[1], "<f4", offset=chunk.offset * spec.nbytes)
            values = pa.array(flat[: table.num_rows * spec.length * spec.dim])
            lists = pa.FixedSizeListArray.from_arrays(values, spec.length * spec.dim)
            table = table.set_column(table.schema.get_field_index(m), m, lists)
        pq.write_table(table, path, compression="zstd")
        payload = path.read_bytes()
        entry.update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                     xxh3=xxhash.xxh3_64_hexdigest(payload))
        fields = table.schema
    data["format_version"] = 1
    data["schema"] = fields.to_string(show_schema_metadata=False)
    del data["seed"]  # format 1 manifests had none
    mpath.write_text(json.dumps(data))


def test_v1_store_is_refused_with_the_upgrade_command_which_works(
    tmp_path: Path, raw: RawDataset, monkeypatch, capsys
) -> None:
    uri = str(tmp_path / "old")
    store.write_dataset(raw, uri, shard_rows=16)
    _downgrade_to_v1(uri)
    old = store.Manifest.from_json(uri, json.loads((Path(uri) / store.MANIFEST).read_text()))
    assert old.format_version == 1  # read far enough to say what to do
    command = f"sslmm data upgrade --data {uri}"
    with pytest.raises(DataError, match="format 1") as refused:
        store.open_dataset(uri)
    assert f"`{command}`" in str(refused.value) and "\n" not in str(refused.value)

    monkeypatch.setattr(sys, "argv", command.split())
    try:
        cli.main()  # the console script, as the error tells a user to run it
    except SystemExit as exit_:
        pytest.fail(f"exit {exit_.code}: {capsys.readouterr().err}")
    manifest = store.open_dataset(uri, verify=True)
    assert manifest.format_version == 2
    assert manifest.generations() != old.generations()
    assert not any((Path(uri) / g).exists() for g in old.generations())  # v1 shards gone
    assert [s.rows for s in manifest.shards] == [s.rows for s in old.shards]
    assert pq.read_metadata(Path(uri) / manifest.shards[0].path).row_group(0).column(
        0).compression == "ZSTD"  # the codec is kept
    for m in MODALITIES:  # the same rows; summed in another order
        for k in ("mean", "std"):
            np.testing.assert_allclose(manifest.normalization[m][k], old.normalization[m][k],
                                       rtol=1e-12, err_msg=(m, k))
    for split, arrays in raw.splits.items():
        got = store.read_split(manifest, split)
        _assert_rows(got, arrays, _by_id(got, arrays))
    # a current store: upgrading again changes nothing
    assert store.upgrade_dataset(uri).generations() == manifest.generations()


def _videos(raw: RawDataset, per_video: int) -> RawDataset:
    """Ids ``vid<k>_<j>``: ``per_video`` consecutive rows per video, as MMSA files list them."""
    splits = {}
    for split, arrays in raw.splits.items():
        n = len(arrays["id"])
        ids = np.array([f"vid{i // per_video:03d}_{i % per_video}" for i in range(n)])
        splits[split] = {**arrays, "id": ids}
    return RawDataset(raw.name, raw.label_range, splits, {})  # type: ignore[arg-type]


def _shard_ids(manifest: store.Manifest, split: str) -> list[list[str]]:
    return [t.column("id").to_pylist()
            for t in store.iter_split_tables(manifest, split, columns=["id"], verify=False)]


def test_rows_of_one_video_are_spread_across_shards(tmp_path: Path, raw: RawDataset) -> None:
    videos = _videos(raw, per_video=6)
    n = len(videos.splits["train"]["id"])
    manifest = store.write_dataset(videos, str(tmp_path / "ds"), shard_rows=6)
    shards = _shard_ids(manifest, "train")
    assert len(shards) == -(-n // 6) >= 4
    spread = []
    for video in {i.split("_")[0] for i in videos.splits["train"]["id"]}:
        spread.append(sum(any(i.startswith(f"{video}_") for i in s) for s in shards))
    # unpermuted, each video would be exactly one shard
    assert max(len({i.split("_")[0] for i in s}) for s in shards) > 1
    assert min(spread) >= 2 and np.mean(spread) >= 3, spread


def test_same_seed_same_order_other_seed_other_order(tmp_path: Path, raw: RawDataset) -> None:
    a = store.write_dataset(raw, str(tmp_path / "a"), shard_rows=8, seed=11)
    b = store.write_dataset(raw, str(tmp_path / "b"), shard_rows=8, seed=11)
    c = store.write_dataset(raw, str(tmp_path / "c"), shard_rows=8, seed=12)
    assert a.seed == 11 and store.open_dataset(str(tmp_path / "a")).seed == 11
    for split in SPLITS:
        assert _shard_ids(a, split) == _shard_ids(b, split)
        assert _shard_ids(a, split) != _shard_ids(c, split)
        n = a.counts[split]
        want = raw.splits[split]["id"][store.row_order(n, 11, split)].tolist()
        assert sum(_shard_ids(a, split), []) == want
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # byte-identical
