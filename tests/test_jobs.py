"""End to end: `ray job submit` against a real Ray head and a real S3 server process.

One module-scoped cluster: `ray start --head --block` run with the project's interpreter (its
own process group, so it and everything it spawned stop by its pid), with the dashboard (the
job server lives there) on 127.0.0.1 free ports and a per-cluster auth token, and the moto S3
server. A tiny synthetic dataset goes into the bucket with `sslmm data synth`; jobs are
submitted from this checkout with jobs/runtime_env.yaml plus, for this test only, the S3
endpoint and moto's fake credentials (real clusters use instance roles: docs/CLUSTER.md).
Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ray_head import HOST, free_port, stop_head

from sslmm_ray.devtools.s3server import FAKE_CREDENTIALS, S3Server, start_s3_server

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
READY_TIMEOUT = 120.0  # head start on a loaded 2-core machine
JOB_TIMEOUT = 300.0  # one 1-epoch fine-tuning job, runtime env included

pytestmark = pytest.mark.skipif(
    not (VENV_BIN / "ray").exists(), reason="needs the project's virtualenv (.venv)"
)


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT, the job server's address
    env: dict[str, str]  # environment for ray / sslmm client commands
    s3: S3Server
    runtime_env: Path  # jobs/runtime_env.yaml + the test-only S3 settings
    data_uri: str

    def ray(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args], env=self.env, cwd=ROOT, capture_output=True,
            text=True, timeout=timeout,
        )

    def submit(self, submission_id: str, *entrypoint: str) -> None:
        # The head's job agent registers a while after the dashboard answers (longer on a
        # loaded machine): Ray asks to try again later. Bounded.
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            done = self.ray(
                "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                "--working-dir", str(ROOT), "--runtime-env", str(self.runtime_env), "--no-wait",
                "--", *entrypoint,
            )
            text = done.stdout + done.stderr
            if done.returncode == 0 or "No available agent" not in text:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(2.0)
        assert done.returncode == 0, text

    def status(self, submission_id: str) -> str:
        """The job's status as `ray job status` words it (terminal states get a banner)."""
        done = self.ray("job", "status", "--address", self.dashboard, submission_id)
        text = done.stdout + done.stderr
        for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"),
                                (r"Job '[^']+' failed", "FAILED"),
                                (r"Job '[^']+' was stopped", "STOPPED")):
            if re.search(pattern, text):
                return status
        match = re.search(r"Status for job '[^']+': (\w+)", text)
        assert match, text
        return match.group(1)

    def logs(self, submission_id: str) -> str:
        done = self.ray("job", "logs", "--address", self.dashboard, submission_id)
        return done.stdout + done.stderr

    def follow(self, submission_id: str, timeout: float = JOB_TIMEOUT) -> tuple[str, str]:
        """Follow the job's logs until it ends (bounded); -> (final status, logs)."""
        try:
            self.ray("job", "logs", "--address", self.dashboard, "--follow", submission_id,
                     timeout=timeout)
        except subprocess.TimeoutExpired:
            self.ray("job", "stop", "--address", self.dashboard, "--no-wait", submission_id)
            pytest.fail(f"job {submission_id} still running after {timeout:.0f} s:\n"
                        f"{self.logs(submission_id)[-5000:]}")
        deadline = time.monotonic() + 30.0  # logs end a moment before the status flips
        status = self.status(submission_id)
        while status in {"PENDING", "RUNNING"} and time.monotonic() < deadline:
            time.sleep(1.0)
            status = self.status(submission_id)
        return status, self.logs(submission_id)


