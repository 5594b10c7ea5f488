"""Dense masked-attention execution of :class:`~sslmm_ray.model.layers.RelationalAttention`.

The segment graph is small (``N = sum K_m`` nodes, 24 by default) and, with the ``full`` layout,
dense. Then one batched ``(B, heads, N, N)`` score tensor beats gathering ``B * E`` edge
messages, so this module computes the same math with a boolean mask in place of the edge list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def relational_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_k: Tensor,
    rel_v: Tensor,
    adjacency: Tensor,
    relation: Tensor,
    src_valid: Tensor,
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Masked multi-head attention with per-relation key and value offsets.

    Shapes: ``q, k, v`` (B, N, heads, d); ``rel_k, rel_v`` (R, heads, d); ``adjacency`` and
    ``relation`` (N, N) indexed ``[dst, src]``; ``src_valid`` (B, N). Returns (B, N, heads, d).
    A node with no valid incoming edge receives zeros, as a sum aggregation over no edges would.
    """
    b, n, h, _ = q.shape
    r = rel_k.size(0)
    rel = relation.expand(b, h, n, n)
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    # q_i . rel_k[rel(i, j)]: a (B, h, N, R) product, then picked per edge by its relation.
    scores = scores + torch.einsum("bihd,rhd->bhir", q, rel_k).gather(-1, rel)
    scores = scores * scale
    mask = (adjacency.unsqueeze(0) & src_valid.unsqueeze(1)).unsqueeze(1)  # (B, 1, N, N)
    # finfo.min (not -inf) keeps fully masked rows finite in forward and backward.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    attn = scores.softmax(dim=-1).masked_fill(~mask, 0.0)
    attn = F.dropout(attn, p=dropout, training=training)
    out = torch.einsum("bhij,bjhd->bihd", attn, v)
    # sum_j a_ij rel_v[rel(i, j)] = sum_r (sum_{j: rel(i,j)=r} a_ij) rel_v[r]
    per_relation = attn.new_zeros(b, h, n, r).scatter_add_(-1, rel, attn)
    return out + torch.einsum("bhir,rhd->bihd", per_relation, rel_v)
