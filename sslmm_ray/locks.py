"""One writer per storage target: a dataset URI, a run directory, a sweep's storage.

Two writers on one target overwrite each other's files without any error (two ``data synth``
into one URI, two ``finetune`` on one ``--run-dir``, two ``tune`` on one ``--storage``). Each
writer therefore first creates the lock object ``<target>/.sslmm.lock``, and only if it did not
exist:

* S3: ``PutObject`` with ``If-None-Match: *`` (a conditional create, honoured by AWS S3 since
  2024 and by the moto server used in the tests), through boto3: pyarrow cannot send it.
* local: ``os.open(O_CREAT | O_EXCL)``, atomic on local disks.

The lock holds its holder (host, pid, start time, command). A second writer fails at once with
a one-line :class:`LockError` naming that holder and how to break the lock. The lock is released
when the writer ends, on success and on exceptions alike. A writer killed with SIGKILL (or whose
node died) leaves its lock behind: a lock whose holder ran on this host and is gone is taken over
automatically; any other stale lock is broken explicitly (``--break-lock``, or deleting the
object the message names), since no process can tell a dead remote holder from a slow one.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import json
import logging
import os
import shlex
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ParamSpec, TypeVar

from sslmm_ray import storage
from sslmm_ray.errors import UserError
from sslmm_ray.storage import StorageError, StorageOptions

__all__ = ["LOCK_FILE", "Holder", "LockError", "exclusive", "hold", "lock_uri", "read_holder"]

log = logging.getLogger(__name__)

LOCK_FILE = ".sslmm.lock"
#: A holder process started later than its lock (plus this slack) is another process that
#: reused the pid: the lock's own holder is gone.
_PID_REUSE_SLACK_S = 2.0
_ATTEMPTS = 3  # create, find the holder gone (released or stale), create again

P = ParamSpec("P")
R = TypeVar("R")


class LockError(UserError):
    """The target is being written by another process (named in the message)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock; written as JSON into the lock object."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str
    token: str  # unique per acquisition: release never deletes someone else's lock

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            command=shlex.join(sys.argv)[:300],
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started} ({self.command})"

    def is_gone(self) -> bool:
        """True only when certain: the holder ran on this host and that process is gone."""
        if self.host != socket.gethostname():
            return False
        import psutil

        try:
            started = dt.datetime.fromisoformat(self.started).timestamp()
            created = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            return True
        except (psutil.Error, ValueError):
            return False
        return created > started + _PID_REUSE_SLACK_S


def lock_uri(target: str) -> str:
    """Where the lock of ``target`` lives (inside it: deleting the target deletes its lock)."""
    return storage.join(target.rstrip("/"), LOCK_FILE)


# --------------------------------------------------------------------------- primitives


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=Config(connect_timeout=3, read_timeout=10,
                      retries={"mode": "standard", "max_attempts": 3}),
    )


def _s3(uri: str, options: StorageOptions | None) -> tuple[Any, str, str, StorageOptions]:
    opts = storage._options(options)
    _, path = storage.resolve(uri, opts)
    bucket, _, key = path.partition("/")
    return _s3_client(opts.endpoint, opts.region or storage.DEFAULT_REGION), bucket, key, opts


def _s3_error(uri: str, opts: StorageOptions, exc: BaseException) -> StorageError:
    return StorageError(f"S3 endpoint {opts.describe()} failed on lock {uri}: "
                        f"{storage._scrub(str(exc))}")


def _create(uri: str, body: bytes, options: StorageOptions | None) -> bool:
    """Create the object only if absent; False when it already exists."""
    if not storage.is_remote(uri):
        path = storage.resolve(uri)[1]
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise storage.local_failure(uri, exc) from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            os.unlink(path)
            raise storage.local_failure(uri, exc) from None
        return True
    from botocore.exceptions import BotoCoreError, ClientError

    storage.check_reachable(uri, options)  # its clear message, not boto3's, if S3 is down
    client, bucket, key, opts = _s3(uri, options)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        return True
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # 412: it exists; 409: a concurrent conditional write to the same key won the race.
        if status in (409, 412):
            return False
        raise _s3_error(uri, opts, exc) from None
    except BotoCoreError as exc:
        raise _s3_error(uri, opts, exc) from None


