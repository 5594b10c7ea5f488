"""Per-modality encoders: frames -> K segment nodes.

Only frames whose mask is True are ever read: masked slots are zeroed before the projection and
the temporal convolution, and pooling weights are zero there, so whatever a data layer leaves
in a missing slot (zeros, noise, NaN) cannot change an output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def segment_assignment(mask: Tensor, segments: int) -> Tensor:
    """Boolean one-hot (B, T, K) map of frames to ``segments`` equal slices of the span.

    The span runs from frame 0 to the last observed frame, so a short sequence is cut into K
    slices of its own length (not of the padded T); with frame-level missingness the holes
    simply lower the counts. When the span is shorter than K, some slices hold no frame: those
    segments are empty and flagged invalid by :func:`segment_pool`.
    """
    b, t = mask.shape
    positions = torch.arange(1, t + 1, device=mask.device)
    span = (mask * positions).amax(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    seg = torch.div((positions - 1) * segments, span, rounding_mode="floor").clamp(max=segments - 1)
    assign = torch.zeros(b, t, segments, dtype=torch.bool, device=mask.device)
    return assign.scatter_(2, seg.unsqueeze(-1), mask.unsqueeze(-1))


def segment_pool(values: Tensor, assign: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` (B, T, D) per segment: (B, K, D) and segment validity (B, K)."""
    weights = assign.to(values.dtype)
    counts = weights.sum(dim=1)  # (B, K)
    pooled = torch.einsum("btk,btd->bkd", weights, values) / counts.clamp(min=1).unsqueeze(-1)
    return pooled, counts > 0


class ModalityEncoder(nn.Module):
    """Linear projection, learned frame positions, a depthwise temporal conv, segment pooling.

    The depthwise kernel-3 convolution gives each frame local context at ``3 * hidden``
    weights and O(T) cost, light enough for 500-frame unaligned vision on two CPU cores.
    """

    def __init__(self, dim: int, length: int, hidden: int, segments: int, dropout: float = 0.0):
        super().__init__()
        self.dim, self.length = dim, length
        self.segments = min(segments, length)
        self.proj = nn.Linear(dim, hidden)
        self.position = nn.Embedding(length, hidden)
        self.temporal = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.segment_embedding = nn.Parameter(torch.randn(self.segments, hidden) * 0.02)
        self.missing = nn.Parameter(torch.randn(hidden) * 0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def targets(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Segment-pooled input features (the reconstruction targets) and segment validity."""
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        return segment_pool(x, segment_assignment(mask, self.segments))

    def forward(
        self, x: Tensor, mask: Tensor, hide: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode ``x`` (B, T, d) under ``mask`` (B, T).

        ``hide`` (B, K) marks segments to withhold from the network (pre-training masks,
        teacher views): their frames are dropped before the convolution, so nothing of them
        leaks into neighbours, and their node takes the missing embedding. Returns node states
        (B, K, hidden), ``node_valid`` (B, K; observed and not hidden), ``segment_valid``
        (B, K; observed in the input) and the reconstruction targets (B, K, d).
        """
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        assign = segment_assignment(mask, self.segments)  # from the input, not the hidden view
        targets, segment_valid = segment_pool(x, assign)
        if hide is not None:
            keep_frames = mask & ~(assign & hide.unsqueeze(1)).any(dim=-1)
            assign = assign & keep_frames.unsqueeze(-1)
        else:
            keep_frames = mask
        keep = keep_frames.unsqueeze(-1).to(x.dtype)
        t = x.size(1)
        h = (self.proj(x) + self.position.weight[:t]) * keep
        h = self.norm(h + F.gelu(self.temporal(h.transpose(1, 2))).transpose(1, 2))
        pooled, node_valid = segment_pool(h, assign)  # weights are 0 on dropped frames
        # Dropout on the K nodes rather than the T frames: same regularisation, T/K times cheaper.
        nodes = torch.where(node_valid.unsqueeze(-1), self.drop(pooled), self.missing)
        return nodes + self.segment_embedding, node_valid, segment_valid, targets
