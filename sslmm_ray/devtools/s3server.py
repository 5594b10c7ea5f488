"""A real S3-compatible server process (moto) on 127.0.0.1, for tests, benchmarks and dev.

The server runs as its own subprocess and process group so that pyarrow talks to it over real
HTTP exactly as it would to AWS or MinIO; an in-process mock would hide networking bugs.
``python -m sslmm_ray.devtools.s3server --port 9000`` keeps one running for local development.

Outages: moto keeps its state in memory, so a killed server forgets everything. To stage a
real outage (the process gone, the port closed) :meth:`S3Server.snapshot` copies the bucket,
:meth:`S3Server.kill` ends the process and :meth:`S3Server.restart` starts a new one on the
same port that loads the copy *before* it listens, so no client ever sees a half-restored
bucket.

The credentials used here are moto's fake "testing" pair, never real ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslmm_ray.storage import StorageOptions

__all__ = ["FAKE_CREDENTIALS", "S3Server", "start_s3_server"]

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
_HOST = "127.0.0.1"


@dataclass
class S3Server:
    """A running moto server with one bucket; ``stop()`` (or ``with``) ends it."""

    endpoint: str
    bucket: str
    region: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _client: Any = field(default=None, repr=False)

    @property
    def options(self) -> StorageOptions:
        return StorageOptions(endpoint=self.endpoint, region=self.region)

    @property
    def client(self) -> Any:
        """A boto3 S3 client on this server (explicit endpoint and fake credentials)."""
        if self._client is None:
            self._client = _boto3_client(self.endpoint, self.region)
        return self._client

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def snapshot(self) -> dict[str, bytes]:
        """Every object of the bucket (folder markers left out), for :meth:`restart`."""
        out: dict[str, bytes] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    body = self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"]
                    out[obj["Key"]] = body.read()
        return out

    def kill(self) -> None:
        """End the server abruptly (SIGKILL): its port closes, its state is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self, objects: dict[str, bytes], ready_timeout: float = 30.0) -> None:
        """A new server on the same port, holding the bucket with ``objects`` when it listens."""
        self.kill()
        self.log_path.unlink(missing_ok=True)
        new = start_s3_server(
            self.bucket, self.port, self.region, ready_timeout, objects=objects
        )
        self.process, self.log_path, self._client = new.process, new.log_path, None

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.lstrip('/')}".rstrip("/")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server by its own pid: SIGTERM, bounded wait, then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_s3_server(
    bucket: str = "sslmm-test",
    port: int | None = None,
    region: str = "us-east-1",
    ready_timeout: float = 20.0,
    objects: dict[str, bytes] | None = None,
) -> S3Server:
    """Start ``moto_server`` on 127.0.0.1 (a free port unless given) and create ``bucket``.

    ``objects``: start a server that already holds ``bucket`` with these objects when its
    port opens (see :meth:`S3Server.restart`).
    """
    port = port or _free_port()
    log = Path(tempfile.mkstemp(prefix="moto-s3-", suffix=".log")[1])
    if objects is None:
        command = [str(_moto_server_executable()), "-H", _HOST, "-p", str(port)]
    else:
        seed = Path(tempfile.mkdtemp(prefix="moto-s3-seed-"))
        for key, body in objects.items():
            (seed / key).parent.mkdir(parents=True, exist_ok=True)
            (seed / key).write_bytes(body)
        command = [
            sys.executable, "-m", "sslmm_ray.devtools.s3server",
            "--port", str(port), "--bucket", bucket, "--serve-seeded", str(seed),
        ]  # fmt: skip
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: a Ctrl-C in the parent is not its
            env={**os.environ, **FAKE_CREDENTIALS},
        )
    endpoint = f"http://{_HOST}:{port}"
    server = S3Server(endpoint=endpoint, bucket=bucket, region=region, process=proc, log_path=log)
    try:
        _wait_ready(server, ready_timeout)
        if objects is None:
            server.client.create_bucket(Bucket=bucket)
    except BaseException:
        server.stop()
        raise
    finally:
        if objects is not None:
            shutil.rmtree(seed, ignore_errors=True)
    return server


def _serve_seeded(port: int, bucket: str, seed: Path) -> None:
    """Load ``seed`` (files named by key) into an in-process moto, then serve it on ``port``.

    The objects are read before the port opens, so the seed may be deleted once it answers.
    """
    import boto3
    from moto import mock_aws
    from moto.server import ThreadedMotoServer

    files = {p.relative_to(seed).as_posix(): p.read_bytes() for p in seed.rglob("*") if p.is_file()}
    with mock_aws():  # the threaded server shares this process's in-memory backends
        client = boto3.client("s3", region_name=FAKE_CREDENTIALS["AWS_REGION"])
        client.create_bucket(Bucket=bucket)
        for key, body in files.items():
            client.put_object(Bucket=bucket, Key=key, Body=body)
        server = ThreadedMotoServer(ip_address=_HOST, port=port, verbose=False)
        server.start()
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        server.stop()


def _moto_server_executable() -> Path:
    exe = Path(sys.executable).parent / "moto_server"
    if exe.exists():
        return exe
    found = shutil.which("moto_server")
    if found:
        return Path(found)
    raise RuntimeError("moto_server not found: install the dev extra (pip install -e '.[dev]')")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Poll an HTTP GET until the server answers (any status), it dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"moto_server exited with code {server.process.returncode}: "
                f"{server.log_path.read_text(errors='replace')[-2000:]}"
            )
        try:
            with urllib.request.urlopen(server.endpoint + "/", timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # an HTTP answer, even an error, means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server at {server.endpoint} not ready after {timeout:.0f} s")


def _boto3_client(endpoint: str, region: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}),
    )


def main(argv: list[str] | None = None) -> None:
    """Run a dev server until interrupted; prints the settings to export."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", default="sslmm")
    parser.add_argument("--serve-seeded", type=Path, help=argparse.SUPPRESS)  # see restart()
    args = parser.parse_args(argv)
    if args.serve_seeded is not None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        _serve_seeded(args.port, args.bucket, args.serve_seeded)
        return
    server = start_s3_server(bucket=args.bucket, port=args.port)
    print(f"S3 server at {server.endpoint}, bucket s3://{server.bucket}")
    print(f"export SSLMM_S3_ENDPOINT={server.endpoint}")
    for key, value in FAKE_CREDENTIALS.items():  # moto's fake pair, safe to show
        print(f"export {key}={value}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the child too
    try:
        while server.process.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
