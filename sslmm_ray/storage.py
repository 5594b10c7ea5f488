"""The one place that turns a storage URI into a ``pyarrow.fs`` filesystem.

Every stage (data shards and manifests, checkpoints, Ray Train/Tune storage) addresses storage by
URI: a local path, ``file://...`` or ``s3://bucket/prefix``. S3 always goes through an explicit
``pyarrow.fs.S3FileSystem`` built from :class:`StorageOptions`:

* endpoint: ``--s3-endpoint`` / ``SSLMM_S3_ENDPOINT`` (e.g. ``http://127.0.0.1:9000``), passed as
  ``endpoint_override`` + ``scheme``. pyarrow ignores ``AWS_ENDPOINT_URL``, so we never rely on it.
* region: argument, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``.
* credentials: never arguments, never stored, never printed. With ``access_key=None`` pyarrow's
  AWS SDK uses its default chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, then ``~/.aws/credentials`` and ``~/.aws/config`` (``AWS_PROFILE``),
  then the EC2/ECS instance role. A pickled filesystem (Ray ships it to workers) therefore
  carries no secret either: each worker resolves the chain on its own node.

Failures are retried, then bounded. Every S3 request is retried by the AWS SDK inside pyarrow
(``AwsDefaultS3RetryStrategy``: ``S3_MAX_RETRIES`` retries after waits of 0, 50, 100, ... ms,
doubling, 51 s in all), so reads and writes ride out an outage of 10-40 s (a restarted server,
a failover) and a dead endpoint fails within about a minute. Connects time out
after ``CONNECT_TIMEOUT_S`` and a stalled transfer after ``REQUEST_TIMEOUT_S`` (on Linux the SDK
applies it as "no byte for that long"). The filesystem pickles with these settings, so Ray
workers retry alike (a plain ``S3FileSystem`` loses its retry strategy when pickled). Each SDK
retry is logged to stderr when ``SSLMM_S3_LOG_LEVEL=warn`` (the SDK's own log: no request
headers at that level, so no signature or key id); this module logs an operation that needed
more than ``SLOW_S`` seconds, and the final failure. Remote I/O errors surface as
:class:`StorageError` naming the endpoint and bucket, with any credential value and any URL's
``user:password@`` part scrubbed from the text (:func:`redact`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs
from tenacity import (
    RetryError,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from sslmm_ray.errors import UserError, redact

log = logging.getLogger(__name__)

__all__ = [
    "StorageError",
    "StorageOptions",
    "check_reachable",
    "delete",
    "exists",
    "is_remote",
    "join",
    "list_files",
    "makedirs",
    "ray_storage",
    "read_bytes",
    "read_json",
    "redact",
    "resolve",
    "write_bytes",
    "write_json",
]

ENDPOINT_ENV = "SSLMM_S3_ENDPOINT"
DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 10.0
#: SDK retries per request (after the first attempt), waits 25 ms * 2**n for n = 1..10 (the
#: first retry is immediate): 51 s in all. 10 retries (25.5 s) were measured too few for a 10 s
#: outage plus a server restart on a loaded 2-core machine (the restart alone took > 15 s).
S3_MAX_RETRIES = 11
#: An S3 operation slower than this is logged (it was most likely retried).
SLOW_S = 2.0
LOG_LEVEL_ENV = "SSLMM_S3_LOG_LEVEL"
# The reachability probe fails fast: one SDK attempt per tenacity attempt, short timeouts.
PROBE_ATTEMPTS = 3
PROBE_DEADLINE_S = 6.0
PROBE_TIMEOUT_S = 2.0
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_LOCAL_SCHEMES = ("", "file")


class StorageError(UserError, OSError):
    """A bad storage URI or setting (a ValueError) or a failed remote operation (an OSError)."""


@dataclass(frozen=True)
class StorageOptions:
    """Where S3 lives. Holds no credentials by design: those come from the AWS chain."""

    endpoint: str | None = None
    region: str | None = None
    #: SDK retries per S3 request; None: ``S3_MAX_RETRIES``. Fewer fail faster (tests, probes).
    retries: int | None = None

    @classmethod
    def from_env(cls, endpoint: str | None = None, region: str | None = None) -> StorageOptions:
        """Arguments win, then ``SSLMM_S3_ENDPOINT`` and ``AWS_REGION``/``AWS_DEFAULT_REGION``."""
        endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
        region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or DEFAULT_REGION
        )
        return cls(endpoint=endpoint, region=region)

    def describe(self) -> str:
        """The endpoint as shown in messages (never any credential)."""
        if self.endpoint:
            return redact(self.endpoint)
        return f"AWS S3 (region {self.region or DEFAULT_REGION})"


@dataclass(frozen=True)
class _Parsed:
    scheme: str  # "local" or "s3"
    path: str  # the path for the filesystem: absolute local path or "bucket/key"
    bucket: str = ""


def _parse(uri: str) -> _Parsed:
    if not isinstance(uri, str | os.PathLike) or not str(uri):
        raise StorageError(f"storage URI must be a non-empty string, got {uri!r}")
    uri = os.fspath(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket = parts.netloc
        if "@" in bucket:
            raise StorageError(
                f"S3 URI {uri!r} embeds credentials; give them through the AWS variables or "
                "profile instead"
            )
        if not bucket:
            raise StorageError(f"S3 URI {uri!r} has no bucket: expected s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise StorageError(f"S3 URI {uri!r} must not carry '?' or '#' parts")
        key = parts.path.strip("/")
        return _Parsed("s3", f"{bucket}/{key}" if key else bucket, bucket)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {uri!r} names a remote host; use a local path")
        return _Parsed("local", os.path.abspath(unquote(parts.path)))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # "C:\\..." on Windows
        return _Parsed("local", os.path.abspath(os.path.expanduser(uri)))
    raise StorageError(
        f"unsupported storage URI {uri!r}: use a local path, file://PATH or s3://BUCKET/PREFIX"
    )


def _endpoint_parts(endpoint: str) -> tuple[str, str]:
    """``http://host:port`` -> ("http", "host:port"); a scheme is required, no userinfo."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(
            f"S3 endpoint {endpoint!r} must look like http://HOST:PORT or https://HOST"
        )
    if parts.username or parts.password:
        raise StorageError(
            f"S3 endpoint for host {parts.hostname!r} embeds credentials; "
            "give them through the AWS variables or profile instead"
        )
    if parts.path.strip("/") or parts.query:
        raise StorageError(f"S3 endpoint {endpoint!r} must not have a path or query")
    return parts.scheme, parts.netloc


