"""Evaluation of a checkpoint: MMSA metrics on a split, and robustness to missing data."""

from __future__ import annotations

from typing import Any

import torch

from sslmm_ray import metrics as mmsa
from sslmm_ray import storage
from sslmm_ray.config import MAX_MODALITY_RATE
from sslmm_ray.data import pipeline, protocols, store
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import checkpoint as ckpt

#: Test missing rates of the robustness curve.
CURVE_RATES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))


def _spec(meta: ckpt.CheckpointMeta, missing_rate, protocol, seed) -> protocols.ProtocolSpec:
    """Protocol values left as None are the ones the checkpoint trained under."""
    trained: dict[str, Any] = meta.protocol
    return protocols.ProtocolSpec(
        missing_rate=trained.get("missing_rate", 0.0) if missing_rate is None else missing_rate,
        protocol=trained.get("protocol", "modality") if protocol is None else protocol,
        seed=trained.get("seed", 0) if seed is None else seed,
    )


def _metrics(model, manifest, split, spec, options, normalize: bool) -> dict[str, float]:
    from sslmm_ray.train.stages import predict

    ds = pipeline.split_dataset(manifest, split, spec, options, normalize=normalize)
    with pipeline.task_data_errors():
        preds, labels = predict(model, ds.iter_torch_batches(batch_size=256), torch.device("cpu"))
    return mmsa.compute_metrics(preds, labels, manifest.family)


def _open(checkpoint_uri: str, data_uri: str, options):
    model, meta = ckpt.load_model(checkpoint_uri, options)
    manifest = store.open_dataset(data_uri, options)
    ckpt.check_compatible(meta, manifest.dims, manifest.lengths, checkpoint_uri, data_uri)
    return model, meta, manifest


def evaluate_checkpoint(
    checkpoint_uri: str,
    data_uri: str,
    options: StorageOptions | None = None,
    *,
    split: str = "test",
    missing_rate: float | None = None,
    protocol: str | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """MMSA metrics of a checkpoint (or a run's best) on one split."""
    model, meta, manifest = _open(checkpoint_uri, data_uri, options)
    spec = _spec(meta, missing_rate, protocol, seed)
    return _metrics(model, manifest, split, spec, options, meta.normalize)


def robustness_curve(
    checkpoint_uri: str,
    data_uri: str,
    out_uri: str,
    options: StorageOptions | None = None,
    *,
    split: str = "test",
    protocol: str | None = None,
    seed: int | None = None,
    rates: tuple[float, ...] = CURVE_RATES,
) -> dict[str, Any]:
    """Metrics at each test missing rate; writes ``curve.json`` and ``curve.png`` to ``out_uri``."""
    model, meta, manifest = _open(checkpoint_uri, data_uri, options)
    proto = _spec(meta, 0.0, protocol, seed).protocol
    if proto == "modality":  # at most 2/3 of the modalities can be missing at this level
        rates = tuple(r for r in rates if r <= MAX_MODALITY_RATE)
    points = []
    for rate in rates:
        spec = _spec(meta, rate, protocol, seed)
        got = _metrics(model, manifest, split, spec, options, meta.normalize)
        points.append({"missing_rate": rate, **got})
    result = {
        "checkpoint": checkpoint_uri,
        "data": data_uri,
        "split": split,
        "protocol": proto,
        "headline": mmsa.headline_metric(manifest.family),
        "points": points,
    }
    storage.write_json(storage.join(out_uri, "curve.json"), result, options)
    storage.write_bytes(storage.join(out_uri, "curve.png"), _plot(result), options)
    return result


def _plot(result: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [p["missing_rate"] for p in result["points"]]
    headline = result["headline"]
    fig, left = plt.subplots(figsize=(6, 4), dpi=120)
    left.plot(rates, [p[headline] for p in result["points"]], "o-", color="tab:blue")
    left.set_xlabel(f"test missing rate ({result['protocol']}-level)")
    left.set_ylabel(headline, color="tab:blue")
    right = left.twinx()
    right.plot(rates, [p["MAE"] for p in result["points"]], "s--", color="tab:red")
    right.set_ylabel("MAE", color="tab:red")
    left.set_title("Robustness to missing modalities")
    left.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
