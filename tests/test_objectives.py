"""Pre-training and fine-tuning objectives, teacher and modality dropping."""

from __future__ import annotations

import math

import pytest
import torch

from sslmm_ray.bench.model import random_batch
from sslmm_ray.config import FinetuneConfig, ModelConfig, PretrainConfig
from sslmm_ray.model import build_model, ema_update, make_teacher
from sslmm_ray.train.objectives import (
    drop_modalities,
    features,
    finetune_loss,
    pretrain_loss,
    pseudo_labels,
    rampup,
)

torch.set_num_threads(1)

DIMS = {"text": 12, "audio": 5, "vision": 7}
LENGTHS = {"text": 6, "audio": 9, "vision": 4}


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"hidden": 16, "segments": 4, "heads": 2, "dropout": 0.1, **kw})


def make(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(model_cfg(**kw), DIMS, LENGTHS)


def batch(seed: int = 0, b: int = 8, missing: float = 0.3, label_ratio: float = 0.5):
    return random_batch(DIMS, LENGTHS, b, torch.Generator().manual_seed(seed),
                        missing_rate=missing, label_ratio=label_ratio)


def ft(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"tau": 0.0, "rampup_epochs": 0, "drop_prob": 0.5, **kw})


def grads_after(fn, model) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss, _ = fn()
    loss.backward()
    return {k: (None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pretraining_never_reads_labels():
    model = make()
    clean = batch()
    garbage = dict(clean, label=torch.full_like(clean["label"], float("nan")),
                   labeled=~clean["labeled"])
    del_labels = {k: v for k, v in clean.items() if k not in ("label", "labeled")}
    runs = [grads_after(lambda b=b: pretrain_loss(model, b, PretrainConfig(), _gen()), model)
            for b in (clean, garbage, del_labels)]
    for other in runs[1:]:
        for k, g in runs[0].items():
            assert (g is None) == (other[k] is None), k
            if g is not None:
                assert torch.equal(g, other[k]), k


def test_unlabeled_rows_labels_never_reach_a_loss():
    student = make()
    teacher = make_teacher(student)
    clean = batch()
    noisy = dict(clean)
    noisy["label"] = torch.where(clean["labeled"], clean["label"], torch.tensor(float("nan")))
    cfg = ft()
    a = grads_after(lambda: finetune_loss(student, teacher, clean, cfg, 1, _gen()), student)
    b = grads_after(lambda: finetune_loss(student, teacher, noisy, cfg, 1, _gen()), student)
    for k in a:
        assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k


def _nonzero(grads) -> set[str]:
    return {k for k, g in grads.items() if g is not None and g.abs().sum() > 0}


def test_every_parameter_learns_under_the_full_objectives():
    """Fine-tuning trains all but the contrastive projector; pre-training trains the projector
    and everything it reaches (not the fusion/regression head)."""
    student = make()
    teacher = make_teacher(student)
    b = batch(missing=0.4, b=12)
    names = {k for k, _ in student.named_parameters()}
    fine = _nonzero(grads_after(
        lambda: finetune_loss(student, teacher, b, ft(drop_prob=0.7), 3, _gen()), student))
    pre = _nonzero(grads_after(
        lambda: pretrain_loss(student, b, PretrainConfig(mask_modality_prob=0.5), _gen()),
        student))
    assert names - fine == {k for k in names if k.startswith("projector.")}
    assert {k for k in names if k.startswith("projector.")} <= pre
    assert not any(k.startswith(("head.", "fusion_", "presence.")) for k in pre)
    assert fine | pre == names


def test_switched_off_parts_get_no_gradient():
    student = make()
    teacher = make_teacher(student)
    b = batch(missing=0.4)
    grads = grads_after(
        lambda: finetune_loss(student, teacher, b, ft(reconstruction=False), 1, _gen()), student)
    assert all(grads[k] is None for k in grads if k.startswith("decoders."))
    _, stats = finetune_loss(student, teacher, b, ft(reconstruction=False), 1, _gen())
    assert "rec" not in stats

    class Forbidden(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("teacher used with pseudo_labels=False")

    _, stats = finetune_loss(student, Forbidden(), b, ft(pseudo_labels=False), 1, _gen())
    assert "pseudo" not in stats
    # The early-fusion baseline reconstructs like SSLMM (only the graph differs) and can be
    # pre-trained.
    early = make(fusion="early")
    loss, stats = finetune_loss(early, make_teacher(early), b, ft(), 1, _gen())
    assert torch.isfinite(loss) and "rec" in stats
    grads = grads_after(lambda: finetune_loss(early, None, b, ft(pseudo_labels=False), 1,
                                              _gen()), early)
    assert any(grads[k] is not None for k in grads if k.startswith("decoders."))
    pre_loss, pre_stats = pretrain_loss(early, b, PretrainConfig(), _gen())
    assert torch.isfinite(pre_loss) and pre_stats["rec"] > 0


def test_tau_zero_keeps_every_pseudo_label_tau_one_keeps_none():
    student = make()
    teacher = make_teacher(student)
    b = batch(label_ratio=0.25)
    _, keep_all = finetune_loss(student, teacher, b, ft(tau=0.0), 1, _gen())
    _, keep_none = finetune_loss(student, teacher, b, ft(tau=1.0), 1, _gen())
    assert keep_all["pseudo_label_fraction"] == 1.0 and keep_all["pseudo"] > 0
    assert keep_none["pseudo_label_fraction"] == 0.0 and keep_none["pseudo"] == 0.0


def test_confidence_formula_and_range():
    teacher = make_teacher(make())
    b = batch()
    mu, conf = pseudo_labels(teacher, b, 5, 0.5, 0.2, 0.1, _gen(3))
    assert ((conf >= 0) & (conf < 1)).all()
    # Recompute from the same views.
    from sslmm_ray.train.objectives import random_hide

    inputs = {k: v.repeat(5, *([1] * (v.dim() - 1))) for k, v in features(b).items()}
    gen = _gen(3)
    hide = random_hide(inputs, teacher.segments, 0.5, 0.2, gen)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    preds = teacher.train()(inputs, hide=hide).pred.view(5, -1)  # Monte-Carlo dropout views
    teacher.eval()
    m, s = preds.mean(0), preds.std(0, correction=0)
    torch.testing.assert_close(mu, m)
    torch.testing.assert_close(conf, m.abs() / (m.abs() + s + 0.1))
    # kappa is relative to half the label range: the same threshold means the same on SIMS
    _, conf_sims = pseudo_labels(teacher, b, 5, 0.5, 0.2, 0.1, _gen(3), label_scale=1.0)
    _, conf_mosi = pseudo_labels(teacher, b, 5, 0.5, 0.2, 0.1, _gen(3), label_scale=3.0)
    torch.testing.assert_close(conf_sims, m.abs() / (m.abs() + s + 0.1))
    torch.testing.assert_close(conf_mosi, m.abs() / (m.abs() + s + 0.3))
    assert not teacher.training  # the teacher is left as it was


def test_single_modality_samples_are_not_the_most_confident():
    """With one modality there is nothing to hide: the views differ through dropout alone."""
    teacher = make_teacher(make(dropout=0.2))
    b = batch(missing=0.0)
    for m in ("audio", "vision"):  # text only, in every row
        b[f"{m}_mask"] = torch.zeros_like(b[f"{m}_mask"])
        b[m] = torch.zeros_like(b[m])
    mu, conf = pseudo_labels(teacher, b, 6, 0.5, 0.0, 0.1, _gen(4))
    inputs = {k: v.repeat(6, *([1] * (v.dim() - 1))) for k, v in features(b).items()}
    eval_views = teacher(inputs).pred.view(6, -1)
    assert torch.allclose(eval_views.std(0), torch.zeros(()), atol=1e-6)  # identical views
    assert (conf < mu.abs() / (mu.abs() + 0.1) - 1e-4).all()  # dropout made sigma > 0


def test_reconstruction_is_zero_when_nothing_was_dropped():
    student = make()
    _, stats = finetune_loss(student, None, batch(), ft(drop_prob=0.0), 1, _gen())
    assert stats["rec"] == 0.0 and stats["dropped"] == 0.0
    _, stats = finetune_loss(student, None, batch(), ft(drop_prob=0.9), 1, _gen())
    assert stats["rec"] > 0.0 and stats["dropped"] > 0.0


def test_drop_modalities_keeps_one_and_only_drops_present():
    b = batch(b=64, missing=0.5)
    present = torch.stack([b[f"{m}_mask"].any(1) for m in DIMS], 1)
    new, dropped = drop_modalities(b, 1.0, _gen())
    assert not (dropped & ~present).any()
    new_present = torch.stack([new[f"{m}_mask"].any(1) for m in DIMS], 1)
    assert new_present.sum(1).eq(1).all()  # prob 1: exactly one survivor per row
    assert torch.equal(new_present, present & ~dropped)
    for i, m in enumerate(DIMS):
        assert new[m][dropped[:, i]].abs().sum() == 0
    assert new["label"] is b["label"]
    _, none = drop_modalities(b, 0.0, _gen())
    assert not none.any()


def test_ema_update_matches_formula():
    student, teacher = make(0), make(1)
    before = {k: p.clone() for k, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    for k, p in teacher.named_parameters():
        expected = 0.9 * before[k] + 0.1 * dict(student.named_parameters())[k]
        torch.testing.assert_close(p, expected)
    frozen = make_teacher(student)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_rampup():
    assert rampup(0, 0) == 1.0 and rampup(5, 5) == 1.0 and rampup(9, 5) == 1.0
    assert rampup(0, 4) == pytest.approx(math.exp(-5))
    assert rampup(2, 4) == pytest.approx(math.exp(-1.25))


def test_losses_deterministic_with_fixed_seed():
    def once(kind):
        student = make(3)
        torch.manual_seed(11)
        if kind == "pre":
            loss, stats = pretrain_loss(student, batch(), PretrainConfig(), _gen(5))
        else:
            loss, stats = finetune_loss(student, make_teacher(student), batch(), ft(), 2, _gen(5))
        loss.backward()
        return stats, student.encoders["audio"].proj.weight.grad

    for kind in ("pre", "fine"):
        (s1, g1), (s2, g2) = once(kind), once(kind)
        assert s1 == s2 and torch.equal(g1, g2)


def test_pseudo_view_dropped_answers_from_the_degraded_view():
    """FixMatch-style: the teacher labels the data, the student answers from fewer modalities;
    with nothing dropped both choices are the same loss."""
    student = make()
    teacher = make_teacher(student)
    b = batch(missing=0.0, label_ratio=0.25)

    def pseudo(view: str, drop: float) -> float:
        torch.manual_seed(0)
        cfg = ft(pseudo_view=view, drop_prob=drop, reconstruction=False)
        return finetune_loss(student.eval(), teacher, b, cfg, 1, _gen(5))[1]["pseudo"]

    assert pseudo("dropped", 0.0) == pytest.approx(pseudo("data", 0.0), abs=1e-6)
    assert pseudo("dropped", 0.9) != pytest.approx(pseudo("data", 0.9), abs=1e-6)
    grads = grads_after(lambda: finetune_loss(
        student.train(), teacher, b, ft(pseudo_view="dropped", reconstruction=False), 1,
        _gen()), student)
    assert all(grads[k] is None for k in grads if k.startswith("decoders."))


def test_graph_labels_fill_in_where_the_teacher_is_unsure():
    student = make()
    teacher = make_teacher(student)
    b = dict(batch(label_ratio=0.25))
    unlabeled = ~b["labeled"].bool()
    b["graph_labeled"] = unlabeled.clone()
    b["graph_labeled"][unlabeled.nonzero()[0]] = False  # one unlabeled row has none
    b["graph_label"] = torch.where(b["graph_labeled"], torch.full_like(b["label"], 2.0), 0.0)
    # tau = 1 keeps no teacher label: the pseudo term is the graph's alone
    _, graph = finetune_loss(student, teacher, b, ft(tau=1.0), 1, _gen())
    n_unlabeled = int(unlabeled.sum())
    assert graph["teacher_label_fraction"] == 0.0
    assert graph["pseudo_label_fraction"] == pytest.approx((n_unlabeled - 1) / n_unlabeled)
    assert graph["pseudo"] > 0
    _, off = finetune_loss(student, teacher, b, ft(tau=1.0, graph_labels=False), 1, _gen())
    assert off["pseudo_label_fraction"] == 0.0 and off["pseudo"] == 0.0
    # tau = 0: the teacher labels every row, and its labels win over the graph's
    torch.manual_seed(3)  # the same student dropout for both
    _, teacher_all = finetune_loss(student, teacher, b, ft(tau=0.0), 1, _gen())
    torch.manual_seed(3)
    _, teacher_only = finetune_loss(student, teacher, b, ft(tau=0.0, graph_labels=False), 1,
                                    _gen())
    assert teacher_all["pseudo"] == pytest.approx(teacher_only["pseudo"])
    assert teacher_all["teacher_label_fraction"] == 1.0
