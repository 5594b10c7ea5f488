"""Data parallelism: DistributedDataParallel over the Ray Train worker group.

Each step runs one forward of the wrapped student that computes the whole stage loss (the
objectives batch their views together), so DDP's reducer sees every parameter use of the step
in one forward and overlaps its bucketed all-reduce (gloo on CPU, nccl on GPU; Ray Train's
``prepare_model`` picks the worker's device) with the backward pass.

Parameters an objective does not read in a step (the contrastive projector while fine-tuning,
the fusion and regression head while pre-training, the decoders on a step where nothing was
dropped on purpose, on one rank or on all) are handled by ``find_unused_parameters=True``,
with the objectives asking the network only for the outputs their loss reads
(``SSLMMOutput``, ``outputs=``): DDP walks the autograd graph from those outputs after each
forward, marks what it did not reach as ready, and

- a parameter used on some ranks but not others gets the ranks' average with zeros from the
  others: the global-batch gradient;
- a parameter used on no rank keeps ``grad is None``, exactly as on one worker, so AdamW
  neither decays it nor moves it by its old momentum: 1 and N workers optimise the same way.

The alternative, zero-weight terms (every output computed and ``0 * sum(...)`` added to the
loss, no graph walk: ``mode="ddp_zero_weight"``), was measured against it (``sslmm bench
train``, docs/MODEL.md: 2 CPU workers, 0.99x the steps/s and 1.00x the CPU per step, i.e. the
graph walk costs nothing measurable at this model size), and it gives such parameters zero
gradients instead of None on every worker count, so AdamW's weight decay and momentum keep
moving parts the objective switched off (the decoders with reconstruction off), and it
computes heads nobody reads: find_unused_parameters wins on semantics at no measured cost.
The former explicit flat all-reduce after backward (``mode="allreduce"``,
:func:`average_gradients`) is kept only as the benchmark's reference.

The objectives' global normalisation needs two collectives, here too: :func:`global_sum`
(counts summed over the ranks) and :func:`gather_rows` (rows of every rank, with gradients).
With one worker both are the identity and no process group is needed.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

#: ``ddp``: DistributedDataParallel with ``find_unused_parameters`` (training);
#: ``ddp_zero_weight`` and ``allreduce``: the alternatives ``sslmm bench train`` measures.
Mode = Literal["ddp", "ddp_zero_weight", "allreduce"]
MODES: tuple[str, ...] = ("ddp", "ddp_zero_weight", "allreduce")


_local = threading.local()


def _active() -> bool:
    if getattr(_local, "off", False):
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside, the objectives' collectives act as on one worker: for work that one rank does
    alone (rank 0's validation loss) and that must not wait for the others."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def prepare(model: nn.Module, mode: Mode = "ddp") -> nn.Module:
    """Move to the worker's device; with several workers, wrap it for data parallelism.

    DDP broadcasts rank 0's parameters and buffers when it wraps the model, so every rank
    starts from the same weights. With one worker the model is returned unwrapped.
    """
    import ray.train.torch

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose among {MODES}")
    if mode == "allreduce":
        model = ray.train.torch.prepare_model(model, parallel_strategy=None)
        if _active():
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(tensor.data, src=0)
        return model
    # The only buffers are the edge templates, the same constants on every rank (no batch
    # statistics): no broadcast before each forward. torch 2.13 renamed the flag and deprecates
    # the old name; older releases (pyproject allows >= 2.4) only know broadcast_buffers.
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
    model = ray.train.torch.prepare_model(
        model, parallel_strategy="ddp",
        parallel_strategy_kwargs={"find_unused_parameters": mode == "ddp", sync: False},
    )
    if mode == "ddp_zero_weight":
        _ZeroWeight.attach(unwrap(model))
    return model


def zero_weight_terms(model: nn.Module) -> Tensor | float:
    """``0 * sum`` of every output of the forwards since the last call (``ddp_zero_weight``);
    0.0 in the other modes. Add it to the loss before backward."""
    hook = getattr(unwrap(model), "_sslmm_zero_weight", None)
    return hook.terms() if hook is not None else 0.0


def average_gradients(model: nn.Module) -> None:
    """``allreduce`` mode (the former code path): average the gradients in one flat all-reduce
    after backward; a parameter unused on a rank contributes zeros (and gets zeros where it
    was unused on every rank, where DDP and one worker leave None). No-op in the DDP modes."""
    if not _active() or isinstance(model, nn.parallel.DistributedDataParallel):
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        p.grad = g


class _ZeroWeight:
    """Forward hooks for ``ddp_zero_weight``: every forward computes all outputs, and they are
    kept until :meth:`terms` folds them into the loss with weight 0."""

    def __init__(self, module: nn.Module):
        self.module, self.outputs = module, []

    @classmethod
    def attach(cls, module: nn.Module) -> None:
        from sslmm_ray.model.network import OUTPUTS

        hook = cls(module)
        module._sslmm_zero_weight = hook

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            # A deep copy (the EMA teacher) shares these hooks: leave it alone.
            return (args, {**kwargs, "outputs": OUTPUTS}) if mod is hook.module else None

        def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if mod is hook.module and torch.is_grad_enabled():
                hook.outputs.append(output)

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)

    def terms(self) -> Tensor | float:
        tensors = [t for out in self.outputs for t in _tensors(out) if t.requires_grad]
        self.outputs = []
        return sum(t.float().sum() for t in tensors) * 0.0 if tensors else 0.0


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def global_sum(values: Tensor) -> Tensor:
    """``values`` summed over the ranks (a copy; the tensor itself with one worker)."""
    if not _active():
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 that keeps gradients: the backward sums every rank's gradient
    of the gathered tensor (one all-reduce) and returns this rank's slice, i.e. the gradient
    of the sum of all ranks' losses. Written here rather than taken from
    ``torch.distributed.nn.functional.all_gather`` (deprecated in torch 2.13, a FutureWarning
    per call; on gloo it emulates the reduce-scatter with an all-to-all).

    The backward's all-reduce runs during DDP's backward, beside the reducer's bucket
    all-reduces; collectives must be issued in the same order on every rank, which holds
    because every rank runs the same graph (the pre-training loss has no data-dependent
    structure: pairs are skipped on global counts, empty selections are still computed)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.size(0)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` (B, ...) from every rank, in rank order, with gradients flowing back to
    each rank's own rows; and a bool mask of the rows that are this rank's.

    Ranks may hold different batch sizes: rows are padded to the largest with zeros and the
    padding is cut out again. With one worker: ``x`` and an all-True mask.
    """
    b = x.size(0)
    if not _active():
        return x, torch.ones(b, dtype=torch.bool, device=x.device)
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([b], dtype=torch.long, device=x.device))
    counts = [int(s) for s in sizes]
    most = max(counts)
    padded = torch.cat([x, x.new_zeros(most - b, *x.shape[1:])]) if b < most else x
    rows = _GatherRows.apply(padded)
    ids = torch.arange(most, device=x.device)
    valid = torch.cat([ids < n for n in counts])
    owner = torch.arange(len(counts), device=x.device).repeat_interleave(most)
    mine = (owner == rank())[valid]
    return rows[valid], mine