@functools.cache
def _local_fs() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


class _S3FileSystem(pafs.S3FileSystem):
    """An ``S3FileSystem`` that pickles with its retry strategy and timeouts.

    pyarrow's own pickling drops ``retry_strategy``, so a filesystem shipped to a Ray worker
    (a Ray Data read task, Ray Train's checkpoint upload) would fall back to 3 quick attempts.
    """

    def __init__(
        self, *, retries: int, connect_timeout: float, request_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=retries),
            **kwargs,
        )
        self._settings = dict(
            retries=retries,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            **kwargs,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_s3_fs, (self._settings,))


def _rebuild_s3_fs(settings: dict[str, Any]) -> _S3FileSystem:
    _init_s3_logging()
    return _S3FileSystem(**settings)


@functools.cache
def _init_s3_logging() -> None:
    """Turn on the AWS SDK's log (each retry, at "warn") when ``SSLMM_S3_LOG_LEVEL`` asks."""
    level = os.environ.get(LOG_LEVEL_ENV, "").strip().lower()
    if not level:
        return
    levels = {
        "off": pafs.S3LogLevel.Off,
        "fatal": pafs.S3LogLevel.Fatal,
        "error": pafs.S3LogLevel.Error,
        "warn": pafs.S3LogLevel.Warn,
        "info": pafs.S3LogLevel.Info,
    }  # debug and trace would print request headers: never offered
    if level not in levels:
        raise StorageError(f"{LOG_LEVEL_ENV}={level!r}: expected one of {sorted(levels)}")
    try:
        pafs.initialize_s3(levels[level])
    except Exception as err:  # already initialised by an earlier S3 use in this process
        log.warning("%s not applied: %s", LOG_LEVEL_ENV, err)


