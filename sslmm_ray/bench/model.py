"""``sslmm bench model``: forward+backward throughput and memory of each propagation backend.

Runs the default :class:`~sslmm_ray.config.ModelConfig` on MOSI feature sizes, aligned (50
frames everywhere) and unaligned (text 50, audio 375, vision 500), with random batches in the
model batch format (docs/CONTRACTS.md). Memory is the peak of bytes held by tensors saved for
backward during the forward pass (deduplicated by storage), which is what grows with the
backend's intermediate tensors and is measurable the same way on CPU and GPU; on CUDA the
allocator's peak is reported as well.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..model import build_model

MOSI_DIMS = {"text": 768, "audio": 5, "vision": 20}
LAYOUTS = {
    "aligned": {"text": 50, "audio": 50, "vision": 50},
    "unaligned": {"text": 50, "audio": 375, "vision": 500},
}


def random_batch(
    dims: Mapping[str, int],
    lengths: Mapping[str, int],
    batch_size: int,
    generator: torch.Generator,
    missing_rate: float = 0.0,
    label_ratio: float = 0.5,
) -> dict[str, torch.Tensor]:
    """A random model batch: valid lengths in [1, T], zero padding, modality-level missingness
    (>= 1 modality kept per row), labels on a ``label_ratio`` subset."""
    b, mods = batch_size, list(dims)
    missing = torch.rand(b, len(mods), generator=generator) < missing_rate
    keep_one = torch.randint(len(mods), (b,), generator=generator)
    missing[torch.arange(b), keep_one] = False
    batch: dict[str, torch.Tensor] = {}
    for i, m in enumerate(mods):
        t = lengths[m]
        length = torch.randint(1, t + 1, (b,), generator=generator)
        mask = (torch.arange(t)[None, :] < length[:, None]) & ~missing[:, i : i + 1]
        x = torch.randn(b, t, dims[m], generator=generator)
        batch[m] = x * mask.unsqueeze(-1)
        batch[f"{m}_mask"] = mask
    labeled = torch.rand(b, generator=generator) < label_ratio
    batch["label"] = torch.randn(b, generator=generator).clamp(-3, 3) * labeled
    batch["labeled"] = labeled
    batch["index"] = torch.arange(b)
    return batch


class _SavedBytes:
    """Peak bytes of distinct storages saved for backward (autograd saved-tensor hooks)."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self) -> _SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _measure(
    backend: str, lengths: Mapping[str, int], batch_size: int, steps: int, seed: int,
    device: torch.device,
) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backend=backend), MOSI_DIMS, lengths).to(device).train()
    g = torch.Generator().manual_seed(seed)
    batches = [
        {k: v.to(device) for k, v in
         random_batch(MOSI_DIMS, lengths, batch_size, g, missing_rate=0.3).items()}
        for _ in range(2)
    ]

    def step(batch: dict[str, torch.Tensor]) -> None:
        out = model(batch)
        loss = out.pred.square().mean() + sum(r.square().mean() for r in out.recon.values())
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up: allocator, kernel selection
    with _SavedBytes() as saved:
        step(batches[1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    result = {
        "samples_per_s": round(steps * batch_size / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / steps, 2),
        "saved_activation_mb": round(saved.bytes / 2**20, 2),
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 2)
    return result


def run(*, batch_size: int = 32, steps: int = 5, seed: int = 0, device: str = "cpu") -> dict:
    """Benchmark sparse and dense backends on MOSI dims; returns a JSON-able dict.

    ``ratio`` is dense samples/s over sparse samples/s (> 1: dense faster); ``auto`` is the
    backend :func:`~sslmm_ray.model.resolve_backend` picks for that shape.
    """
    dev = torch.device(device)
    results: dict = {
        "dataset": "mosi", "batch_size": batch_size, "steps": steps, "seed": seed,
        "device": str(dev), "threads": torch.get_num_threads(), "hidden": ModelConfig().hidden,
        "segments": ModelConfig().segments, "layouts": {},
    }
    for name, lengths in LAYOUTS.items():
        row = {b: _measure(b, lengths, batch_size, steps, seed, dev) for b in ("sparse", "dense")}
        row["ratio_dense_over_sparse"] = round(
            row["dense"]["samples_per_s"] / row["sparse"]["samples_per_s"], 2
        )
        row["auto"] = build_model(ModelConfig(), MOSI_DIMS, lengths).backend
        results["layouts"][name] = row
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
