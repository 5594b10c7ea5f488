"""Edge templates of the multimodal segment graph.

Every sample has the same node layout: ``K_m`` segment nodes per modality, concatenated in
modality order. The edges therefore depend only on the shape, so they are built once per
``(sizes, layout, window)`` (cached) and a batch is the template shifted by ``b * N`` offsets,
exactly what :class:`torch_geometric.data.Batch` would do, without a Python loop over samples.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn


def node_layout(sizes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Modality id and position inside its modality for each of the ``sum(sizes)`` nodes."""
    mod = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    starts = torch.tensor((0, *sizes[:-1])).cumsum(0)
    pos = torch.arange(int(sum(sizes))) - starts[mod]
    return mod, pos


@lru_cache(maxsize=64)
def _build(
    sizes: tuple[int, ...], kind: str, layout: str, window: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    mod, pos = node_layout(sizes)
    k = torch.tensor(sizes)[mod]
    # (dst, src) grids: row i receives from column j.
    md, ms = mod[:, None], mod[None, :]
    pd, ps = pos[:, None], pos[None, :]
    same = md == ms
    if kind == "intra":
        adj = same
        if layout == "windowed":
            adj = adj & ((pd - ps).abs() <= window)
        relation = ms.expand_as(adj)  # one relation per modality
        num_relations = len(sizes)
    elif kind == "inter":
        adj = ~same
        if layout == "windowed":
            # Segments cover [i/K, (i+1)/K) of a sequence; link those whose centres are less than
            # (window + 1) segments apart on the coarser of the two time grids.
            ud, us = (pd + 0.5) / k[:, None], (ps + 0.5) / k[None, :]
            coarse = torch.maximum(k[:, None], k[None, :])
            adj = adj & ((ud - us).abs() * coarse < window + 1)
        # Ordered pair (src, dst), src != dst, mapped to 0 .. M(M-1)-1.
        m = len(sizes)
        relation = ms * (m - 1) + torch.where(md < ms, md, md - 1)
        num_relations = m * (m - 1)
    else:
        raise ValueError(f"unknown edge set {kind!r}")
    relation = torch.where(adj, relation, torch.zeros_like(relation))
    dst, src = adj.nonzero(as_tuple=True)
    edge_index = torch.stack([src, dst])
    return edge_index, relation[dst, src], adj, relation, num_relations


class EdgeTemplate(nn.Module):
    """One edge set (intra- or inter-modal) of a single sample, as buffers that follow ``.to()``.

    ``edge_index`` / ``edge_type`` serve the sparse backend, ``adjacency`` / ``relation``
    (``[dst, src]``) the dense one; both describe the same edges.
    """

    def __init__(self, sizes: tuple[int, ...], kind: str, layout: str = "full", window: int = 1):
        super().__init__()
        edge_index, edge_type, adjacency, relation, num_relations = _build(
            tuple(int(s) for s in sizes), kind, layout, int(window)
        )
        self.kind = kind
        self.num_nodes = int(sum(sizes))
        self.num_relations = num_relations
        self.register_buffer("edge_index", edge_index.clone(), persistent=False)
        self.register_buffer("edge_type", edge_type.clone(), persistent=False)
        self.register_buffer("adjacency", adjacency.clone(), persistent=False)
        self.register_buffer("relation", relation.clone(), persistent=False)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.size(1))

    def batch(self, batch_size: int, src_valid: Tensor) -> tuple[Tensor, Tensor]:
        """Edges of ``batch_size`` stacked graphs, keeping only edges whose source is valid.

        ``src_valid`` is the flat ``(batch_size * num_nodes,)`` mask of nodes allowed to send.
        """
        n = self.num_nodes
        offsets = torch.arange(batch_size, device=self.edge_index.device) * n
        edge_index = (self.edge_index[:, None, :] + offsets[None, :, None]).reshape(2, -1)
        edge_type = self.edge_type.repeat(batch_size)
        keep = src_valid[edge_index[0]]
        return edge_index[:, keep], edge_type[keep]

    def extra_repr(self) -> str:
        return f"{self.kind}, nodes={self.num_nodes}, edges={self.num_edges}"
