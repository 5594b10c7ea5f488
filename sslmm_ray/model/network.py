"""SSLMM network and the early-fusion baseline.

Both share the per-modality encoders, the regression head and the contrastive projector, so a
comparison between them isolates the graph (propagation + imputation of missing nodes).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import MODALITIES, ModelConfig
from .encoders import ModalityEncoder
from .graph import EdgeTemplate
from .layers import Propagation

# Measured by ``sslmm_ray.bench.model`` and a K sweep (docs/MODEL.md, 1 CPU thread): dense masked
# attention wins on every preset shape and on every full layout up to 150 nodes (4-5x); the
# edge list wins only for windowed graphs from about 48 nodes on (density < 0.1).
DENSE_MAX_NODES = 32
DENSE_MIN_DENSITY = 0.25


def resolve_backend(requested: str, num_nodes: int, num_edges: int) -> str:
    """``auto`` -> dense for small or dense graphs, sparse otherwise (thresholds measured).

    ``num_edges`` is the mean edge count of one sample's edge sets (intra, inter).
    """
    if requested != "auto":
        return requested
    density = num_edges / max(num_nodes * num_nodes, 1)
    return "dense" if num_nodes <= DENSE_MAX_NODES or density >= DENSE_MIN_DENSITY else "sparse"


#: What a forward can compute on top of the node states: the sentiment score (readout, fusion,
#: head), the reconstructions (decoders) and the contrastive projections (projector). The
#: objectives ask for the ones their loss reads: under DDP every parameter that produced a
#: returned tensor must receive a gradient, so nothing the loss ignores may be returned (and
#: the unread parts are not computed at all). Inference asks for everything (the default).
OUTPUTS = frozenset({"pred", "recon", "projected"})


@dataclass
class SSLMMOutput:
    """What one forward pass returns; dict keys are modality names.

    ``pred``, ``fused`` and ``pooled`` are None / empty unless "pred" was asked for, ``recon``
    unless "recon" was, ``projected`` unless "projected" was (``OUTPUTS``).
    """

    pred: Tensor | None  # (B,) sentiment score
    fused: Tensor | None  # (B, H) fused representation
    pooled: dict[str, Tensor]  # (B, H) per-modality readout
    targets: dict[str, Tensor]  # (B, K_m, d_m) segment-pooled input features
    segment_valid: dict[str, Tensor]  # (B, K_m) segment observed in the input
    node_valid: dict[str, Tensor]  # (B, K_m) observed and not hidden: the node could send
    present: Tensor  # (B, M) modality visible to the network (some node valid)
    recon: dict[str, Tensor] = field(default_factory=dict)  # (B, K_m, d_m) rebuilt features
    nodes: dict[str, Tensor] = field(default_factory=dict)  # (B, K_m, H) final node states
    # (B, H) contrastive projections of each modality's readout *before* any message passing:
    # after inter-modal propagation a readout holds the other modalities' content, and a
    # contrastive term could be met by copying it. Computed inside forward so that DDP sees
    # every parameter use in its own forward pass.
    projected: dict[str, Tensor] = field(default_factory=dict)


class _Base(nn.Module):
    """Encoders, head and contrastive projector shared by the graph model and the baseline."""

    def __init__(self, cfg: ModelConfig, dims: Mapping[str, int], lengths: Mapping[str, int]):
        super().__init__()
        unknown = set(dims) - set(MODALITIES)
        if unknown or not dims:
            raise ValueError(f"dims must name modalities among {MODALITIES}, got {sorted(dims)}")
        self.cfg = cfg
        self.modalities = tuple(m for m in MODALITIES if m in dims)
        self.dims = {m: int(dims[m]) for m in self.modalities}
        h = cfg.hidden
        self.encoders = nn.ModuleDict(
            {m: ModalityEncoder(self.dims[m], int(lengths[m]), h, cfg.segments, cfg.dropout)
             for m in self.modalities}
        )
        self.segments = {m: self.encoders[m].segments for m in self.modalities}
        self.head = nn.Sequential(
            nn.Linear(h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, 1)
        )
        # Attention pooling and means are order-blind: a weighted mean of the K node states
        # cannot tell which segment said what. The K segments are fixed slices of each sample's
        # own span (start ... end), so a linear map of their concatenation is well defined for
        # any length and keeps the order. Measured on digits (SSLMM supervised-only, 1 seed):
        # label ratio 0.1: 0.703 -> 0.747 Non0_acc_2; 0.5: 0.839 -> 0.911.
        self.segment_readout = nn.ModuleDict(
            {m: nn.Linear(self.segments[m] * h, h) for m in self.modalities}
        ) if cfg.readout == "segments" else None
        # Only the contrastive pre-training objective reads it (SimCLR-style projector).
        self.projector = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))

    def own_readouts(
        self, nodes: Mapping[str, Tensor], node_valid: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per modality, the mean of its own valid encoder nodes (all nodes when none is valid,
        i.e. the missing embedding): what the modality says before any message passing."""
        pooled = {}
        for m in self.modalities:
            w = node_valid[m].to(nodes[m].dtype)
            w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
            pooled[m] = torch.einsum("bk,bkh->bh", w / w.sum(1, keepdim=True), nodes[m])
        return pooled

    def ordered(self, m: str, readout: Tensor, nodes: Tensor) -> Tensor:
        """``readout`` plus the linear map of the modality's K ordered node states."""
        if self.segment_readout is None:
            return readout
        return readout + self.segment_readout[m](nodes.flatten(1))

    def project(self, readouts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.projector(v) for m, v in readouts.items()}

    def encode(self, batch: Mapping[str, Tensor], hide: Mapping[str, Tensor] | None):
        hide = hide or {}
        enc = {m: self.encoders[m](batch[m], batch[f"{m}_mask"], hide.get(m))
               for m in self.modalities}
        nodes = {m: e[0] for m, e in enc.items()}
        node_valid = {m: e[1] for m, e in enc.items()}
        segment_valid = {m: e[2] for m, e in enc.items()}
        targets = {m: e[3] for m, e in enc.items()}
        present = torch.stack([node_valid[m].any(dim=1) for m in self.modalities], dim=1)
        return nodes, node_valid, segment_valid, targets, present

    @torch.no_grad()
    def segment_targets(self, batch: Mapping[str, Tensor]) -> tuple[dict, dict]:
        """Reconstruction targets and segment validity of a batch, without running the network."""
        out = {m: self.encoders[m].targets(batch[m], batch[f"{m}_mask"]) for m in self.modalities}
        return {m: o[0] for m, o in out.items()}, {m: o[1] for m, o in out.items()}


