"""The two training stages as objects: what each trains on, minimises, validates and selects by.

The runner (driver side) and the train loop (worker side) are written once for any stage and
ask a :class:`Stage` for everything stage-specific; nothing else dispatches on a stage's name.
A stage is stateless and picklable (it travels to the workers by name, :func:`get`).

- :data:`PRETRAIN`: self-supervised (masked reconstruction + cross-modal InfoNCE) on every
  training row, labels never read; judged by the validation loss.
- :data:`FINETUNE`: semi-supervised (supervised + pseudo-labels from an EMA teacher +
  reconstruction), optionally from a pre-trained checkpoint; judged by ``finetune.selection``
  on the labeled validation rows, and scored on the test split when it finishes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from sslmm_ray import config as config_mod
from sslmm_ray import metrics as mmsa
from sslmm_ray.config import ExperimentConfig, ModelConfig, TrainingConfig, from_dict
from sslmm_ray.data import pipeline, store
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import checkpoint as ckpt
from sslmm_ray.train import distributed
from sslmm_ray.train.objectives import finetune_loss, pretrain_loss

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device):
    """Predictions and labels of the labeled rows of some batches (model in eval mode).

    Rows whose label the protocol withheld (``labeled`` False) cannot be scored and are left
    out: validation at a label ratio below 1 is scored on its labeled rows only.
    """
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for batch in batches:
        keep = batch["labeled"].bool().cpu() if "labeled" in batch else None
        out = model(to_device(batch, device), outputs=("pred",))
        pred, label = out.pred.float().cpu(), batch["label"].float()
        preds.append(pred if keep is None else pred[keep])
        labels.append(label.cpu() if keep is None else label.cpu()[keep])
    model.train(was_training)
    if not preds:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a stage resolved on the driver before training: the config it will run (a
    pre-trained checkpoint fixes the architecture), its Ray datasets, the checkpoint it
    starts from."""

    cfg: ExperimentConfig
    datasets: dict[str, Any]
    pretrained: str | None = None


