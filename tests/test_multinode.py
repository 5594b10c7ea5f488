"""A Ray cluster of several nodes (a head and two worker nodes, separate raylets on this
machine): local paths, which workers on other nodes would not see, are refused before anything
runs, and a run with everything on S3 trains with its workers on two nodes. The cluster is
started apart from the session's Ray and reached by its address, as a user reaches a real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sslmm_ray import ray_env, storage
from sslmm_ray.data import store, synth
from sslmm_ray.errors import UserError
from sslmm_ray.train import checkpoint as ckpt

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def three_nodes(s3) -> Iterator[Cluster]:
    """Head and two worker nodes of one CPU each: a 2-worker run must use two nodes. Started
    after the S3 server, so its raylets inherit the AWS chain's environment as a cluster's
    nodes would have it from their instance role."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=120)
        yield cluster
    finally:
        cluster.shutdown()


def _cli(cluster: Cluster, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "SSLMM_PROGRESS": "0"}
    env.pop(ray_env.SHARED_FILESYSTEM_ENV, None)
    return subprocess.run([sys.executable, "-m", "sslmm_ray.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _last_json(text: str) -> dict:
    start = text.rfind("\n{") + 1
    return json.loads(text[start:])


def test_local_paths_on_a_multi_node_cluster_are_refused_before_anything_runs(
    three_nodes: Cluster, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    done = _cli(three_nodes, "finetune", "--data", str(tmp_path / "data"),
                "--run-dir", str(run_dir), "--epochs", "1", timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    err = " ".join((done.stdout + done.stderr).split())
    assert "a cluster of 3 nodes" in err and f"--run-dir {run_dir}" in err
    assert "s3:// URI" in err and ray_env.SHARED_FILESYSTEM_ENV in err
    assert not run_dir.exists()  # refused before the run directory was touched
    # evaluate and predict read (and predict writes) through Ray Data tasks on every node
    done = _cli(three_nodes, "predict", "--data", str(tmp_path / "data"), "--checkpoint",
                "s3://b/run", "--out", str(tmp_path / "pred"), timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    err = " ".join((done.stdout + done.stderr).split())
    assert f"--data {tmp_path / 'data'}" in err and "--checkpoint" not in err
    assert not (tmp_path / "pred").exists()


def test_remote_paths_and_declared_shared_filesystems_pass(monkeypatch) -> None:
    info = ray_env.ClusterInfo(address="x", cpus=3, gpus=0, local=False, nodes=3)
    ray_env.check_paths_reach_every_node(info, {"--run-dir": "s3://b/run", "--data": None})
    with pytest.raises(UserError, match="--data /data"):
        ray_env.check_paths_reach_every_node(info, {"--run-dir": "s3://b/run", "--data": "/data"})
    monkeypatch.setenv(ray_env.SHARED_FILESYSTEM_ENV, "1")
    ray_env.check_paths_reach_every_node(info, {"--data": "/mnt/nfs/data"})
    monkeypatch.delenv(ray_env.SHARED_FILESYSTEM_ENV)
    one = ray_env.ClusterInfo(address="local", cpus=4, gpus=0, local=True, nodes=1)
    ray_env.check_paths_reach_every_node(one, {"--data": "/data"})
    monkeypatch.setenv("SSLMM_AUTOSCALING", "1")  # nodes may join later
    with pytest.raises(UserError, match="autoscaling cluster"):
        ray_env.check_paths_reach_every_node(one, {"--data": "/data"})


TINY = [a for kv in ("model.hidden=16", "model.segments=4", "model.iterations=1")
        for a in ("--set", kv)]


def test_pretrain_finetune_evaluate_on_s3_with_workers_on_two_nodes(three_nodes: Cluster, s3):
    """Every stage through the CLI on the 3-node cluster, all storage on the S3 server; each
    2-worker group spans two nodes."""
    data = s3.uri("multinode/data")
    store.write_dataset(synth.generate("mosi", scale=0.05, aligned=True, seed=2), data,
                        s3.options)
    pre, ft = s3.uri("multinode/runs/pre"), s3.uri("multinode/runs/ft")
    common = ["--data", data, "--missing-rate", "0.3", "--workers", "2", "--epochs", "1",
              *TINY, "--json"]
    done = _cli(three_nodes, "pretrain", "--run-dir", pre, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _last_json(done.stdout)["checkpoint"].startswith(pre)
    done = _cli(three_nodes, "finetune", "--run-dir", ft, "--pretrained", pre, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _last_json(done.stdout)
    assert 0.0 <= result["test"]["Non0_acc_2"] <= 1.0

    keys = {o["Key"] for o in s3.client.list_objects_v2(
        Bucket=s3.bucket, Prefix="multinode/runs/")["Contents"]}
    for run in ("pre", "ft"):
        for name in ("config.json", "best.json", "metrics.json", "history.json"):
            assert f"multinode/runs/{run}/{name}" in keys, (run, name, sorted(keys))
        assert any(k.startswith(f"multinode/runs/{run}/checkpoint_") and k.endswith("state.pt")
                   for k in keys)
        assert any(f"multinode/runs/{run}/tensorboard/events" in k for k in keys)
    # fine-tuning started from the pre-training weights, on normalised features
    saved = storage.read_json(storage.join(ft, "config.json"), s3.options)
    assert saved["finetune"]["pretrained"] == pre
    assert ckpt.load(result["checkpoint"], s3.options)[0].normalize

    done = _cli(three_nodes, "evaluate", "--data", data, "--checkpoint", ft, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _last_json(done.stdout) == pytest.approx(result["test"], abs=1e-6)

    # Each Ray Train worker logs its run, rank and node id (node ranks go by IP, one here).
    nodes: dict[str, set[str]] = {}
    logs = Path(three_nodes.head_node.get_session_dir_path()) / "logs" / "train"
    for path in logs.glob("ray-train-sys-worker-*.log"):
        first = json.loads(path.read_text().splitlines()[0])
        nodes.setdefault(first["run_name"], set()).add(first["node_id"])
    assert len(nodes["pre"]) == 2 and len(nodes["ft"]) == 2, nodes