def read_holder(target: str, options: StorageOptions | None = None) -> Holder | None:
    """The current holder of ``target``'s lock; None when it is not locked."""
    uri = lock_uri(target)
    try:
        raw = storage.read_bytes(uri, options)
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):  # a writer died between create and write, or a stranger
        return Holder(host="?", pid=-1, started="?", command="unreadable lock file", token="")


def _delete_if(uri: str, holder: Holder, options: StorageOptions | None) -> None:
    """Delete the lock if it still holds ``holder`` (never a lock taken in the meantime)."""
    try:
        current = Holder(**json.loads(storage.read_bytes(uri, options)))
    except FileNotFoundError:
        return
    except (ValueError, TypeError):
        current = None
    if current is None or current.token == holder.token:
        _remove(uri, options)


def _remove(uri: str, options: StorageOptions | None) -> None:
    """Delete the lock object itself (never a prefix, as ``storage.delete`` may)."""
    if not storage.is_remote(uri):
        try:
            os.unlink(storage.resolve(uri)[1])
        except FileNotFoundError:
            pass
        return
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, key, opts = _s3(uri, options)
    try:
        client.delete_object(Bucket=bucket, Key=key)  # absent keys are fine on S3
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, opts, exc) from None


# --------------------------------------------------------------------------- the lock


def _message(what: str, target: str, holder: Holder, break_hint: str | None) -> str:
    how = f"re-run with {break_hint} or delete {lock_uri(target)}" if break_hint else (
        f"delete {lock_uri(target)}")
    return (f"{what} {target} is locked by another writer: {holder.describe()}; wait for it "
            f"to finish, or if that process is gone, {how}")


def acquire(
    target: str,
    options: StorageOptions | None = None,
    *,
    what: str = "target",
    break_lock: bool = False,
    break_hint: str | None = None,
) -> Holder:
    """Take ``target``'s lock or raise :class:`LockError` naming its holder."""
    uri = lock_uri(target)
    me = Holder.me()
    body = (json.dumps(asdict(me), indent=2) + "\n").encode()
    for _ in range(_ATTEMPTS):
        if _create(uri, body, options):
            return me
        holder = read_holder(target, options)
        if holder is None:
            continue  # released between our create and our read
        if break_lock or holder.is_gone():
            log.warning("%s %s: breaking the lock of %s%s", what, target, holder.describe(),
                        "" if break_lock else " (that process no longer runs)")
            _delete_if(uri, holder, options)
            break_lock = False  # break one lock, never a new holder's
            continue
        raise LockError(_message(what, target, holder, break_hint))
    holder = read_holder(target, options)
    raise LockError(_message(what, target, holder or me, break_hint))


def release(target: str, holder: Holder, options: StorageOptions | None = None) -> None:
    """Give the lock back (only ours: a lock broken and re-taken by another is left alone)."""
    try:
        _delete_if(lock_uri(target), holder, options)
    except (OSError, UserError) as exc:  # never hide the writer's own outcome
        log.warning("could not release the lock of %s: %s", target, exc)


@contextmanager
def hold(
    target: str,
    options: StorageOptions | None = None,
    *,
    what: str = "target",
    break_lock: bool = False,
    break_hint: str | None = None,
) -> Iterator[Holder]:
    """Hold ``target``'s lock for the ``with`` block; released on exit, errors included."""
    holder = acquire(target, options, what=what, break_lock=break_lock, break_hint=break_hint)
    try:
        yield holder
    finally:
        release(target, holder, options)


def exclusive(
    target_arg: str, *, what: str, options_arg: str = "options"
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: hold the lock of the function's ``target_arg`` argument while it runs."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            target = bound.arguments[target_arg]
            with hold(target, bound.arguments.get(options_arg), what=what):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
