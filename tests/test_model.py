"""SSLMM network: shapes per preset, masking, graph templates, backends, determinism."""

from __future__ import annotations

import pytest
import torch

from sslmm_ray.bench.model import random_batch
from sslmm_ray.config import ModelConfig
from sslmm_ray.model import EarlyFusion, build_model, resolve_backend
from sslmm_ray.model.encoders import segment_assignment
from sslmm_ray.model.graph import EdgeTemplate

torch.set_num_threads(1)

PRESETS = {
    "mosi-aligned": ({"text": 768, "audio": 5, "vision": 20},
                     {"text": 50, "audio": 50, "vision": 50}),
    "mosi-unaligned": ({"text": 768, "audio": 5, "vision": 20},
                       {"text": 50, "audio": 375, "vision": 500}),
    "mosei-aligned": ({"text": 768, "audio": 74, "vision": 35},
                      {"text": 50, "audio": 50, "vision": 50}),
    "mosei-unaligned": ({"text": 768, "audio": 74, "vision": 35},
                        {"text": 50, "audio": 500, "vision": 500}),
    "sims-unaligned": ({"text": 768, "audio": 33, "vision": 709},
                       {"text": 39, "audio": 400, "vision": 55}),
}
SMALL_DIMS = {"text": 12, "audio": 5, "vision": 7}
SMALL_LENGTHS = {"text": 6, "audio": 9, "vision": 4}


def small_cfg(**kw) -> ModelConfig:
    base = {"hidden": 16, "segments": 5, "heads": 2, "iterations": 2, "dropout": 0.0}
    return ModelConfig(**{**base, **kw})


def small_batch(seed: int = 0, b: int = 6, missing: float = 0.4) -> dict[str, torch.Tensor]:
    return random_batch(SMALL_DIMS, SMALL_LENGTHS, b, torch.Generator().manual_seed(seed),
                        missing_rate=missing)