class SSLMM(_Base):
    """Segment graph over all modalities, alternating intra/inter-modal propagation.

    Missing modalities (and hidden segments) keep their nodes with a learned embedding: they
    receive messages but do not send, so what they end up holding comes from observed nodes.
    """

    def __init__(self, cfg: ModelConfig, dims: Mapping[str, int], lengths: Mapping[str, int]):
        super().__init__(cfg, dims, lengths)
        h = cfg.hidden
        sizes = tuple(self.segments[m] for m in self.modalities)
        # Two attention steps per iteration in every variant: the intra-only / inter-only
        # ablations repeat their one edge set, so they differ from SSLMM in the edges alone,
        # not in depth or parameter count.
        kinds = {"alternating": ("intra", "inter"), "intra": ("intra", "intra"),
                 "inter": ("inter", "inter")}
        templates = [EdgeTemplate(sizes, kind, cfg.edges, cfg.window)
                     for kind in kinds[cfg.propagation]]
        self.num_nodes = sum(sizes)
        self.backend = resolve_backend(
            cfg.backend, self.num_nodes, sum(t.num_edges for t in templates) // len(templates)
        )
        self.propagation = Propagation(templates, h, cfg.heads, cfg.iterations, cfg.dropout)
        # No bias: a softmax is shift-invariant, the bias would never receive a gradient.
        self.gates = nn.ModuleDict({m: nn.Linear(h, 1, bias=False) for m in self.modalities})
        self.presence = nn.Embedding(2, h)  # tells fusion whether a readout is observed or imputed
        # Fusion concatenates the modality readouts (a gated sum would mix what each modality
        # says into one average). Measured as above: 0.703 -> 0.722 and 0.839 -> 0.858 alone,
        # 0.772 and 0.886 together with the segment readout.
        self.fusion = nn.Linear(len(self.modalities) * h, h)
        self.fusion_norm = nn.LayerNorm(h)
        self.decoders = make_decoders(h, self.dims)

    def forward(
        self, batch: Mapping[str, Tensor], hide: Mapping[str, Tensor] | None = None,
        outputs: Collection[str] = OUTPUTS,
    ) -> SSLMMOutput:
        """``hide[m]`` (B, K_m) withholds segments (masked views); see ModalityEncoder.

        ``outputs`` (a subset of ``OUTPUTS``) names what to compute and return.
        """
        _check_outputs(outputs)
        nodes, node_valid, segment_valid, targets, present = self.encode(batch, hide)
        projected = (self.project(self.own_readouts(nodes, node_valid))
                     if "projected" in outputs else {})
        x = torch.cat([nodes[m] for m in self.modalities], dim=1)  # (B, N, H)
        src_valid = torch.cat([node_valid[m] for m in self.modalities], dim=1)
        x = self.propagation(x, src_valid, self.backend)
        parts = dict(zip(self.modalities,
                         x.split([self.segments[m] for m in self.modalities], dim=1), strict=True))

        pooled, fused, pred = {}, None, None
        if "pred" in outputs:
            for i, m in enumerate(self.modalities):
                # Attention pooling over observed nodes; a missing modality pools its imputed
                # nodes.
                allowed = node_valid[m] | ~present[:, i : i + 1]
                score = self.gates[m](parts[m]).squeeze(-1).masked_fill(~allowed, float("-inf"))
                pooled[m] = self.ordered(
                    m, torch.einsum("bk,bkh->bh", score.softmax(dim=1), parts[m]), parts[m]
                )
            stacked = torch.stack([pooled[m] for m in self.modalities], dim=1)  # (B, M, H)
            stacked = stacked + self.presence(present.long())
            fused = self.fusion_norm(self.fusion(stacked.flatten(1)))
            pred = self.head(fused).squeeze(-1)
        recon = ({m: self.decoders[m](parts[m]) for m in self.modalities}
                 if "recon" in outputs else {})
        return SSLMMOutput(
            pred=pred, fused=fused, pooled=pooled, targets=targets,
            projected=projected, segment_valid=segment_valid, node_valid=node_valid,
            present=present, recon=recon, nodes=parts,
        )


