"""Storage URIs over local disk and a real S3 server process (moto on 127.0.0.1)."""

from __future__ import annotations

import pickle
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from sslmm_ray import storage
from sslmm_ray.devtools.s3server import S3Server
from sslmm_ray.storage import StorageError, StorageOptions

SECRET = "sekrit-value-that-must-never-show-9f3"
KEY_ID = "AKIDNEVERSHOWN42"


@pytest.fixture
def prefix(s3: S3Server) -> str:
    """A fresh prefix in the shared bucket for one test."""
    return s3.uri(f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    storage.clear_cache()
    yield
    storage.clear_cache()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- URIs and options -------------------------------------------------------------------------


def test_parse_local_file_and_s3(tmp_path: Path) -> None:
    fs, path = storage.resolve(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    fs2, path2 = storage.resolve(f"file://{tmp_path}/a%20b")
    assert fs2 is fs and path2 == str(tmp_path / "a b")
    opts = StorageOptions(endpoint="http://127.0.0.1:9", region="eu-west-1")
    s3fs, key = storage.resolve("s3://bucket/some/prefix/", opts)
    assert isinstance(s3fs, pafs.S3FileSystem) and key == "bucket/some/prefix"
    assert storage.resolve("s3://bucket/x", opts)[0] is s3fs  # cached per endpoint and region
    assert storage.resolve("s3://bucket", opts)[1] == "bucket"
    assert storage.is_remote("s3://b/p") and not storage.is_remote(str(tmp_path))
    assert not storage.is_remote("file:///tmp")


def test_unknown_scheme_and_bad_uris_name_the_uri() -> None:
    for bad in ("gs://bucket/x", "hdfs://nn/x", "s3:///nobucket"):
        with pytest.raises(StorageError, match=re.escape(bad)) as info:
            storage.resolve(bad)
        assert isinstance(info.value, ValueError)
    with pytest.raises(StorageError, match="scheme|look like"):
        storage.resolve("s3://b/x", StorageOptions(endpoint="127.0.0.1:9000"))
    with pytest.raises(StorageError, match="embeds credentials") as info:
        storage.resolve("s3://b/x", StorageOptions(endpoint=f"http://k:{SECRET}@h:1"))
    assert SECRET not in str(info.value)


def test_join() -> None:
    assert storage.join("s3://b/x/", "a", "/c/") == "s3://b/x/a/c"
    assert storage.join("file:///tmp/d", "m.json") == "file:///tmp/d/m.json"
    assert storage.join("rel", "a", "b") == str(Path("rel", "a", "b"))


def test_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLMM_S3_ENDPOINT", "http://env-host:9000")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert StorageOptions.from_env() == StorageOptions("http://env-host:9000", "ap-south-1")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    opts = StorageOptions.from_env(endpoint="http://arg:1")
    assert opts == StorageOptions("http://arg:1", "eu-central-1")
    monkeypatch.delenv("SSLMM_S3_ENDPOINT")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert StorageOptions.from_env() == StorageOptions(None, "us-east-1")
    assert not hasattr(opts, "access_key") and "sekrit" not in repr(opts)


def test_ray_storage(tmp_path: Path) -> None:
    assert storage.ray_storage(str(tmp_path / "runs")) == (str(tmp_path / "runs"), None)
    opts = StorageOptions(endpoint="http://127.0.0.1:9", region="us-east-1")
    path, fs = storage.ray_storage("s3://bucket/runs/", opts)
    assert path == "bucket/runs" and fs is storage.resolve("s3://bucket/x", opts)[0]


def test_pickled_filesystem_carries_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    fs, _ = storage.resolve("s3://b/x", StorageOptions("http://127.0.0.1:9", "us-east-1"))
    blob = pickle.dumps(fs)  # what Ray ships to its workers
    assert SECRET.encode() not in blob and KEY_ID.encode() not in blob
    assert fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:9"


# --- local -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "file-uri"])
def test_local_round_trip(tmp_path: Path, form: str) -> None:
    root = str(tmp_path / "store") if form == "path" else f"file://{tmp_path}/store"
    uri = storage.join(root, "sub", "blob.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")  # overwrite in place
    assert storage.read_bytes(uri) == b"two"
    storage.write_json(storage.join(root, "manifest.json"), {"n": 3, "shards": ["a"]})
    assert storage.read_json(storage.join(root, "manifest.json")) == {"n": 3, "shards": ["a"]}
    assert storage.list_files(root) == [
        storage.join(root, "manifest.json"),
        storage.join(root, "sub", "blob.bin"),
    ]
    assert storage.list_files(root, suffix=".json") == [storage.join(root, "manifest.json")]
    # the temp-file-then-rename write leaves nothing else behind
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == [
        "blob.bin",
        "manifest.json",
        "sub",
    ]
    storage.makedirs(storage.join(root, "empty", "dir"))
    assert storage.exists(storage.join(root, "empty", "dir"))
    storage.delete(root)
    assert not storage.exists(root) and storage.list_files(root) == []
    storage.delete(root)  # deleting what is gone is fine
    with pytest.raises(FileNotFoundError, match="blob.bin"):
        storage.read_bytes(uri)


def test_read_json_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(StorageError, match="m.json"):
        storage.read_json(str(tmp_path / "m.json"))


# --- S3 over the real server -------------------------------------------------------------------


def test_s3_round_trip_list_delete(s3: S3Server, prefix: str) -> None:
    storage.check_reachable(prefix)  # options from the environment the fixture set
    blob = storage.join(prefix, "shards", "part-0.parquet")
    storage.write_bytes(blob, b"\x00PAR1" * 1000)
    assert storage.read_bytes(blob) == b"\x00PAR1" * 1000
    storage.write_json(storage.join(prefix, "manifest.json"), {"rows": 5})
    assert storage.read_json(storage.join(prefix, "manifest.json"), s3.options) == {"rows": 5}
    storage.write_bytes(storage.join(prefix, "shards", "part-1.parquet"), b"x")

    # what the storage layer wrote is what S3 holds (seen by an independent client)
    bucket, key = blob.removeprefix("s3://").split("/", 1)
    assert s3.client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"\x00PAR1" * 1000

    assert storage.list_files(prefix, suffix=".parquet") == [
        storage.join(prefix, "shards", "part-0.parquet"),
        storage.join(prefix, "shards", "part-1.parquet"),
    ]
    assert len(storage.list_files(prefix)) == 3
    assert storage.exists(blob) and storage.exists(prefix)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        storage.read_bytes(storage.join(prefix, "nothing-here"))

    storage.delete(storage.join(prefix, "shards"))
    assert storage.list_files(prefix) == [storage.join(prefix, "manifest.json")]
    storage.delete(prefix)
    assert storage.list_files(prefix) == [] and not storage.exists(blob)
    storage.delete(prefix)


def test_s3_endpoint_is_explicit_not_aws_endpoint_url(
    s3: S3Server, prefix: str, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://bogus.invalid:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://bogus.invalid:1")
    fs, _ = storage.resolve(prefix)
    reduced = fs.__reduce__()[1][0]
    assert f"{reduced['scheme']}://{reduced['endpoint_override']}" == s3.endpoint
    storage.write_bytes(storage.join(prefix, "x"), b"ok")
    assert storage.read_bytes(storage.join(prefix, "x"), s3.options) == b"ok"
    storage.check_reachable(prefix)


def test_missing_bucket_is_named(s3: S3Server) -> None:
    with pytest.raises(StorageError, match="no-such-bucket.*does not exist") as info:
        storage.check_reachable("s3://no-such-bucket/x", s3.options)
    assert s3.endpoint in str(info.value)


def test_unreachable_endpoint_bounded_and_named(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    # Two SDK retries keep this fast; the default budget (~51 s, S3_MAX_RETRIES) is shown to
    # ride out a real outage in test_store_safety.py.
    opts = StorageOptions(endpoint=endpoint, region="us-east-1", retries=2)
    messages = []

    start = time.monotonic()
    with pytest.raises(StorageError, match="unreachable") as info:
        storage.check_reachable("s3://data/mosi", opts)
    assert time.monotonic() - start < 10
    assert "3 attempt" in str(info.value)
    messages.append(str(info.value))

    for call in (
        lambda: storage.read_bytes("s3://data/mosi/manifest.json", opts),
        lambda: storage.write_bytes("s3://data/mosi/x", b"x", opts),
    ):  # each goes through the SDK's bounded retries
        start = time.monotonic()
        with pytest.raises(StorageError, match="unreachable") as info:
            call()
        assert time.monotonic() - start < 10
        messages.append(str(info.value))

    for msg in messages:
        assert endpoint in msg and "'data'" in msg
        assert SECRET not in msg and KEY_ID not in msg


def test_hung_endpoint_probe_is_bounded(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    """A server that accepts connections but never answers still fails within the deadline."""
    monkeypatch.setattr(storage, "PROBE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "PROBE_DEADLINE_S", 1.5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        with pytest.raises(StorageError, match="unreachable") as info:
            storage.check_reachable("s3://data", StorageOptions(endpoint, "us-east-1"))
        assert time.monotonic() - start < 6
        assert endpoint in str(info.value)
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_pickled_filesystem_keeps_its_retries() -> None:
    """Ray ships the filesystem to its workers: they must retry as the driver does."""
    fs, _ = storage.resolve("s3://b/x", StorageOptions("http://127.0.0.1:9", "us-east-1"))
    clone = pickle.loads(pickle.dumps(fs))
    assert isinstance(clone, pafs.S3FileSystem)
    assert clone._settings["retries"] == storage.S3_MAX_RETRIES > 0
    assert clone._settings["connect_timeout"] == storage.CONNECT_TIMEOUT_S
    few, _ = storage.resolve("s3://b/x", StorageOptions("http://127.0.0.1:9", "us-east-1", 2))
    assert pickle.loads(pickle.dumps(few))._settings["retries"] == 2


def test_url_credentials_never_shown(tmp_path: Path, fresh_cache: None) -> None:
    from sslmm_ray.data.sources import DataError
    from sslmm_ray.errors import UserError, redact

    secret = "hunter2-secret"
    messages = []
    for call in (
        lambda: storage.resolve(f"s3://alice:{secret}@bucket/x"),
        lambda: storage.resolve("s3://b/x", StorageOptions(f"http://bob:{secret}@127.0.0.1:9")),
        lambda: storage.read_bytes(f"file://carol:{secret}@somehost/x"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        messages.append(str(info.value))
    for err in (
        UserError(f"cannot fetch https://dave:{secret}@example.com/data.pkl"),
        DataError(f"s3://eve:{secret}@bucket/ds: bad"),
        StorageError(f"endpoint http://{secret}@10.0.0.1:9000 is down"),
    ):
        messages.append(str(err))
    assert messages and all(secret not in m for m in messages), messages
    assert "***@" in messages[0]
    assert redact("see http://u:p@h:1/x and s3://b/k") == "see http://***@h:1/x and s3://b/k"
    assert redact("mail a@b.c, path /x@y") == "mail a@b.c, path /x@y"  # only URLs' userinfo
