"""Data parallelism for objectives whose set of used parameters changes from step to step.

DDP's reducer expects each parameter to produce one gradient per step, or to be found unused by
walking the graph from the forward *outputs*. SSLMM's objectives break both assumptions: a
forward returns predictions, reconstructions and projections, and the loss reads a different
subset of them each step (a modality dropped on purpose or not, a switched-off term, the
pre-training loss that never reads the head). So the model is moved to the worker's device by
Ray Train without a DDP wrapper, rank 0's initial weights are broadcast, and after each backward
the gradients are averaged in one flat all-reduce (gloo on CPU, nccl on GPU): the same
synchronous data-parallel update as DDP, without the reducer's bookkeeping.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Move to the worker's device and start every rank from rank 0's weights."""
    import ray.train.torch

    model = ray.train.torch.prepare_model(model, parallel_strategy=None)
    if _active():
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
    return model


def average_gradients(model: torch.nn.Module) -> None:
    """Average gradients across ranks; a parameter unused on a rank contributes zeros."""
    if not _active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        p.grad = g