class EarlyFusion(_Base):
    """Baseline: the same encoders and readout per modality, concatenation, an MLP.

    No graph: a missing modality contributes its learned missing embedding and a 0 presence
    flag. It is pre-trained and reconstructs like SSLMM (decoders read the fused vector plus a
    learned query per segment), so comparing the two isolates the graph and nothing else.
    """

    def __init__(self, cfg: ModelConfig, dims: Mapping[str, int], lengths: Mapping[str, int]):
        super().__init__(cfg, dims, lengths)
        h, m = cfg.hidden, len(self.modalities)
        self.mlp = nn.Sequential(
            nn.Linear(m * h + m, 2 * h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * h, h),
            nn.LayerNorm(h),
        )
        self.segment_queries = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(self.segments[m], h) * 0.02) for m in self.modalities}
        )
        self.decoders = make_decoders(h, self.dims)

    def forward(
        self, batch: Mapping[str, Tensor], hide: Mapping[str, Tensor] | None = None,
        outputs: Collection[str] = OUTPUTS,
    ) -> SSLMMOutput:
        _check_outputs(outputs)
        nodes, node_valid, segment_valid, targets, present = self.encode(batch, hide)
        own = self.own_readouts(nodes, node_valid)
        pooled, fused, pred, recon = {}, None, None, {}
        if "pred" in outputs or "recon" in outputs:  # the decoders read the fused vector too
            pooled = {m: self.ordered(m, own[m], nodes[m]) for m in self.modalities}
            flat = torch.cat([*(pooled[m] for m in self.modalities), present.to(nodes[
                self.modalities[0]].dtype)], dim=1)
            fused = self.mlp(flat)
        if "pred" in outputs:
            pred = self.head(fused).squeeze(-1)
        if "recon" in outputs:
            recon = {m: self.decoders[m](fused.unsqueeze(1) + self.segment_queries[m])
                     for m in self.modalities}
        return SSLMMOutput(
            pred=pred, fused=fused, pooled=pooled, targets=targets,
            projected=self.project(own) if "projected" in outputs else {},
            segment_valid=segment_valid, node_valid=node_valid, present=present, recon=recon,
        )


def _check_outputs(outputs: Collection[str]) -> None:
    unknown = set(outputs) - OUTPUTS
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose among {sorted(OUTPUTS)}")


def make_decoders(hidden: int, dims: Mapping[str, int]) -> nn.ModuleDict:
    """Per modality, hidden state -> that modality's segment features (reconstruction)."""
    return nn.ModuleDict(
        {m: nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d))
         for m, d in dims.items()}
    )


def build_model(
    cfg: ModelConfig, dims: Mapping[str, int], lengths: Mapping[str, int]
) -> SSLMM | EarlyFusion:
    """The network named by ``cfg.fusion`` for ``dims`` features and up to ``lengths`` frames."""
    cls = EarlyFusion if cfg.fusion == "early" else SSLMM
    return cls(cfg, dims, lengths)
