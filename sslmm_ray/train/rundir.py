"""The run directory's layout: every file a stage run writes is named here, once.

::

    <run_dir>/                    a local path or an s3:// URI
      config.json                 the full configuration, written before training; a resume
                                  with other settings is refused against it
      config.before-<time>.json   the settings a run had before --allow-config-change
      history.json                one record per epoch so far (rank 0 rewrites it each epoch)
      tensorboard/                the same scalars as TensorBoard event files
      checkpoint_<time>/          Ray Train's checkpoints, each holding
        meta.json                   what produced it (stage, epoch, metrics, shapes, protocol)
        state.pt                    tensors only: model, student, teacher, optimizer, RNG
      best.json                   which checkpoint won the selection metric, and its metrics
      metrics.json                valid (and test) metrics of that checkpoint; written last,
                                  so its presence means the run finished

Readers and writers (runner, loop, run log, checkpoints, diagnostics, the sweep's trials and
baselines) take their paths from :class:`RunDir` rather than spelling file names.
"""

from __future__ import annotations

from dataclasses import dataclass

from sslmm_ray import storage

CONFIG = "config.json"
HISTORY = "history.json"
TENSORBOARD = "tensorboard"
BEST = "best.json"
METRICS = "metrics.json"
#: Inside each checkpoint directory.
CHECKPOINT_META = "meta.json"
CHECKPOINT_STATE = "state.pt"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory's files, in the run directory's own URI scheme."""

    uri: str

    def _join(self, name: str) -> str:
        return storage.join(self.uri, name)

    @property
    def config(self) -> str:
        return self._join(CONFIG)

    def config_before(self, stamp: str) -> str:
        """Where a resume under changed settings keeps the old ones."""
        return self._join(f"config.before-{stamp}.json")

    @property
    def history(self) -> str:
        return self._join(HISTORY)

    @property
    def tensorboard(self) -> str:
        return self._join(TENSORBOARD)

    @property
    def best(self) -> str:
        return self._join(BEST)

    @property
    def metrics(self) -> str:
        return self._join(METRICS)

    def checkpoint(self, leaf: str) -> str:
        """A checkpoint directory of this run, by its folder name."""
        return self._join(leaf)


def checkpoint_meta(checkpoint_uri: str) -> str:
    return storage.join(checkpoint_uri, CHECKPOINT_META)
