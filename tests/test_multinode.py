"""A Ray cluster of several nodes (a head and two worker nodes, separate raylets on this
machine): local paths, which workers on other nodes would not see, are refused before anything
runs. The cluster is started apart from the session's Ray and reached by its address, as a user
reaches a real one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sslmm_ray import ray_env
from sslmm_ray.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[str]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=120)
        yield cluster.address
    finally:
        cluster.shutdown()


def test_local_paths_on_a_multi_node_cluster_are_refused_before_anything_runs(
    three_nodes: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": three_nodes, "SSLMM_PROGRESS": "0"}
    env.pop(ray_env.SHARED_FILESYSTEM_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "sslmm_ray.cli", "finetune", "--data", str(tmp_path / "data"),
         "--run-dir", str(run_dir), "--epochs", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    err = " ".join((done.stdout + done.stderr).split())
    assert "a cluster of 3 nodes" in err and f"--run-dir {run_dir}" in err
    assert "s3:// URI" in err and ray_env.SHARED_FILESYSTEM_ENV in err
    assert not run_dir.exists()  # refused before the run directory was touched


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
