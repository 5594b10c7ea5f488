"""A Ray head that a test starts with `ray start --head --block` and stops by its own pid.

The head runs in its own process group (``start_new_session``) with a private, short
``--temp-dir`` (Ray's socket paths must stay short). Stopping it never touches another Ray:
SIGTERM to the head, SIGKILL to its process group, then any process of this head that left the
group (Ray's workers start their own sessions) is found by the temp dir on its command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
STOP_GRACE = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def processes_of(temp_dir: str) -> list[int]:
    """Pids of the processes whose command line or environment names ``temp_dir`` (this process
    excluded). Ray's workers rename themselves (``ray::IDLE``); a variable of the head's
    environment that names the temp dir marks them too."""
    marker = temp_dir.encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                if marker in (proc / part).read_bytes():
                    found.append(int(proc.name))
                    break
            except OSError:
                continue
    return found


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(proc.name))
    return found


def stop_head(head: subprocess.Popen[bytes], temp_dir: str) -> None:
    """SIGTERM `ray start --block` (it stops its raylet, GCS, dashboard and workers), bounded
    wait, SIGKILL its process group, then kill any process of this head that left the group
    (they name the head's private temp dir on their command line or in their environment)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # pgid == pid (start_new_session)
    except ProcessLookupError:
        pass
    head.wait(timeout=10.0)
    for _ in range(3):
        strays = processes_of(temp_dir)
        if not strays:
            return
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
