"""Sparse (edge-list) execution of :class:`~sslmm_ray.model.layers.RelationalAttention` on PyG.

The counterpart of :mod:`~sslmm_ray.model.dense`: the same math as a
:class:`torch_geometric.nn.MessagePassing` over the batched edge list. The layer's parameters
stay on :class:`~sslmm_ray.model.layers.RelationalAttention`; this kernel holds none, so the
two backends share one state dict. It is imported only when a model runs the sparse backend:
``import torch_geometric`` costs 4-6 CPU seconds per process (torch._dynamo, its datasets), paid
by every Ray Train worker and Tune trial otherwise, and ``backend="auto"`` picks dense for
every preset shape.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import softmax


class EdgeAttention(MessagePassing):
    """Parameter-free multi-head attention over edges with per-relation key/value offsets."""

    def __init__(self) -> None:
        super().__init__(aggr="add", node_dim=0)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, rel_k: Tensor, rel_v: Tensor,
        edge_index: Tensor, edge_type: Tensor, scale: float, dropout: float, training: bool,
    ) -> Tensor:
        """``q, k, v`` (B*N, heads, d), ``edge_index`` (2, E) over the B*N stacked nodes."""
        n = q.size(0)
        return self.propagate(
            edge_index, q=q, k=k, v=v, rel_k=rel_k, rel_v=rel_v, edge_type=edge_type,
            scale=scale, dropout=dropout, training=training, size=(n, n),
        )

    def message(
        self, q_i: Tensor, k_j: Tensor, v_j: Tensor, rel_k: Tensor, rel_v: Tensor,
        edge_type: Tensor, scale: float, dropout: float, training: bool,
        index: Tensor, ptr: Tensor | None, size_i: int | None,
    ) -> Tensor:
        alpha = (q_i * (k_j + rel_k[edge_type])).sum(-1) * scale
        alpha = softmax(alpha, index, ptr, size_i)
        alpha = F.dropout(alpha, p=dropout, training=training)
        return (v_j + rel_v[edge_type]) * alpha.unsqueeze(-1)


_KERNEL: EdgeAttention | None = None


def relational_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_k: Tensor, rel_v: Tensor,
    edge_index: Tensor, edge_type: Tensor, scale: float, dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Same contract as :func:`sslmm_ray.model.dense.relational_attention`, on an edge list."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = EdgeAttention()
    return _KERNEL(q, k, v, rel_k, rel_v, edge_index, edge_type, scale, dropout, training)
