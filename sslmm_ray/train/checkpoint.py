"""Checkpoint contents and the one place that reads and writes them.

A checkpoint directory holds ``state.pt`` (tensors only: model, optimizer, scheduler, EMA
teacher, RNG states; loaded with ``weights_only=True`` so it can never run code) and
``meta.json`` (what produced it: stage, epoch, metrics, model config, data shapes). Anything a
user passes as a checkpoint may also be a run directory, meaning that run's best checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch

from sslmm_ray import storage
from sslmm_ray.config import ModelConfig
from sslmm_ray.errors import UserError
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import rundir

FORMAT_VERSION = 1
STATE = rundir.CHECKPOINT_STATE
META = rundir.CHECKPOINT_META


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not fit what it is loaded into."""


@dataclass
class CheckpointMeta:
    stage: str
    epoch: int
    metrics: dict[str, float]
    model: dict[str, Any]
    dims: dict[str, int]
    lengths: dict[str, int]
    dataset: str
    protocol: dict[str, Any] = field(default_factory=dict)  # what the data hid in training
    # Trained on features standardised with the store's train statistics (data.normalize).
    # False when absent: checkpoints written before the field existed saw raw features.
    normalize: bool = False
    format_version: int = FORMAT_VERSION

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)


def save(directory: str | Path, meta: CheckpointMeta, state: dict[str, Any]) -> None:
    directory = Path(directory)
    torch.save(state, directory / STATE)
    (directory / META).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True))


def load_dir(directory: str | Path) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Read a local checkpoint directory; every failure names the path and the cause."""
    directory = Path(directory)
    meta_path, state_path = directory / META, directory / STATE
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(
            f"{directory}: not an sslmm checkpoint (expected {META} and {STATE})"
        )
    try:
        meta = CheckpointMeta(**json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({err})") from None
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {meta.format_version}, this sslmm-ray reads "
            f"{FORMAT_VERSION}"
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{state_path}: corrupt checkpoint state ({err})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{state_path}: checkpoint state has no model weights")
    return meta, state


def load_ray_checkpoint(ckpt: ray.train.Checkpoint) -> tuple[CheckpointMeta, dict[str, Any]]:
    with ckpt.as_directory() as d:
        return load_dir(d)


def resolve(uri: str, options: StorageOptions | None = None) -> str:
    """A checkpoint URI, or a run directory meaning its best checkpoint."""
    if storage.exists(rundir.checkpoint_meta(uri), options):
        return uri
    best = rundir.RunDir(uri).best
    if storage.exists(best, options):
        return storage.read_json(best, options)["checkpoint"]
    raise CheckpointError(
        f"{uri}: neither a checkpoint ({META}) nor a finished run directory ({rundir.BEST})"
    )


def load(uri: str, options: StorageOptions | None = None) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Load a checkpoint (or a run's best) from any storage URI."""
    uri = resolve(uri, options)
    if not storage.is_remote(uri):
        return load_dir(uri.removeprefix("file://"))
    fs, path = storage.resolve(uri, options)
    with tempfile.TemporaryDirectory(prefix="sslmm-ckpt-") as tmp:
        ray.train.Checkpoint(path, filesystem=fs).to_directory(tmp)
        return load_dir(tmp)


def check_compatible(meta: CheckpointMeta, dims, lengths, checkpoint_uri: str, data_uri: str):
    """A checkpoint only runs on data of the shapes it was trained on."""
    if meta.dims != dict(dims) or meta.lengths != dict(lengths):
        raise CheckpointError(
            f"checkpoint {checkpoint_uri} was trained on dims {meta.dims} / lengths "
            f"{meta.lengths}, but {data_uri} has dims {dict(dims)} / lengths {dict(lengths)}"
        )


def load_model(
    uri: str, options: StorageOptions | None = None
) -> tuple[torch.nn.Module, CheckpointMeta]:
    """The model of a checkpoint, ready for inference."""
    from sslmm_ray.model import build_model

    meta, state = load(uri, options)
    model = build_model(meta.model_config, meta.dims, meta.lengths)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{uri}: weights do not fit the model described in its metadata ({err})"
        ) from None
    model.eval()
    return model, meta


def write_best(run_dir: str, checkpoint_uri: str, metrics: dict[str, Any], options) -> None:
    storage.write_json(
        rundir.RunDir(run_dir).best, {"checkpoint": checkpoint_uri, "metrics": metrics}, options
    )

