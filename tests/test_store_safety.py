"""The store against hostile input and a flaky network: tampered manifests, corrupt shards,
lost manifest writes and a stopped S3 server. Real processes only: a moto server over HTTP, a
TCP proxy thread in front of it, Ray for the streaming read."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from sslmm_ray import locks, storage
from sslmm_ray.data import pipeline, protocols, store, synth
from sslmm_ray.data.sources import DataError, RawDataset
from sslmm_ray.devtools.s3server import S3Server, start_s3_server
from sslmm_ray.storage import StorageError, StorageOptions


@pytest.fixture(scope="module")
def raw() -> RawDataset:
    return synth.generate("mosi", scale=0.03, aligned=True, seed=3)


def _keys(s3: S3Server, prefix: str) -> list[str]:
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("/"))


def _flip_middle_byte(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


# --- an overwrite deletes only what the store wrote --------------------------------------------


def test_tampered_manifest_cannot_delete_outside_local(tmp_path: Path, raw: RawDataset) -> None:
    uri = str(tmp_path / "ds")
    first = store.write_dataset(raw, uri, shard_rows=16)
    (gen,) = first.generations()
    victim = Path(uri) / "victim" / "x.parquet"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    mpath = Path(uri) / store.MANIFEST
    data = json.loads(mpath.read_text())
    data["shards"][0]["path"] = "victim/x.parquet"  # still a valid manifest
    data["shards"][1]["path"] = "shards-not-ours/x.parquet"
    mpath.write_text(json.dumps(data))

    second = store.write_dataset(raw, uri, shard_rows=16)
    assert victim.read_bytes() == b"precious"
    assert not (Path(uri) / gen).exists()  # the store's own previous generation did go
    assert store.open_dataset(uri, verify=True).generations() == second.generations()

    # a path escaping the folder makes the manifest unreadable: nothing at all is deleted
    outside = tmp_path / "x"
    outside.write_bytes(b"outside")
    data = json.loads(mpath.read_text())
    data["shards"][0]["path"] = "../x"
    mpath.write_text(json.dumps(data))
    third = store.write_dataset(raw, uri, shard_rows=16)
    assert outside.read_bytes() == b"outside" and victim.read_bytes() == b"precious"
    (second_gen,) = second.generations()
    assert (Path(uri) / second_gen).is_dir()  # unreadable old manifest: old shards kept
    assert store.open_dataset(uri, verify=True).generations() == third.generations()


def test_tampered_manifest_cannot_delete_outside_s3(s3: S3Server, raw: RawDataset) -> None:
    prefix = f"safety/{uuid.uuid4().hex}"
    uri = s3.uri(f"{prefix}/ds")
    store.write_dataset(raw, uri, s3.options, shard_rows=16)
    s3.client.put_object(Bucket=s3.bucket, Key=f"{prefix}/ds/victim/x.parquet", Body=b"v")
    s3.client.put_object(Bucket=s3.bucket, Key=f"{prefix}/x", Body=b"o")
    key = f"{prefix}/ds/{store.MANIFEST}"
    data = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    data["shards"][0]["path"] = "victim/x.parquet"
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(data).encode())

    second = store.write_dataset(raw, uri, s3.options, shard_rows=16)
    (gen,) = second.generations()
    assert _keys(s3, f"{prefix}/ds/victim/") == [f"{prefix}/ds/victim/x.parquet"]
    data = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    data["shards"][0]["path"] = "../x"
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(data).encode())
    store.write_dataset(raw, uri, s3.options, shard_rows=16)
    assert f"{prefix}/x" in _keys(s3, prefix)
    assert any(k.startswith(f"{prefix}/ds/{gen}/") for k in _keys(s3, prefix))  # kept
    assert _keys(s3, f"{prefix}/ds/victim/") == [f"{prefix}/ds/victim/x.parquet"]


def test_unknown_dataset_name_is_one_line_error(tmp_path: Path, raw: RawDataset) -> None:
    uri = str(tmp_path / "ds")
    store.write_dataset(raw, uri)
    mpath = Path(uri) / store.MANIFEST
    data = json.loads(mpath.read_text())
    data["name"] = "imagenet"
    mpath.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown data set name 'imagenet'") as info:
        store.open_dataset(uri)
    assert "\n" not in str(info.value)
    data["name"] = "synthetic-scalable"  # MOSI's shapes and labels
    mpath.write_text(json.dumps(data))
    assert store.open_dataset(uri).family == "mosi"


# --- checksums on every read -------------------------------------------------------------------


def test_same_size_corrupt_shard_refused_on_read(s3: S3Server, tmp_path: Path, raw) -> None:
    uri = str(tmp_path / "ds")
    manifest = store.write_dataset(raw, uri, shard_rows=16)
    shard = next(s for s in manifest.shards if s.split == "test")
    path = Path(uri) / shard.path
    path.write_bytes(_flip_middle_byte(path.read_bytes()))
    store.open_dataset(uri)  # size, footer and schema still pass
    with pytest.raises(DataError, match=f"{re.escape(shard.path)}: checksum mismatch") as info:
        store.read_split(manifest, "test")
    assert "\n" not in str(info.value)

    prefix = f"safety/{uuid.uuid4().hex}"
    remote = store.write_dataset(raw, s3.uri(prefix), s3.options, shard_rows=16)
    shard = next(s for s in remote.shards if s.split == "valid")
    key = f"{prefix}/{shard.path}"
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=_flip_middle_byte(body))
    with pytest.raises(DataError, match=f"{re.escape(shard.path)}: checksum mismatch"):
        store.read_split(remote, "valid", s3.options)


def test_stores_without_xxh3_are_checked_with_sha256(tmp_path: Path, raw) -> None:
    """Reads check XXH3 (fast); a manifest written before it existed falls back to SHA-256."""
    uri = str(tmp_path / "ds")
    manifest = store.write_dataset(raw, uri, shard_rows=16)
    assert all(len(s.xxh3) == 16 for s in manifest.shards)
    data = json.loads((Path(uri) / store.MANIFEST).read_text())
    for shard in data["shards"]:
        del shard["xxh3"]
    (Path(uri) / store.MANIFEST).write_text(json.dumps(data))
    old = store.open_dataset(uri)
    assert all(not s.xxh3 for s in old.shards)
    store.read_split(old, "test")  # intact: reads
    shard = next(s for s in old.shards if s.split == "test")
    path = Path(uri) / shard.path
    path.write_bytes(_flip_middle_byte(path.read_bytes()))
    with pytest.raises(DataError, match=r"checksum mismatch \(corrupt shard: sha256"):
        store.read_split(old, "test")


def test_corrupt_shard_stops_the_ray_stream(ray_cluster, tmp_path: Path, raw) -> None:
    uri = str(tmp_path / "ds")
    manifest = store.write_dataset(raw, uri, shard_rows=16)
    spec = protocols.ProtocolSpec(missing_rate=0.5, seed=0)
    rows = raw.counts()["train"]

    def stream(verify: bool) -> int:
        ds = pipeline.split_dataset(manifest, "train", spec, shuffle_seed=1, verify=verify)
        with pipeline.task_data_errors():
            return sum(len(b["label"]) for b in ds.iter_batches(batch_size=32))

    assert stream(True) == rows
    shard = next(s for s in manifest.shards if s.split == "train")
    path = Path(uri) / shard.path
    path.write_bytes(_flip_middle_byte(path.read_bytes()))
    with pytest.raises(DataError, match=f"{re.escape(shard.path)}: checksum mismatch") as info:
        stream(True)
    assert "\n" not in str(info.value)
    assert stream(False) == rows  # data.verify_checksums=false: read unchecked, as before


# --- an ambiguous manifest write -----------------------------------------------------------------

# The request that publishes the manifest: a PutObject, or pyarrow's CompleteMultipartUpload.
_MANIFEST_PUT = re.compile(
    rb"^(PUT /\S*/manifest\.json |POST /\S*/manifest\.json\?uploadId=)", re.MULTILINE
)


class _LossyProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server that loses the manifest's publish.

    ``response``: the PUT (or the multipart upload's completion) reaches the server, its
    answer is dropped and the connection closed. ``request``: the connection is closed before
    the PUT reaches the server.
    ``blackout``: as ``response``, then every later request is cut off too.
    """

    def __init__(self, upstream: int, mode: str) -> None:
        self.upstream, self.mode = upstream, mode
        self.lost = 0
        self.blackout = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.blackout:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            doomed = threading.Event()
            for target in (self._up, self._down):
                threading.Thread(target=target, args=(client, server, doomed), daemon=True).start()

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _up(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if self.blackout:
                    break
                if _MANIFEST_PUT.search(data):
                    self.lost += 1
                    if self.mode == "request":
                        break
                    doomed.set()
                server.sendall(data)
        except OSError:
            pass
        if not doomed.is_set():  # a doomed PUT's connection is closed by _down
            self._close(client, server)

    def _down(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if doomed.is_set() and not data.startswith(b"HTTP/1.1 100"):
                    if self.mode == "blackout":
                        self.blackout = True
                    break  # the PUT landed; its answer is lost
                client.sendall(data)
        except OSError:
            pass
        self._close(client, server)


def _through(proxy: _LossyProxy) -> StorageOptions:
    return StorageOptions(endpoint=proxy.endpoint, region="us-east-1", retries=1)


def _generations_on(s3: S3Server, prefix: str) -> set[str]:
    return {k.split("/")[2] for k in _keys(s3, prefix)} - {store.MANIFEST}


@pytest.fixture
def dataset(s3: S3Server, raw: RawDataset) -> tuple[str, str, str]:
    prefix = f"safety/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    (gen,) = store.write_dataset(raw, uri, s3.options, shard_rows=32).generations()
    return prefix, uri, gen


def test_lost_publish_answer_is_settled_as_success(s3, raw, dataset, caplog) -> None:
    prefix, uri, old = dataset
    proxy = _LossyProxy(s3.port, "response")
    try:
        new = store.write_dataset(raw, uri, _through(proxy), shard_rows=16)
    finally:
        proxy.close()
    assert proxy.lost >= 1
    assert "yet it is live: published" in caplog.text  # the writer did see the error
    (gen,) = new.generations()
    assert _generations_on(s3, prefix) == {gen}  # old shards went, the live ones stayed
    assert store.open_dataset(uri, s3.options, verify=True).generations() == {gen}


def test_lost_publish_request_keeps_the_old_dataset(s3, raw, dataset) -> None:
    prefix, uri, old = dataset
    proxy = _LossyProxy(s3.port, "request")
    try:
        with pytest.raises(StorageError, match="manifest.json"):
            store.write_dataset(raw, uri, _through(proxy), shard_rows=16)
    finally:
        proxy.close()
    assert proxy.lost >= 1
    assert _generations_on(s3, prefix) == {old}  # only the unpublished shards were removed
    assert store.open_dataset(uri, s3.options, verify=True).generations() == {old}


def test_unreadable_after_lost_publish_deletes_nothing(s3, raw, dataset) -> None:
    prefix, uri, old = dataset
    proxy = _LossyProxy(s3.port, "blackout")
    try:
        with pytest.raises(StorageError, match="cannot be read back.*nothing was deleted") as info:
            store.write_dataset(raw, uri, _through(proxy), shard_rows=16)
    finally:
        proxy.close()
    assert "\n" not in str(info.value)
    # The blackout also kept the writer from releasing its lock: the lock object stays behind
    # (named in the warning), beside both generations.
    gens = _generations_on(s3, prefix) - {locks.LOCK_FILE}
    assert old in gens and len(gens) == 2  # both kept
    s3.client.delete_object(Bucket=s3.bucket, Key=f"{prefix}/{locks.LOCK_FILE}")
    live = store.open_dataset(uri, s3.options, verify=True)  # the PUT had landed
    assert live.generations() <= gens


# --- a 10 s outage ------------------------------------------------------------------------------


def test_s3_reads_and_writes_ride_out_a_10s_outage(s3: S3Server, raw: RawDataset) -> None:
    """Kill the server, bring it back on the same port 10 s later: pending I/O completes."""
    server = start_s3_server(bucket="outage")
    try:
        uri = server.uri("ds")
        manifest = store.write_dataset(raw, uri, server.options, shard_rows=32)
        want = store.read_split(manifest, "valid", server.options)
        objects = server.snapshot()
        server.kill()
        down = time.monotonic()
        results: dict[str, object] = {}

        def read() -> None:
            results["read"] = store.read_split(manifest, "valid", server.options)

        def write() -> None:
            storage.write_bytes(storage.join(uri, "during-outage"), b"x", server.options)
            results["write"] = time.monotonic()

        threads = [threading.Thread(target=f) for f in (read, write)]
        for t in threads:
            t.start()
        time.sleep(10.0)
        server.restart(objects)
        outage = time.monotonic() - down
        for t in threads:
            t.join(timeout=60)
        assert outage >= 10.0
        assert set(results) == {"read", "write"}, "an I/O call gave up during the outage"
        got = results["read"]
        assert isinstance(got, dict) and got["id"].tolist() == want["id"].tolist()
        assert storage.read_bytes(storage.join(uri, "during-outage"), server.options) == b"x"
        assert float(results["write"]) - down >= 10.0  # it really waited for the server
    finally:
        server.stop()
