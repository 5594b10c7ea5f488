"""Typed configuration for every stage.

One :class:`ExperimentConfig` holds a section per stage. It is loaded from YAML or JSON plus
dotted command-line overrides (``finetune.tau=0.9``), validated by pydantic (unknown keys and
out-of-range values are errors that name the key), and saved as ``config.json`` with each run.
Floats must be finite (an ``inf`` learning rate or a ``nan`` threshold is never meant) and seeds
lie in ``[0, 2**32)``, the range NumPy's generators accept.

``max_failures`` (Train restarts of a worker group, Tune restarts of a trial) defaults to 0 on a
laptop, where a failure is a bug to see at once. ``SSLMM_MAX_FAILURES`` changes that default
(a config file, ``--set`` or ``--max-failures`` still win): the cluster entry points (``jobs/``)
and the infra job definitions set it to 3, since their workers run on spot capacity.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from sslmm_ray.errors import UserError


class ConfigError(UserError):
    """A configuration value or key is wrong; the message names the key."""


_STRICT = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
OpenProb = Annotated[float, Field(ge=0.0, lt=1.0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
LearningRate = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]
MaxFailures = Annotated[int, Field(ge=-1)]  # -1: retry forever

#: Environment variable: the default ``max_failures`` of pretrain, finetune and tune.
MAX_FAILURES_ENV = "SSLMM_MAX_FAILURES"

Protocol = Literal["modality", "frame"]
MODALITIES: tuple[str, ...] = ("text", "audio", "vision")
#: Modality-level missingness keeps at least one of three modalities per sample, so at most 2/3
#: of the (sample, modality) pairs can be missing; frame-level missingness reaches any rate < 1.
MAX_MODALITY_RATE = 2.0 / 3.0


def check_reachable(rate: float, protocol: str, where: str) -> None:
    """Refuse a missing rate the protocol cannot apply (never cap it silently)."""
    if protocol == "modality" and rate > MAX_MODALITY_RATE + 1e-9:
        raise ConfigError(
            f"{where}: missing rate {rate:g} is not reachable with the modality-level protocol "
            f"(at least one modality is kept per sample, so at most {MAX_MODALITY_RATE:.4f} "
            "can be missing); use a rate <= 0.6667 or protocol 'frame'"
        )


@dataclass(config=_STRICT)
class DatasetConfig:
    """Where the canonical store lives and how it is streamed."""

    uri: str = ""
    s3_endpoint: str | None = None
    shuffle_buffer: Annotated[int, Field(ge=0)] = 256
    read_parallelism: Annotated[int, Field(ge=-1)] = -1
    # Validation labels kept, as a fraction of the validation split (seeded, stratified like
    # training labels). None: the fine-tuning label ratio, so that a 10%-labeled experiment
    # does not select its checkpoint on a fully labeled validation set it would not have.
    valid_label_ratio: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # Opt-in: decode a train or valid split once into Ray's object store when it is at most
    # this large (0, the default: stream from storage every epoch, in memory that does not
    # grow with the data set). A sweep builds one protocol-free cache that all of its trials
    # share. Worth it when the model step is cheaper than reading and decoding a batch.
    cache_mb: Annotated[int, Field(ge=0)] = 0
    # Batches each training worker fetches ahead of the one it trains on (Ray Data's
    # ``iter_torch_batches``): reading overlaps compute.
    prefetch_batches: Annotated[int, Field(ge=1)] = 2
    # Standardise each feature with the store's train-split mean/std (docs/DATA.md,
    # "Normalisation"): real feature scales differ by orders of magnitude, and on raw ones the
    # largest feature dominates the losses. Off only to reproduce raw-feature runs.
    normalize: bool = True
    # Check each shard's checksum (from the manifest) in the read task that decodes it, so a
    # corrupt shard stops training with one line naming it. Off by default: the checked read
    # path (whole shard, then parse) cost 23-52% of streaming throughput, over the 5% budget
    # (docs/DATA.md, "Integrity on every read"). Turn on for untrusted storage.
    verify_checksums: bool = False


@dataclass(config=_STRICT)
class MissingConfig:
    """What the data hides from the model: one setting for both stages, evaluate and predict.

    ``seed`` draws the masks and is not a training seed: changing a stage's seed (its
    initialisation, batch order and labeled rows) leaves the same modalities missing, so one
    pre-training run serves fine-tuning runs of any seed under the same missingness.
    """

    rate: Annotated[OpenProb, Field(description=(
        "Fraction of (sample, modality) pairs hidden (modality-level: at most 2/3)."))] = 0.5
    protocol: Annotated[Protocol, Field(description=(
        "What is hidden: whole modalities per sample, or frames."))] = "modality"
    seed: Annotated[Seed, Field(description=(
        "Seed of the missing-modality masks (not the training seed)."))] = 0

    @model_validator(mode="after")
    def _reachable(self) -> MissingConfig:
        check_reachable(self.rate, self.protocol, "missing.rate")
        return self


@dataclass(config=_STRICT)
class ModelConfig:
    """The graph network (DESIGN.md, Model)."""

    hidden: PosInt = 64
    segments: PosInt = 8
    iterations: PosInt = 2
    heads: PosInt = 4
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    edges: Literal["full", "windowed"] = "full"
    window: PosInt = 1
    backend: Literal["auto", "sparse", "dense"] = "auto"
    propagation: Annotated[Literal["alternating", "intra", "inter"], Field(description=(
        "Message passing: alternating intra/inter-modal, or one kind only (an ablation)."))] = (
        "alternating")
    # Per-modality readout: attention pooling plus a linear map of the K ordered segment
    # states ("segments"), or attention pooling alone ("attention"; order-blind).
    readout: Literal["segments", "attention"] = "segments"
    fusion: Annotated[Literal["graph", "early"], Field(description=(
        "graph: the segment graph; early: an MLP on concatenated modalities (a baseline)."))] = (
        "graph")


@dataclass(config=_STRICT)
class TrainingConfig:
    """What both training stages share: optimisation, scale, checkpoints."""

    epochs: Annotated[PosInt, Field(description="Training epochs.")] = 10
    batch_size: PosInt = 32
    lr: LearningRate = 1e-3
    weight_decay: NonNegFloat = 1e-4
    grad_clip: NonNegFloat = 1.0
    workers: Annotated[PosInt, Field(description="Ray Train workers (DDP).")] = 1
    cpus_per_worker: Annotated[float, Field(gt=0.0)] = 1.0
    gpus: Annotated[bool, Field(description="One GPU per worker (nccl).")] = False
    # bf16: the forward and the loss run under torch.autocast (bfloat16; on CPU too), the
    # backward, optimizer, EMA teacher and validation in float32. No loss scaling is needed
    # (bfloat16 has float32's exponent range). For GPUs with bf16 tensor cores.
    precision: Annotated[Literal["fp32", "bf16"], Field(description=(
        "Forward and loss arithmetic: fp32, or bf16 autocast (GPUs with bf16; runs on CPU "
        "too)."))] = "fp32"
    max_failures: Annotated[MaxFailures, Field(description=(
        "Restarts of a failed worker group from its latest checkpoint (SSLMM_MAX_FAILURES "
        "changes the default; the cluster jobs set 3)."))] = 0
    patience: Annotated[int, Field(ge=0)] = 0
    seed: Annotated[Seed, Field(description=(
        "Training seed: initialisation, batch order and the labeled rows."))] = 0


@dataclass(config=_STRICT)
class PretrainConfig(TrainingConfig):
    """Self-supervised stage: masked reconstruction plus a cross-modal contrastive term."""

    # 10 -> 20 epochs: +3.1 points Non0_acc_2 on the digits benchmark's harder cell (label ratio
    # 0.1, missing 0.5, no pseudo-labels, seed 0: 0.736 -> 0.767); it reads no label, and one
    # run serves every label ratio of a missing rate.
    epochs: PosInt = 20
    mask_modality_prob: Prob = 0.3
    mask_segment_prob: Prob = 0.25
    recon_weight: NonNegFloat = 1.0
    contrastive_weight: NonNegFloat = 0.5
    temperature: Annotated[float, Field(gt=0.0)] = 0.1


@dataclass(config=_STRICT)
class FinetuneConfig(TrainingConfig):
    """Semi-supervised stage: supervised + pseudo-label + reconstruction losses."""

    # 10 epochs underfit real features (REAL-DATA-FINDINGS: 40 epochs took a held-out real
    # set from 69.6 to 80.8); on digits (label ratio 0.5, missing 0.5, seed 0) 30 epochs gave
    # 0.839 where 10 gave 0.794.
    epochs: PosInt = 30
    label_ratio: Annotated[float, Field(gt=0.0, le=1.0, description=(
        "Fraction of training rows whose label is kept (stratified by sign)."))] = 0.5
    # FixMatch's threshold. On digits (label ratio 0.1, missing 0.5, seed 0) the pseudo-labels
    # kept at 0.8 were 18% wrong in sign (0.82 accurate on 24% of the unlabeled rows) and cost
    # 2-4 points; 0.95 keeps only views that agree far from neutral.
    tau: Annotated[Prob, Field(description="Pseudo-label confidence threshold.")] = 0.95
    lambda_rec: Annotated[NonNegFloat, Field(description="Reconstruction loss weight.")] = 0.1
    unlabeled_weight: NonNegFloat = 1.0
    rampup_epochs: Annotated[int, Field(ge=0)] = 3
    ema_decay: Prob = 0.99
    views: Annotated[int, Field(ge=2)] = 4
    view_mask_prob: Prob = 0.3  # teacher views: modality hidden with this prob (>= 1 kept)
    view_segment_prob: Prob = 0.15  # teacher views: segment hidden with this prob
    # conf = |mu| / (|mu| + std + kappa * half the label range): scale-free across data sets
    confidence_kappa: Annotated[float, Field(gt=0.0)] = 0.03
    loss: Literal["l1", "mse"] = "l1"  # supervised and pseudo-label regression loss
    # Which input the student answers the pseudo-label from: the batch as the data has it, or
    # the purposely degraded view (modalities dropped with drop_prob), FixMatch-style: the
    # teacher labels what it sees, the student must reach it from fewer modalities.
    # Measured on digits (label ratio 0.1, missing 0.5, 20 + 30 epochs, tau 0.8, seed 0): 0.725
    # answering from the data, 0.753 from the dropped view.
    pseudo_view: Literal["data", "dropped"] = "dropped"
    drop_prob: Prob = 0.3
    pseudo_labels: Annotated[bool, Field(description=(
        "Pseudo-label loss on unlabeled rows (off: an ablation)."))] = True
    # Label propagation over the training split's kNN graph (sslmm_ray.data.graph_labels),
    # once before training: the pseudo-label of an unlabeled row where the teacher is not
    # confident. Measured on digits (label ratio 0.1, missing 0.5, supervised + graph labels vs
    # supervised only, in-process, seeds 0/1): 0.811 / 0.825 vs 0.742 / 0.794 Non0_acc_2.
    graph_labels: Annotated[bool, Field(description=(
        "Graph pseudo-labels (label propagation over the inputs' kNN graph) where the teacher "
        "is not confident (off: an ablation; needs pseudo_labels)."))] = True
    graph_neighbors: Annotated[int, Field(ge=1)] = 10
    graph_alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    reconstruction: Annotated[bool, Field(description=(
        "Reconstruction of dropped modalities (off: an ablation)."))] = True
    pretrained: Annotated[str | None, Field(description=(
        "Pre-training checkpoint or run directory to start from."))] = None
    # Validation metric that picks the checkpoint (and scores Optuna trials): MAE uses every
    # labeled validation row's error, where a binary accuracy on a small split moves in steps
    # of one sample. "headline" is Non0_acc_2 (MOSI, MOSEI) or Mult_acc_2 (SIMS).
    selection: Literal["MAE", "Corr", "headline"] = "MAE"


@dataclass(config=_STRICT)
class SweepConfig:
    """The (label ratio x missing rate) grid and the search inside each cell."""

    label_ratios: Annotated[list[Annotated[float, Field(gt=0.0, le=1.0)]], Field(
        description="Label ratios of the grid.")] = dataclasses.field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7]
    )
    # Reachable under both protocols (modality-level tops out at 2/3).
    missing_rates: Annotated[list[OpenProb], Field(description=(
        "Missing rates of the grid (modality-level: <= 2/3).")),
    ] = dataclasses.field(default_factory=lambda: [0.0, 0.3, 0.5, 0.6])
    samples: Annotated[PosInt, Field(description="Trials per cell.")] = 8
    concurrency: Annotated[PosInt, Field(description="Trials of one cell running at once.")] = 1
    max_concurrent_trials: Annotated[PosInt | None, Field(description=(
        "Trials running at once over all cells: cells run side by side, "
        "max(1, this // concurrency) at a time. Default: what the cluster holds beside Ray "
        "Data's headroom; every cell at once when SSLMM_AUTOSCALING=1."))] = None
    workers_per_trial: Annotated[PosInt, Field(description=(
        "Ray Train workers of each trial."))] = 1
    asha: Annotated[bool, Field(description="ASHA early stopping over epochs.")] = False
    seed: Annotated[Seed, Field(description="Searcher (TPE) seed.")] = 0
    # The searched cell's best hyper-parameters, retrained under finetune.seed + 1, + 2, ...:
    # the report then gives mean and spread over seeds (the best trial counts as the first).
    seeds: Annotated[PosInt, Field(description=(
        "Training seeds of each cell's best hyper-parameters (the report gives mean +- std)."
    ))] = 1
    # Tune restarts of a failed trial (its Train run resumes from its latest checkpoint); a
    # cell with a trial still errored after them is not recorded as done.
    max_failures: Annotated[MaxFailures, Field(description=(
        "Restarts of a failed trial (SSLMM_MAX_FAILURES changes the default)."))] = 0
    optuna_storage: Annotated[str | None, Field(description=(
        "Where each cell's Optuna study is kept, for optuna-dashboard and optuna.load_study: "
        "an RDB URL (sqlite:///path.db, postgresql://...) or a journal file path. Default: "
        "optuna.journal in a local sweep's folder; none (in memory) for an s3:// sweep."))] = None


@dataclass(config=_STRICT)
class ExperimentConfig:
    data: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    # Pre-training sees the data as the fine-tuning it serves will (the same missingness): it
    # must not learn from modalities that fine-tuning and evaluation hide.
    missing: MissingConfig = dataclasses.field(default_factory=MissingConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    tune: SweepConfig = dataclasses.field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _grid_reachable(self) -> ExperimentConfig:
        for rate in self.tune.missing_rates:
            check_reachable(rate, self.missing.protocol, "tune.missing_rates")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_ADAPTER = TypeAdapter(ExperimentConfig)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "unexpected_keyword_argument" or e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return f"invalid configuration ({source}): " + "; ".join(lines)


def describe(dotted: str) -> str:
    """A config field's description and default, for the command line's help: each setting is
    documented once, on its field (inherited fields are looked up on the base section)."""
    section, key = dotted.split(".")
    cls = ExperimentConfig.__pydantic_fields__[section].annotation
    info = next(c.__pydantic_fields__[key] for c in cls.__mro__
                if key in getattr(c, "__pydantic_fields__", {})
                and c.__pydantic_fields__[key].description)
    default = cls.__pydantic_fields__[key].get_default(call_default_factory=True)
    return f"{info.description} (config {dotted}, default {default})"


#: Keys of earlier versions that moved into the ``missing`` section.
_MOVED = {"missing_rate": "missing.rate", "protocol": "missing.protocol"}


def from_dict(data: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    moved = [f"'{section}.{old}' is now '{new}'" for section in ("pretrain", "finetune")
             for old, new in _MOVED.items() if old in (data.get(section) or {})]
    if moved:
        raise ConfigError(f"invalid configuration ({source}): " + "; ".join(moved)
                          + " (one missingness setting for both stages)")
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _parse_value(raw: str) -> Any:
    """Override values are YAML scalars or lists: ``0.5``, ``true``, ``[0.1, 0.3]``."""
    return yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict (validation happens after)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node[leaf] = _parse_value(raw)
    return data


def _env_defaults() -> dict[str, Any]:
    """Defaults that the deployment sets through the environment (``SSLMM_MAX_FAILURES``)."""
    raw = os.environ.get(MAX_FAILURES_ENV, "").strip()
    if not raw:
        return {}
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{MAX_FAILURES_ENV} must be an integer, got {raw!r}") from None
    return {section: {"max_failures": value} for section in ("pretrain", "finetune", "tune")}


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Defaults (``SSLMM_MAX_FAILURES`` included), then the file (YAML or JSON), then the
    overrides; validated once at the end."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())  # JSON is YAML
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML/JSON: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        data = loaded
        source = str(p)
    data = _merge(_env_defaults(), data)
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return from_dict(data, source)


def replace(cfg: ExperimentConfig, **sections: Mapping[str, Any]) -> ExperimentConfig:
    """A copy with some section fields changed, validated like any other input."""
    data = cfg.to_dict()
    for name, values in sections.items():
        data[name].update({k: v for k, v in values.items() if v is not None})
    return from_dict(data, "command line")


#: Settings that may differ when a run resumes: where and how it runs, not what it learns.
#: ``epochs`` may grow (extend a finished run) but not shrink below the run's checkpoints;
#: ``workers`` may change because ``batch_size`` is global (split across workers) and the loss
#: terms are normalised over the global batch, so a resumed run on fewer or more (spot) nodes
#: optimises the same objective; ``gpus`` and ``precision`` change where and in which
#: arithmetic the same objective is computed.
RESUMABLE = {
    "data": frozenset({"s3_endpoint", "read_parallelism", "cache_mb", "prefetch_batches"}),
    "model": frozenset({"backend"}),
    "missing": frozenset(),
    "stage": frozenset({"epochs", "workers", "cpus_per_worker", "gpus", "precision",
                        "max_failures"}),
}


def resume_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], stage: str
) -> list[str]:
    """``section.key: saved -> current`` for each setting of ``stage`` a resume may not change.

    Only the sections the stage reads are compared (a fine-tuning run ignores ``pretrain``
    and ``tune``). A key the saved config lacks was added by a later version: not compared.
    """
    diffs = []
    for section in ("data", "missing", "model", stage):
        allowed = RESUMABLE["stage" if section == stage else section]
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key, value in new.items():
            if key not in old or old[key] == value:
                continue
            if key == "epochs" and value >= old[key]:
                continue  # extending; shrinking would end before the saved checkpoints
            if key in allowed and key != "epochs":
                continue
            diffs.append(f"{section}.{key}: {old[key]!r} -> {value!r}")
    return diffs