def _wait_dashboard(url: str, head: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/api/version", timeout=2.0):
                return
        except urllib.error.HTTPError:
            return  # an HTTP answer (even 401) means the dashboard serves
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"Ray dashboard at {url} not ready after {READY_TIMEOUT:.0f} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("cluster")
    temp_dir = tempfile.mkdtemp(prefix="sslmm-rt-", dir="/tmp")  # short: socket paths
    token = state / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SSLMM_"))}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` = the project's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    s3 = start_s3_server(bucket="sslmm-jobs")
    head = None
    try:
        ports = {name: free_port() for name in ("gcs", "dashboard", "client", "agent")}
        dashboard = f"http://{HOST}:{ports['dashboard']}"
        log = state / "ray.log"
        with log.open("wb") as out:
            head = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--head", "--block",
                 "--node-ip-address", HOST, "--port", str(ports["gcs"]),
                 "--dashboard-host", HOST, "--dashboard-port", str(ports["dashboard"]),
                 "--include-dashboard", "true",
                 "--ray-client-server-port", str(ports["client"]),
                 "--dashboard-agent-listen-port", str(ports["agent"]),
                 "--num-cpus", "4", "--temp-dir", temp_dir],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _wait_dashboard(dashboard, head, log)

        s3_env = {**FAKE_CREDENTIALS, "SSLMM_S3_ENDPOINT": s3.endpoint}
        data_uri = s3.uri("data/mosi")
        synth = subprocess.run(
            [str(VENV_BIN / "sslmm"), "data", "synth", "--preset", "mosi", "--scale", "0.05",
             "--out", data_uri],
            env={**env, **s3_env}, capture_output=True, text=True, timeout=180,
        )
        assert synth.returncode == 0, synth.stdout + synth.stderr

        runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
        runtime_env["env_vars"].update(s3_env)  # test only: a real cluster uses its role
        runtime_env_path = state / "runtime_env.yaml"
        runtime_env_path.write_text(yaml.safe_dump(runtime_env))
        yield Cluster(dashboard=dashboard, env=env, s3=s3, runtime_env=runtime_env_path,
                      data_uri=data_uri)
    finally:
        if head is not None:
            stop_head(head, temp_dir)
            assert head.poll() is not None
        s3.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _exists(s3: S3Server, key: str) -> bool:
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=key)
    return any(o["Key"] == key for o in listing.get("Contents", []))


@pytest.fixture(scope="module")
def long_jobs(cluster: Cluster) -> Cluster:
    """The fine-tuning and sweep jobs, submitted together: they run side by side on the
    cluster (as a team's jobs would) while the tests follow them one at a time."""
    cluster.submit(
        "sslmm-finetune", "python", "jobs/finetune.py", "--data", cluster.data_uri,
        "--run-dir", cluster.s3.uri("runs/finetune"), "--epochs", "1", "--workers", "1",
        "--label-ratio", "0.5", "--missing-rate", "0.5",
    )
    # The sweep entry point on a 1-cell grid, one 1-epoch trial: tune, then the report.
    cluster.submit(
        "sslmm-sweep", "python", "jobs/sweep.py", "--data", cluster.data_uri,
        "--storage", cluster.s3.uri("sweeps/tiny"), "--label-ratios", "0.5",
        "--missing-rates", "0.5", "--samples", "1", "--concurrency", "1",
        "--workers-per-trial", "1", "--epochs", "1",
    )
    return cluster


def test_finetune_job_succeeds_and_writes_metrics_to_s3(long_jobs: Cluster):
    cluster = long_jobs
    status, logs = cluster.follow("sslmm-finetune")
    assert status == "SUCCEEDED", logs[-5000:]
    assert "Non0_acc_2" in logs  # the CLI's test-metrics table reached the job logs
    assert _exists(cluster.s3, "runs/finetune/metrics.json")


def test_bad_argument_fails_fast_with_a_clear_message(cluster: Cluster):
    start = time.monotonic()
    cluster.submit(
        "sslmm-bad-arg", "python", "jobs/finetune.py", "--data", cluster.data_uri,
        "--run-dir", cluster.s3.uri("runs/bad"), "--label-ratio", "7",
    )
    status, logs = cluster.follow("sslmm-bad-arg", timeout=120.0)
    elapsed = time.monotonic() - start
    assert status == "FAILED", logs
    assert "error: invalid configuration" in logs and "label_ratio" in logs, logs
    assert "less than or equal to 1" in logs
    assert "Traceback" not in logs  # one clear line, not a stack
    assert elapsed < 90.0, f"a bad argument took {elapsed:.0f} s to fail"
    assert not _exists(cluster.s3, "runs/bad/metrics.json")


def test_sweep_job_writes_its_report_to_s3(long_jobs: Cluster):
    cluster = long_jobs
    status, logs = cluster.follow("sslmm-sweep")
    assert status == "SUCCEEDED", logs[-5000:]
    assert _exists(cluster.s3, "sweeps/tiny/report/report.md"), logs[-3000:]
    assert _exists(cluster.s3, "sweeps/tiny/report/report.csv")
