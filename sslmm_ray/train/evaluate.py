"""Evaluation of a checkpoint on a split, under a chosen missing-modality protocol."""

from __future__ import annotations

from typing import Any

import torch

from sslmm_ray import metrics as mmsa
from sslmm_ray.data import pipeline, protocols, store
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import checkpoint as ckpt


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
    """MMSA metrics; protocol values left as None are the ones the checkpoint trained under."""
    from sslmm_ray.train.loop import predict

    model, meta = ckpt.load_model(checkpoint_uri, options)
    manifest = store.open_dataset(data_uri, options)
    _check_shapes(meta, manifest, checkpoint_uri, data_uri)
    trained: dict[str, Any] = meta.protocol
    spec = protocols.ProtocolSpec(
        missing_rate=trained.get("missing_rate", 0.0) if missing_rate is None else missing_rate,
        protocol=trained.get("protocol", "modality") if protocol is None else protocol,
        seed=trained.get("seed", 0) if seed is None else seed,
    )
    ds = pipeline.split_dataset(manifest, split, spec, options)
    preds, labels = predict(model, ds.iter_torch_batches(batch_size=256), torch.device("cpu"))
    return mmsa.compute_metrics(preds, labels, manifest.family)


def _check_shapes(meta: ckpt.CheckpointMeta, manifest: store.Manifest, c: str, d: str) -> None:
    if meta.dims != manifest.dims or meta.lengths != manifest.lengths:
        raise ckpt.CheckpointError(
            f"checkpoint {c} was trained on dims {meta.dims} / lengths {meta.lengths}, "
            f"but {d} has dims {manifest.dims} / lengths {manifest.lengths}"
        )
