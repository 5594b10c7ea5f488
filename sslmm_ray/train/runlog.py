"""Per-epoch history of a run: ``history.json`` and TensorBoard scalars in the run directory.

Rank 0 rewrites the whole history every epoch (it is small) so that a reader, a resumed run and
the final summary all see every epoch exactly once. TensorBoard event files are written to a
local folder and mirrored to the run directory's ``tensorboard/`` (which may be on S3).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

from sslmm_ray import storage
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train.rundir import TENSORBOARD, RunDir


class RunLog:
    def __init__(self, run_dir: str, options: StorageOptions) -> None:
        self.run_dir = run_dir
        self.layout = RunDir(run_dir)
        self.options = options
        self._writer: SummaryWriter | None = None
        self._local_tb: Path | None = None

    def _tb(self) -> SummaryWriter:
        if self._writer is None:
            if storage.is_remote(self.run_dir):
                self._local_tb = Path(tempfile.mkdtemp(prefix="sslmm-tb-"))
            else:
                self._local_tb = Path(self.run_dir.removeprefix("file://")) / TENSORBOARD
            self._writer = SummaryWriter(logdir=str(self._local_tb), flush_secs=1)
        return self._writer

    def write(self, history: list[dict[str, float]]) -> None:
        """Publish the history so far and the newest epoch's scalars."""
        storage.write_json(self.layout.history, history, self.options)
        if not history:
            return
        last = history[-1]
        writer = self._tb()
        epoch = int(last.get("epoch", len(history) - 1))
        for key, value in last.items():
            if key != "epoch":
                writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        writer.flush()
        if storage.is_remote(self.run_dir) and self._local_tb is not None:
            for path in self._local_tb.iterdir():
                storage.write_bytes(
                    storage.join(self.layout.tensorboard, path.name),
                    path.read_bytes(),
                    self.options,
                )

    @staticmethod
    def read(run_dir: str, options: StorageOptions) -> list[dict[str, Any]]:
        uri = RunDir(run_dir).history
        return storage.read_json(uri, options) if storage.exists(uri, options) else []

