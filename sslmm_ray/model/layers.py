"""Message-passing layers of the segment graph.

:class:`RelationalAttention` is a relation-aware graph attention (an HGT-style layer kept
light): queries, keys and values are shared across relations, and each relation (source
modality for intra-modal edges, ordered modality pair for inter-modal edges) adds a learned
offset to the key and to the value. That lets a text node weigh audio and vision neighbours
differently at the cost of ``2 * R * hidden`` parameters instead of ``R`` full projections.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import dense
from .graph import EdgeTemplate


class RelationalAttention(nn.Module):
    """Multi-head attention over one edge set, with dense and sparse (PyG) executions.

    The parameters live here; :mod:`.dense` and :mod:`.sparse` are two executions of the same
    math over them (one masked ``(B, heads, N, N)`` attention, or PyG message passing over the
    batched edge list), so a checkpoint runs on either.
    """

    def __init__(self, hidden: int, heads: int, num_relations: int, dropout: float = 0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.heads, self.head_dim = heads, hidden // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.rel_k = nn.Parameter(torch.randn(num_relations, heads, self.head_dim) * 0.02)
        self.rel_v = nn.Parameter(torch.randn(num_relations, heads, self.head_dim) * 0.02)

    def forward(
        self, x: Tensor, template: EdgeTemplate, src_valid: Tensor, backend: str = "sparse"
    ) -> Tensor:
        """``x`` (B, N, hidden) node states, ``src_valid`` (B, N) nodes allowed to send."""
        b, n, hidden = x.shape
        shape = (b, n, self.heads, self.head_dim)
        q, k, v = self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape)
        if backend == "dense":
            out = dense.relational_attention(
                q, k, v, self.rel_k, self.rel_v, template.adjacency, template.relation,
                src_valid, self.scale, self.dropout, self.training,
            )
        else:
            from . import sparse  # PyG is imported only by models that run sparse (sparse.py)

            edge_index, edge_type = template.batch(b, src_valid.reshape(-1))
            flat = (b * n, self.heads, self.head_dim)
            out = sparse.relational_attention(
                q.reshape(flat), k.reshape(flat), v.reshape(flat), self.rel_k, self.rel_v,
                edge_index, edge_type, self.scale, self.dropout, self.training,
            )
        return self.out(out.reshape(b, n, hidden))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(heads={self.heads}, head_dim={self.head_dim}, "
                f"relations={self.rel_k.size(0)})")


class Propagation(nn.Module):
    """``iterations`` x (intra-modal step, then inter-modal step), each residual + LayerNorm.

    The same steps are applied at every iteration (weights shared): the mechanism is an
    iterative refinement, so depth does not add parameters. A position-wise feed-forward
    (residual + LayerNorm) closes each iteration. ``templates`` lists the edge sets in step
    order; passing only one gives the intra-only / inter-only ablations.
    """

    def __init__(
        self, templates: list[EdgeTemplate], hidden: int, heads: int, iterations: int,
        dropout: float,
    ):
        super().__init__()
        self.iterations = iterations
        self.templates = nn.ModuleList(templates)
        self.steps = nn.ModuleList(
            RelationalAttention(hidden, heads, t.num_relations, dropout) for t in templates
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in templates)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(2 * hidden, hidden),
        )
        self.ffn_norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, src_valid: Tensor, backend: str) -> Tensor:
        for _ in range(self.iterations):
            for template, step, norm in zip(self.templates, self.steps, self.norms, strict=True):
                x = norm(x + self.drop(step(x, template, src_valid, backend)))
            x = self.ffn_norm(x + self.drop(self.ffn(x)))
        return x
