"""Single-writer locks (sslmm_ray.locks) on a local disk and on a real S3 server (moto)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sslmm_ray import locks, storage
from sslmm_ray.locks import LockError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "target")
    s3 = request.getfixturevalue("s3")
    return s3.uri(f"locks/{request.node.name}-{os.urandom(4).hex()}")


def test_second_holder_fails_fast_naming_the_first(target):
    with locks.hold(target, what="run directory", break_hint="--break-lock") as me:
        assert locks.read_holder(target) == me
        with pytest.raises(LockError) as err:
            locks.acquire(target, what="run directory", break_hint="--break-lock")
        msg = str(err.value)
        assert "\n" not in msg
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg
        assert "--break-lock" in msg and locks.lock_uri(target) in msg
        assert locks.read_holder(target) == me  # the refused writer left it alone
    assert locks.read_holder(target) is None
    with locks.hold(target):  # free again
        pass


def test_released_on_exceptions(target):
    with pytest.raises(ZeroDivisionError), locks.hold(target):
        raise ZeroDivisionError("the writer failed")
    assert not storage.exists(locks.lock_uri(target))


def test_only_one_of_racing_writers_wins(target):
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def race() -> None:
        barrier.wait()
        try:
            locks.acquire(target)
            outcomes.append("won")
        except LockError:
            outcomes.append("refused")

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]


def test_stale_lock_of_a_dead_local_process_is_taken_over(target):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = locks.Holder(host=socket.gethostname(), pid=dead.pid, started="2020-01-01T00:00:00",
                         command="sslmm finetune (killed)", token="old")
    if dead.pid == os.getpid():  # pragma: no cover - pid reuse by ourselves is impossible
        pytest.skip("pid reused")
    storage.write_json(locks.lock_uri(target), stale.__dict__)
    with locks.hold(target) as me:
        assert me.token != "old"
    # a holder on another host is never presumed dead: only --break-lock takes it
    remote = locks.Holder(host="other-node", pid=1, started="2020-01-01T00:00:00",
                          command="sslmm tune", token="remote")
    storage.write_json(locks.lock_uri(target), remote.__dict__)
    with pytest.raises(LockError, match="pid 1 on other-node"):
        locks.acquire(target)
    with locks.hold(target, break_lock=True) as me:
        assert locks.read_holder(target) == me
    assert locks.read_holder(target) is None


def test_release_leaves_a_lock_taken_over_by_another_writer(target):
    me = locks.acquire(target)
    other = locks.Holder(host="other-node", pid=7, started="now", command="x", token="t2")
    storage.write_json(locks.lock_uri(target), other.__dict__)  # as if ours was broken
    locks.release(target, me)
    assert locks.read_holder(target) == other


def test_second_dataset_writer_through_the_cli_fails_fast(s3):
    uri = s3.uri("locks/cli-dataset")
    with locks.hold(uri, what="dataset") as me:
        proc = subprocess.run(
            [sys.executable, "-m", "sslmm_ray.cli", "data", "synth", "--out", uri,
             "--scale", "0.02", "--aligned"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert f"dataset {uri} is locked" in proc.stderr
        assert f"pid {me.pid} on {me.host}" in proc.stderr
        assert not storage.exists(storage.join(uri, "manifest.json"))
        holder = json.loads(storage.read_bytes(locks.lock_uri(uri)))
        assert holder["token"] == me.token