@pytest.mark.parametrize("fusion", ["graph", "early"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_output_shapes_per_preset(preset, fusion):
    dims, lengths = PRESETS[preset]
    torch.manual_seed(0)
    model = build_model(small_cfg(segments=8, fusion=fusion), dims, lengths).eval()
    b = 3
    out = model(random_batch(dims, lengths, b, torch.Generator().manual_seed(1), 0.3))
    assert out.pred.shape == (b,) and out.fused.shape == (b, 16)
    assert out.present.shape == (b, 3) and out.present.dtype == torch.bool
    assert out.present.any(dim=1).all()
    for m, d in dims.items():
        k = min(8, lengths[m])
        assert out.pooled[m].shape == (b, 16)
        assert out.targets[m].shape == (b, k, d)
        assert out.segment_valid[m].shape == (b, k)
        assert out.recon[m].shape == (b, k, d)  # early fusion reconstructs too
    assert torch.isfinite(out.pred).all()


def test_early_fusion_is_a_baseline_with_the_same_encoders():
    graph = build_model(small_cfg(), SMALL_DIMS, SMALL_LENGTHS)
    early = build_model(small_cfg(fusion="early"), SMALL_DIMS, SMALL_LENGTHS)
    assert isinstance(early, EarlyFusion)
    assert not hasattr(early, "propagation")
    # pre-trained and reconstructing like SSLMM: only the graph differs
    assert set(early.decoders) == set(graph.decoders)
    enc = {k for k, _ in graph.named_parameters() if k.startswith("encoders.")}
    assert enc == {k for k, _ in early.named_parameters() if k.startswith("encoders.")}


@pytest.mark.parametrize("fusion,backend", [("graph", "sparse"), ("graph", "dense"),
                                            ("early", "auto")])
def test_missing_slots_cannot_change_outputs(fusion, backend):
    torch.manual_seed(0)
    model = build_model(small_cfg(fusion=fusion, backend=backend), SMALL_DIMS, SMALL_LENGTHS)
    model.eval()
    batch = small_batch()
    noisy = dict(batch)
    g = torch.Generator().manual_seed(9)
    for m in SMALL_DIMS:
        junk = torch.randn(batch[m].shape, generator=g) * 100
        junk[0, 0, 0] = float("nan")  # not even NaN in a masked slot leaks
        noisy[m] = torch.where(batch[f"{m}_mask"].unsqueeze(-1), batch[m], junk)
    a, b = model(batch), model(noisy)
    torch.testing.assert_close(a.pred, b.pred, rtol=0, atol=0)
    torch.testing.assert_close(a.fused, b.fused, rtol=0, atol=0)
    for m in SMALL_DIMS:
        torch.testing.assert_close(a.targets[m], b.targets[m], rtol=0, atol=0)
        if a.recon:
            torch.testing.assert_close(a.recon[m], b.recon[m], rtol=0, atol=0)


def test_short_sequences_flag_empty_segments():
    # span 3 frames cut into 5 segments: frames fall in segments 0, 1, 3 -> 2 empty ones.
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :9] = True
    assign = segment_assignment(mask, 5)
    assert assign[0].sum(0).tolist() == [1, 1, 0, 1, 0]
    assert assign[1].sum(0).tolist() == [2, 2, 2, 2, 1]  # floor(t * K / span)
    model = build_model(small_cfg(), SMALL_DIMS, SMALL_LENGTHS).eval()
    batch = small_batch(b=2, missing=0.0)
    batch["audio_mask"], batch["audio"] = mask, batch["audio"] * mask.unsqueeze(-1)
    out = model(batch)
    assert out.segment_valid["audio"].sum(1).tolist() == [3, 5]
    assert model.segments == {"text": 5, "audio": 5, "vision": 4}  # K = min(segments, T)


def test_missing_modality_nodes_are_filled_by_inter_modal_messages():
    batch = small_batch(b=2, missing=0.0)
    batch["vision_mask"][0] = False
    outs = {}
    for prop in ("alternating", "intra"):
        torch.manual_seed(0)
        model = build_model(small_cfg(propagation=prop), SMALL_DIMS, SMALL_LENGTHS).eval()
        outs[prop] = model(batch)
        assert outs[prop].present[0].tolist() == [True, True, False]
        assert not outs[prop].node_valid["vision"][0].any()
    # intra-only: nothing reaches a missing modality, all its nodes keep one embedding pattern
    # up to their segment embedding; with inter steps they differ per sample content.
    alt = outs["alternating"].nodes["vision"][0]
    assert not torch.allclose(alt, outs["intra"].nodes["vision"][0])


def test_edge_templates_are_cached_vectorised_and_windowed():
    full = EdgeTemplate((3, 2), "intra")
    assert full.num_edges == 9 + 4
    assert full.edge_type.tolist().count(1) == 4
    inter = EdgeTemplate((3, 2), "inter")
    assert inter.num_edges == 2 * 3 * 2
    assert EdgeTemplate((3, 2), "inter").edge_index.data_ptr() != 0
    windowed = EdgeTemplate((4, 4), "intra", "windowed", 1)
    assert windowed.num_edges == 2 * (4 + 2 * 3)
    win_inter = EdgeTemplate((4, 4), "inter", "windowed", 1)
    src, dst = win_inter.edge_index
    assert ((src % 4) - (dst % 4)).abs().max() <= 1 and win_inter.num_edges == 2 * 10
    # adjacency and edge list describe the same edges
    assert full.adjacency.sum() == full.num_edges
    assert full.adjacency[full.edge_index[1], full.edge_index[0]].all()
    # batching = offsets, and invalid sources are dropped
    valid = torch.ones(3 * 5, dtype=torch.bool)
    valid[5] = False  # node 0 of sample 1
    ei, et = full.batch(3, valid)
    assert ei.size(1) == 3 * 13 - 3 and not (ei[0] == 5).any()
    assert (ei[0] // 5 == ei[1] // 5).all()  # never across samples


@pytest.mark.parametrize("edges", ["full", "windowed"])
@pytest.mark.parametrize("propagation", ["alternating", "intra", "inter"])
def test_sparse_and_dense_backends_agree(edges, propagation):
    """Same weights, both backends: outputs and gradients within atol 1e-5 (float32)."""
    batch = small_batch(seed=3, missing=0.4)
    results = []
    for backend in ("sparse", "dense"):
        torch.manual_seed(0)
        model = build_model(small_cfg(backend=backend, edges=edges, propagation=propagation),
                            SMALL_DIMS, SMALL_LENGTHS).eval()
        out = model(batch)
        loss = out.pred.sum() + sum(r.square().sum() for r in out.recon.values())
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.pred, b.pred, rtol=0, atol=1e-5)
    for m in SMALL_DIMS:
        torch.testing.assert_close(a.nodes[m], b.nodes[m], rtol=0, atol=1e-5)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_auto_backend_follows_the_measured_rule():
    assert build_model(small_cfg(), SMALL_DIMS, SMALL_LENGTHS).backend == "dense"
    assert resolve_backend("sparse", 24, 576) == "sparse"
    assert resolve_backend("auto", 24, 100) == "dense"  # small graph
    assert resolve_backend("auto", 150, 15000) == "dense"  # dense graph
    assert resolve_backend("auto", 150, 800) == "sparse"  # large windowed graph


def test_ablations_build_only_their_parts():
    def steps(prop):
        model = build_model(small_cfg(propagation=prop), SMALL_DIMS, SMALL_LENGTHS)
        return [t.kind for t in model.propagation.templates]

    assert steps("alternating") == ["intra", "inter"]
    # same number of attention steps (and parameters): only the edges differ
    assert steps("intra") == ["intra", "intra"]
    assert steps("inter") == ["inter", "inter"]
    sizes = {p: sum(x.numel() for x in build_model(small_cfg(propagation=p), SMALL_DIMS,
                                                   SMALL_LENGTHS).propagation.parameters())
             for p in ("alternating", "intra", "inter")}
    # only the small per-relation tables differ in size (3 intra relations, 6 inter ones)
    assert max(sizes.values()) - min(sizes.values()) < 0.1 * sizes["alternating"]


def test_deterministic_with_fixed_seed_in_training_mode():
    def once():
        torch.manual_seed(7)
        model = build_model(small_cfg(dropout=0.2), SMALL_DIMS, SMALL_LENGTHS).train()
        out = model(small_batch(seed=5))
        out.pred.sum().backward()
        return out.pred.detach(), model.encoders["text"].proj.weight.grad

    (p1, g1), (p2, g2) = once(), once()
    assert torch.equal(p1, p2) and torch.equal(g1, g2)


def test_benchmark_returns_json_able_figures():
    import json

    from sslmm_ray.bench.model import run

    result = json.loads(json.dumps(run(batch_size=2, steps=1)))
    for layout in ("aligned", "unaligned"):
        row = result["layouts"][layout]
        assert row["sparse"]["samples_per_s"] > 0 and row["dense"]["saved_activation_mb"] > 0
        assert row["ratio_dense_over_sparse"] > 0 and row["auto"] == "dense"


@pytest.mark.parametrize("fusion", ["graph", "early"])
def test_segment_readout_sees_which_segment_said_what(fusion):
    """Swapping two segments' node states moves the "segments" readout, not the order-blind one.

    Attention pooling and means are permutation-invariant over a modality's nodes; the
    segment readout is what lets the head use the order of a modality's segments.
    """
    torch.manual_seed(0)
    cfg = small_cfg(fusion=fusion)
    model = build_model(cfg, SMALL_DIMS, SMALL_LENGTHS).eval()
    blind = build_model(small_cfg(fusion=fusion, readout="attention"), SMALL_DIMS, SMALL_LENGTHS)
    assert blind.segment_readout is None and model.segment_readout is not None
    nodes = torch.randn(2, model.segments["text"], 16)
    swapped = nodes[:, [1, 0, *range(2, nodes.size(1))]]
    readout = nodes.mean(dim=1)
    assert torch.allclose(blind.ordered("text", readout, nodes),
                          blind.ordered("text", readout, swapped))
    assert not torch.allclose(model.ordered("text", readout, nodes),
                              model.ordered("text", readout, swapped))