@functools.lru_cache(maxsize=32)
def _s3_fs(
    endpoint: str | None, region: str, probe: bool = False, retries: int | None = None
) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["scheme"], kwargs["endpoint_override"] = _endpoint_parts(endpoint)
    _init_s3_logging()
    return _S3FileSystem(
        region=region,
        connect_timeout=PROBE_TIMEOUT_S if probe else CONNECT_TIMEOUT_S,
        request_timeout=PROBE_TIMEOUT_S if probe else REQUEST_TIMEOUT_S,
        # the probe retries on its own, briefly
        retries=0 if probe else (S3_MAX_RETRIES if retries is None else retries),
        **kwargs,
    )


def clear_cache() -> None:
    """Forget cached filesystems (tests that change the environment between cases)."""
    _s3_fs.cache_clear()


def _options(options: StorageOptions | None) -> StorageOptions:
    opts = options if options is not None else StorageOptions.from_env()
    if opts.region is None:  # an explicit StorageOptions(endpoint=...) still gets a region
        opts = dataclasses.replace(opts, region=StorageOptions.from_env().region)
    return opts


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for ``uri``; S3 filesystems are cached per endpoint and region."""
    parsed = _parse(uri)
    if parsed.scheme == "local":
        return _local_fs(), parsed.path
    opts = _options(options)
    return _s3_fs(opts.endpoint, opts.region, retries=opts.retries), parsed.path


def is_remote(uri: str) -> bool:
    """True for object storage (s3://), False for local paths and file:// URIs."""
    return _parse(uri).scheme != "local"


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI or local path, keeping its form (scheme, relative or not)."""
    uri = os.fspath(uri)
    if urlsplit(uri).scheme.lower() in ("s3", "file"):
        clean = [p.strip("/") for p in parts if p.strip("/")]
        return posixpath.join(uri.rstrip("/"), *clean) if clean else uri
    return os.path.join(uri, *parts)


def ray_storage(
    uri: str, options: StorageOptions | None = None
) -> tuple[str, pafs.FileSystem | None]:
    """What to give ``RunConfig(storage_path=..., storage_filesystem=...)`` for ``uri``.

    S3: ("bucket/prefix", the configured S3FileSystem), so Ray uses our endpoint and region.
    Local: (absolute path, None), letting Ray use its own local filesystem handling.
    """
    fs, path = resolve(uri, options)
    return (path, None) if isinstance(fs, pafs.LocalFileSystem) else (path, fs)


def _scrub(text: str) -> str:
    """Remove any credential value from an error text before it can be shown or logged."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return redact(text)


_NETWORK_MARKERS = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Timeout")


def _describe_failure(uri: str, opts: StorageOptions, bucket: str, exc: BaseException) -> str:
    detail = _scrub(str(exc))
    where = f"S3 endpoint {opts.describe()} (bucket {bucket!r})"
    if any(marker in detail for marker in _NETWORK_MARKERS):
        return f"{where} is unreachable while accessing {uri}: {detail}"
    return f"{where} failed while accessing {uri}: {detail}"


_LOCAL_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file size limit was reached",
    errno.EROFS: "the destination is on a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def local_failure(uri: str, exc: OSError) -> StorageError:
    """A local OSError as one line naming the path and the likely cause (full disk, ...)."""
    detail = exc.strerror or type(exc).__name__
    hint = _LOCAL_HINTS.get(exc.errno or 0)
    why = f"{hint} ({detail})" if hint else detail
    return StorageError(f"cannot write or read {redact(uri)}: {why}")


@contextmanager
def _io(uri: str, options: StorageOptions | None) -> Iterator[tuple[pafs.FileSystem, str]]:
    """Resolve ``uri`` and turn remote OSErrors into StorageError naming the endpoint."""
    parsed = _parse(uri)
    fs, path = resolve(uri, options)
    start = time.monotonic()
    try:
        yield fs, path
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file or directory: {redact(uri)}") from None
    except StorageError:
        raise
    except OSError as exc:
        if parsed.scheme == "local":
            raise local_failure(uri, exc) from None
        msg = _describe_failure(uri, _options(options), parsed.bucket, exc)
        log.warning("%s (gave up after %.1f s)", msg, time.monotonic() - start)
        raise StorageError(msg) from None  # no chain: the raw text could hold unscrubbed data
    elapsed = time.monotonic() - start
    if parsed.scheme != "local" and elapsed > SLOW_S:
        log.warning("S3 access to %s took %.1f s (retried, or a slow link)", redact(uri), elapsed)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    with _io(uri, options) as (fs, path):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """The whole object or file. On S3: a HEAD then one GET of the known size.

    Why not ``open_input_stream(path).read()``: of unknown size, it reads in ~256 KiB
    pieces, each a ranged GET: a 25 MB shard took 96 requests (counted in moto's log), 11 MB/s
    from moto and 80 MB/s from rclone on the dev machine, against 590 and 320 MB/s as one GET.
    """
    with _io(uri, options) as (fs, path), fs.open_input_file(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object so that readers see the old content or the new, never a part.

    S3 publishes an object only when its upload completes, so we write the final key directly.
    Locally we write a temporary file beside the target and ``os.replace`` it into place.
    """
    with _io(uri, options) as (fs, path):
        if isinstance(fs, pafs.LocalFileSystem):
            _atomic_local_write(Path(path), data)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)


def _current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_local_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".{uuid.uuid4().hex[:8]}.tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; publish as open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    data = read_bytes(uri, options)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
        raise StorageError(f"{uri} is not valid JSON: {exc}") from None


def write_json(uri: str, obj: Any, options: StorageOptions | None = None) -> None:
    """Pretty, key-sorted JSON. NaN is written as Python's json does (``NaN``), so a metrics
    history with gaps round-trips through ``read_json`` instead of failing the run."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_bytes(uri, text.encode("utf-8"), options)


def list_files(
    uri: str, options: StorageOptions | None = None, suffix: str | None = None
) -> list[str]:
    """Files under ``uri`` (recursive, sorted), as URIs of the same form; [] if it is absent."""
    base = os.fspath(uri)
    with _io(base, options) as (fs, path):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    root = path.rstrip("/") + "/"
    rels = sorted(
        i.path[len(root) :]
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.startswith(root)
        and (suffix is None or i.path.endswith(suffix))
    )
    return [join(base, rel) for rel in rels]


def delete(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or a whole prefix/directory, recursively; absent targets are fine."""
    parsed = _parse(uri)
    with _io(uri, options) as (fs, path):
        kind = fs.get_file_info(path).type
        if parsed.scheme == "s3" and path == parsed.bucket:
            fs.delete_dir_contents(path, missing_dir_ok=True)  # never the bucket itself
        elif kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    """Create a directory and its parents (on S3, marker objects; a no-op for a bucket)."""
    parsed = _parse(uri)
    if parsed.scheme == "s3" and parsed.path == parsed.bucket:
        return  # buckets are provisioned outside this program
    with _io(uri, options) as (fs, path):
        fs.create_dir(path, recursive=True)


def check_reachable(uri: str, options: StorageOptions | None = None) -> None:
    """Fail fast, within about ``PROBE_DEADLINE_S`` seconds, if ``uri``'s store is unusable.

    Local URIs always pass. For S3 the bucket is probed (HeadBucket) with up to
    ``PROBE_ATTEMPTS`` tries and a short exponential wait; failure raises StorageError naming
    the endpoint and bucket, never the credentials. A missing bucket is reported as such.
    """
    parsed = _parse(uri)
    if parsed.scheme == "local":
        return
    opts = _options(options)
    fs = _s3_fs(opts.endpoint, opts.region, probe=True)

    @retry(
        stop=stop_after_attempt(PROBE_ATTEMPTS) | stop_after_delay(PROBE_DEADLINE_S),
        wait=wait_exponential(multiplier=0.2, max=1.0),
        retry=retry_if_exception_type(OSError),
        reraise=False,
    )
    def probe() -> pafs.FileInfo:
        return fs.get_file_info(parsed.bucket)

    try:
        info = probe()
    except RetryError as err:
        exc = err.last_attempt.exception()
        attempts = err.last_attempt.attempt_number
        detail = _scrub(str(exc))
        where = f"S3 endpoint {opts.describe()} (bucket {parsed.bucket!r})"
        if any(marker in detail for marker in _NETWORK_MARKERS):
            msg = f"{where} is unreachable after {attempts} attempt(s): {detail}"
        else:
            msg = f"{where} rejected the probe after {attempts} attempt(s): {detail}"
        raise StorageError(msg) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(
            f"bucket {parsed.bucket!r} does not exist at S3 endpoint {opts.describe()}"
        )
