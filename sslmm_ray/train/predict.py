"""Batch inference with Ray Data: any dataset, any pattern of missing modalities -> Parquet.

The model is loaded once per actor (a callable class in ``map_batches``), rows are decoded and
passed through the same protocol code as training, and the output keeps the sample id, the
prediction and which modalities were present. The output folder is written by Ray Data, then a
``_SUCCESS.json`` summary is published last, so a reader can tell a finished prediction set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
import torch

from sslmm_ray import storage
from sslmm_ray.config import MODALITIES
from sslmm_ray.data import protocols, store
from sslmm_ray.data.normalize import Normalizer, normalizer_for
from sslmm_ray.errors import UserError
from sslmm_ray.storage import StorageOptions
from sslmm_ray.train import checkpoint as ckpt

SUCCESS = "_SUCCESS.json"


class Predictor:
    """One model per Ray Data actor; ``__call__`` maps Parquet rows to predictions."""

    def __init__(
        self,
        checkpoint_uri: str,
        options: StorageOptions | None,
        modalities: dict[str, store.ModalitySpec],
        spec: protocols.ProtocolSpec,
        norm: Normalizer | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.model, _ = ckpt.load_model(checkpoint_uri, options)
        self.modalities = modalities
        self.spec = spec
        self.norm = norm  # as the checkpoint was trained (meta.normalize)

    @torch.no_grad()
    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        arrays = store.decode_table(table, self.modalities, self.norm)
        batch = protocols.apply(arrays, self.spec)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        pred = self.model(tensors, outputs=("pred",)).pred.float().numpy()
        out: dict[str, Any] = {
            "id": arrays["id"].astype(str),
            "split": np.asarray(table.column("split").to_pylist(), dtype=str),
            "label": arrays["label"],
            "prediction": pred,
        }
        for m in MODALITIES:
            out[f"{m}_present"] = batch[f"{m}_mask"].any(axis=1)
        return out


def predict(
    checkpoint_uri: str,
    data_uri: str,
    out_uri: str,
    options: StorageOptions | None = None,
    *,
    splits: tuple[str, ...] = ("train", "valid", "test"),
    missing_rate: float = 0.0,
    protocol: str = "modality",
    seed: int = 0,
    concurrency: int = 1,
) -> dict[str, Any]:
    checkpoint_uri = ckpt.resolve(checkpoint_uri, options)
    manifest = store.open_dataset(data_uri, options)
    meta, _ = ckpt.load(checkpoint_uri, options)
    ckpt.check_compatible(meta, manifest.dims, manifest.lengths, checkpoint_uri, data_uri)
    unknown = [s for s in splits if s not in manifest.counts]
    if unknown:
        raise UserError(f"{data_uri} has no split(s) {unknown}; it has {list(manifest.counts)}")
    if storage.exists(storage.join(out_uri, SUCCESS), options):
        raise UserError(f"{out_uri} already holds predictions; choose a new --out")
    spec = protocols.ProtocolSpec(missing_rate=missing_rate, protocol=protocol, seed=seed)
    fs, _ = storage.resolve(data_uri, options)
    paths = [storage.resolve(u, options)[1] for s in splits for u in manifest.shard_uris(s)]
    ds = ray.data.read_parquet(paths, filesystem=fs).map_batches(
        Predictor,
        fn_constructor_kwargs={
            "checkpoint_uri": checkpoint_uri,
            "options": options,
            "modalities": manifest.modalities,
            "spec": spec,
            "norm": normalizer_for(manifest, meta.normalize),
        },
        batch_format="pyarrow",
        batch_size=128,
        concurrency=concurrency,
    )
    out_fs, out_path = storage.resolve(out_uri, options)
    ds.write_parquet(out_path, filesystem=out_fs)
    summary = {
        "checkpoint": checkpoint_uri,
        "data": data_uri,
        "splits": list(splits),
        "rows": sum(manifest.counts[s] for s in splits),
        "protocol": {"missing_rate": missing_rate, "protocol": protocol, "seed": seed},
        "files": [
            u for u in storage.list_files(out_uri, options, suffix=".parquet")
        ],
    }
    storage.write_json(storage.join(out_uri, SUCCESS), summary, options)
    return summary