class Stage:
    """One training stage. Subclasses fill in the class attributes and the methods."""

    name: ClassVar[str]
    #: Keeps an EMA teacher: validation, checkpoints' inference weights and pseudo-labels use it.
    uses_teacher: ClassVar[bool]
    #: A finished run is scored on the test split.
    scores_test: ClassVar[bool]

    def config(self, cfg: ExperimentConfig) -> TrainingConfig:
        """This stage's section: epochs, optimiser, workers, seed (missingness: cfg.missing)."""
        raise NotImplementedError

    def protocol(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """What the data hid in training (recorded in every checkpoint): ``cfg.missing``."""
        return pipeline.missing_spec(cfg.missing)

    def selection(self, cfg: ExperimentConfig, family: str) -> tuple[str, str]:
        """(reported metric, "min" | "max") that picks the best checkpoint."""
        raise NotImplementedError

    def reads(self, cfg: ExperimentConfig) -> dict[str, str | None]:
        """Paths it reads besides the data, by command-line flag (every node must reach them)."""
        return {}

    def prepare(
        self, manifest: store.Manifest, cfg: ExperimentConfig, options: StorageOptions,
        cache: pipeline.SplitCache | None,
    ) -> Prepared:
        raise NotImplementedError

    def loss(
        self, model: torch.nn.Module, teacher: torch.nn.Module | None, batch: Batch,
        cfg: ExperimentConfig, epoch: int, generator: torch.Generator, *,
        label_scale: float = 1.0, hide: dict[str, Tensor] | None = None,
        dropped: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """This rank's share of the global-batch loss, and its stats."""
        raise NotImplementedError

    def validate(
        self, model: torch.nn.Module, teacher: torch.nn.Module | None,
        batches: Iterable[Batch], cfg: ExperimentConfig, device: torch.device, family: str,
    ) -> dict[str, float]:
        """``valid_*`` entries of the epoch's report (rank 0 alone: no collectives)."""
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return get, (self.name,)

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


class Pretraining(Stage):
    name = "pretrain"
    uses_teacher = False
    scores_test = False

    def config(self, cfg: ExperimentConfig) -> TrainingConfig:
        return cfg.pretrain

    def selection(self, cfg: ExperimentConfig, family: str) -> tuple[str, str]:
        return "valid_loss", "min"

    def prepare(self, manifest, cfg, options, cache) -> Prepared:
        return Prepared(cfg, pipeline.pretrain_datasets(manifest, cfg, options, cache))

    def loss(self, model, teacher, batch, cfg, epoch, generator, *, label_scale=1.0,
             hide=None, dropped=None):
        return pretrain_loss(model, batch, cfg.pretrain, generator, hide=hide)

    @torch.no_grad()
    def validate(self, model, teacher, batches, cfg, device, family) -> dict[str, float]:
        """Mean pre-training loss over the validation rows, with masks from the stage seed."""
        model = distributed.unwrap(model)
        model.eval()
        gen = torch.Generator().manual_seed(cfg.pretrain.seed)
        total, n = 0.0, 0
        with distributed.local():
            for batch in batches:
                batch = to_device(batch, device)
                loss, _ = pretrain_loss(model, batch, cfg.pretrain, gen)
                b = len(batch["index"])
                total += float(loss) * b
                n += b
        model.train()
        return {"valid_loss": total / max(n, 1)}


class Finetuning(Stage):
    name = "finetune"
    uses_teacher = True
    scores_test = True

    def config(self, cfg: ExperimentConfig) -> TrainingConfig:
        return cfg.finetune

    def selection(self, cfg: ExperimentConfig, family: str) -> tuple[str, str]:
        name, mode = mmsa.selection_metric(cfg.finetune.selection, family)
        return f"valid_{name}", mode

    def reads(self, cfg: ExperimentConfig) -> dict[str, str | None]:
        return {"--pretrained": cfg.finetune.pretrained}

    def prepare(self, manifest, cfg, options, cache) -> Prepared:
        cfg, pretrained = with_pretrained_model(cfg, options)
        return Prepared(cfg, pipeline.finetune_datasets(manifest, cfg, options, cache),
                        pretrained)

    def loss(self, model, teacher, batch, cfg, epoch, generator, *, label_scale=1.0,
             hide=None, dropped=None):
        return finetune_loss(model, teacher, batch, cfg.finetune, epoch, generator,
                             label_scale, dropped=dropped)

    def validate(self, model, teacher, batches, cfg, device, family) -> dict[str, float]:
        evaluated = teacher if teacher is not None else distributed.unwrap(model)
        preds, labels = predict(evaluated, batches, device)
        return {f"valid_{k}": v for k, v in mmsa.compute_metrics(preds, labels, family).items()}


PRETRAIN = Pretraining()
FINETUNE = Finetuning()
STAGES: dict[str, Stage] = {s.name: s for s in (PRETRAIN, FINETUNE)}


def get(name: str | Stage) -> Stage:
    """The stage of a name given at the edge (command line, run metadata, a benchmark case)."""
    if isinstance(name, Stage):
        return name
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; choose from {sorted(STAGES)}") from None


# --------------------------------------------------------------------------- fine-tuning from a
# pre-trained checkpoint


def with_pretrained_model(
    cfg: ExperimentConfig, options: StorageOptions
) -> tuple[ExperimentConfig, str | None]:
    """Fine-tuning from a checkpoint uses the architecture that checkpoint was trained with."""
    uri = cfg.finetune.pretrained
    if not uri:
        return cfg, None
    uri = ckpt.resolve(uri, options)
    meta, _ = ckpt.load(uri, options)
    if meta.stage != PRETRAIN.name:
        log.warning("--pretrained %s is a %s checkpoint; using its weights anyway", uri, meta.stage)
    wanted = FINETUNE.protocol(cfg)
    seen = {k: meta.protocol.get(k) for k in wanted}
    if seen != wanted:
        raise ckpt.CheckpointError(
            f"--pretrained {uri} was trained on data under {seen}, but fine-tuning hides "
            f"{wanted}: modalities hidden now were visible in pre-training. Pre-train with "
            "the same --missing-rate, --protocol and --mask-seed."
        )
    if meta.normalize != cfg.data.normalize:
        raise ckpt.CheckpointError(
            f"--pretrained {uri} was trained with data.normalize={meta.normalize}, but "
            f"fine-tuning has data.normalize={cfg.data.normalize}: use the same setting"
        )
    data = cfg.to_dict()
    data["model"] = _model_of_checkpoint(cfg.model, meta.model, uri)
    return from_dict(data, f"model config of {uri}"), uri


#: Model settings that change how the same weights run, not which weights exist.
_RUNTIME_MODEL_KEYS = frozenset({"backend"})


def _model_of_checkpoint(requested: ModelConfig, trained: dict[str, Any], uri: str) -> dict:
    """The checkpoint's architecture; a setting asked for that contradicts it is an error.

    An ablation such as ``--propagation intra`` or ``--fusion early`` on top of a checkpoint
    pre-trained with another architecture cannot be honoured; dropping it silently would
    report the full model under the ablation's name.
    """
    asked = dataclasses.asdict(requested)
    default = dataclasses.asdict(ModelConfig())
    model = dataclasses.asdict(ModelConfig(**trained))
    conflicts = [
        f"model.{k}={v!r} (checkpoint: {model[k]!r})" for k, v in asked.items()
        if k not in _RUNTIME_MODEL_KEYS and v != default[k] and v != model[k]
    ]
    if conflicts:
        raise config_mod.ConfigError(
            f"--pretrained {uri} was trained with another model: {', '.join(conflicts)}. "
            "Pre-train with the same model settings, or fine-tune without --pretrained."
        )
    for k in _RUNTIME_MODEL_KEYS:
        model[k] = asked[k]
    return model
