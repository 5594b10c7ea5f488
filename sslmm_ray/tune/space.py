"""The search space of one grid cell, and how a trial's sampled values become its config.

A cell is one (label ratio, missing rate) pair. Optuna cannot search a grid, so each cell gets
its own Tuner: the cell values are constants in ``param_space`` and the searched values are the
pseudo-label threshold, the reconstruction weight, the learning rate and the unlabeled weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from sslmm_ray.config import ExperimentConfig, from_dict

#: Searched hyper-parameters -> the FinetuneConfig field each one sets.
SEARCHED = ("tau", "lambda_rec", "lr", "unlabeled_weight")
#: Cell constants -> FinetuneConfig fields.
CONSTANTS = ("label_ratio", "missing_rate")


@dataclass(frozen=True, order=True)
class Cell:
    label_ratio: float
    missing_rate: float

    @property
    def name(self) -> str:
        """The Tuner's experiment name: ``cell_label0.5_missing0.3`` (label ratio, missing rate)."""
        return f"cell_label{self.label_ratio:g}_missing{self.missing_rate:g}"


def grid(label_ratios: list[float], missing_rates: list[float]) -> list[Cell]:
    """Every (label ratio, missing rate) pair, deduplicated, in a stable order."""
    return sorted({Cell(float(r), float(m)) for r in label_ratios for m in missing_rates})


def param_space(cell: Cell) -> dict[str, Any]:
    """Tune's ``param_space``: the cell as constants plus the searched domains."""
    return {
        "label_ratio": cell.label_ratio,
        "missing_rate": cell.missing_rate,
        "tau": tune.uniform(0.5, 0.99),
        "lambda_rec": tune.loguniform(1e-3, 10.0),
        "lr": tune.loguniform(1e-4, 3e-3),
        "unlabeled_weight": tune.uniform(0.1, 2.0),
    }


class RestorableOptunaSearch(OptunaSearch):
    """OptunaSearch that accepts trials it never suggested in this process.

    Tune saves the searcher periodically; a trial suggested after the last save and still
    running when the driver died comes back with ``Tuner.restore`` but is unknown to the
    restored study (a KeyError inside Ray 2.60's OptunaSearch). Its intermediate results
    are skipped and its final result joins the study as an evaluated point.

    It also keeps the cell's ``param_space``: a search restored from a state saved before Tune
    handed it the space comes back with none ("no search space has been defined"; seen when a
    sweep was killed while two cells searched side by side), and sets it again.
    """

    def __init__(self, *args: Any, param_space: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._param_space = param_space

    def suggest(self, trial_id: str):
        if not self._space and getattr(self, "_param_space", None):
            self.set_search_properties(self._metric, self._mode, self._param_space)
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if trial_id in self._ot_trials or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        value = (result or {}).get(self.metric)
        config = (result or {}).get("config") or {}
        space = self._space if isinstance(self._space, dict) else {}
        params = {k: config[k] for k in space if k in config}
        if value is not None and space and len(params) == len(space):
            self.add_evaluated_point(params, value, error=error)


RDB_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")


def optuna_storage(url: str):
    """An Optuna storage from a URL: an RDB (SQLAlchemy URL) or a journal file path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url.startswith(RDB_SCHEMES):
        return optuna.storages.RDBStorage(url)
    path = url.removeprefix("file://")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path))


def make_searcher(
    metric: str, mode: str, seed: int, *, storage: str | None = None,
    study_name: str | None = None, param_space: dict[str, Any] | None = None,
):
    """Seeded TPE: the same seed suggests the same first configurations. With ``storage``
    the study is kept there under ``study_name`` (durable, visible to Optuna's own tools)."""
    import optuna

    # The sampler carries the seed (OptunaSearch ignores ``seed=0`` as falsy).
    sampler = optuna.samplers.TPESampler(seed=seed)
    kept = {"storage": optuna_storage(storage), "study_name": study_name} if storage else {}
    return RestorableOptunaSearch(metric=metric, mode=mode, sampler=sampler,
                                  param_space=param_space, **kept)


def trial_config(
    base: ExperimentConfig | dict[str, Any], values: dict[str, Any]
) -> ExperimentConfig:
    """The trial's full config: the sweep's base config with the cell and sampled values set."""
    data = base.to_dict() if isinstance(base, ExperimentConfig) else dict(base)
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    ft, missing = data["finetune"], data["missing"]
    for key in ("label_ratio", *SEARCHED):
        if key in values:
            ft[key] = values[key]
    if "missing_rate" in values:
        missing["rate"] = values["missing_rate"]
    ft["pretrained"] = cell_pretrained(ft.get("pretrained"), ft["label_ratio"], missing["rate"])
    return from_dict(data, "tune trial")


def cell_pretrained(uri: str | None, label_ratio: float, missing_rate: float) -> str | None:
    """``--pretrained`` may name one checkpoint per missing rate with ``{missing_rate}`` (and
    ``{label_ratio}``) placeholders: pre-training must see the data as the cell hides it."""
    if not uri or "{" not in uri:
        return uri
    return uri.format(missing_rate=f"{missing_rate:g}", label_ratio=f"{label_ratio:g}")
