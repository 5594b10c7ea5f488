"""Progress of a running stage on the driver, read from the run's ``history.json``.

``trainer.fit()`` blocks and worker logs are noisy, so the driver follows the history that rank 0
publishes each epoch instead: one progress bar with the newest loss and selection metric.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sslmm_ray.storage import StorageOptions
from sslmm_ray.train.runlog import RunLog

POLL_SECONDS = 2.0


@contextlib.contextmanager
def follow(
    run_dir: str, options: StorageOptions, *, epochs: int, metric: str, title: str
) -> Iterator[None]:
    """Show epochs done while the body runs; silent when disabled (SSLMM_PROGRESS=0)."""
    if os.environ.get("SSLMM_PROGRESS", "1") == "0":
        yield
        return
    stop = threading.Event()
    console = Console(file=sys.stderr)
    bar = Progress(
        TextColumn(f"[bold]{title}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = bar.add_task(title, total=epochs, status="starting workers ...")

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                history = RunLog.read(run_dir, options)
            except Exception:  # a half-visible write or a storage hiccup: try again later
                continue
            if history:
                last = history[-1]
                loss = last.get("train_loss", float("nan"))
                status = f"epoch {int(last['epoch'])}: loss {loss:.3f}"
                if metric in last:
                    status += f", {metric} {last[metric]:.3f}"
                bar.update(task, completed=int(last["epoch"]) + 1, status=status)

    thread = threading.Thread(target=poll, name="sslmm-progress", daemon=True)
    with bar:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=POLL_SECONDS * 2)
