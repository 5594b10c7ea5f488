"""Training objectives of both stages, as pure functions of (model, batch, config, generator).

All randomness (masks, dropped modalities, teacher views) is drawn from the ``generator`` passed
in, on CPU, then moved to the batch's device: the same seed gives the same masks on any device.
Only feature and mask keys are handed to the network (:func:`features`); labels enter through
the supervised term alone, and only where ``labeled`` is True.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslmm_ray.config import MODALITIES, FinetuneConfig, PretrainConfig
from sslmm_ray.train import distributed

Batch = Mapping[str, Tensor]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def _modalities(batch: Batch) -> list[str]:
    return [m for m in MODALITIES if f"{m}_mask" in batch]


def features(batch: Batch) -> dict[str, Tensor]:
    """The keys the network may see: features and masks, never ``label`` / ``labeled``."""
    return {k: batch[k] for m in _modalities(batch) for k in (m, f"{m}_mask")}


def presence(batch: Batch) -> Tensor:
    """(B, M) bool: modality has at least one observed frame."""
    return torch.stack([batch[f"{m}_mask"].any(dim=1) for m in _modalities(batch)], dim=1)


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator).to(device)


def _drop_keep_one(present: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Drop each present modality with ``prob``; if all of a row's were dropped, restore one.

    The restored modality is drawn uniformly among the row's present ones. Both random draws
    happen every call, so generator consumption does not depend on the data.
    """
    drop = present & (_rand(present.shape, generator, present.device) < prob)
    emptied = present.any(dim=1) & ~(present & ~drop).any(dim=1)
    score = _rand(present.shape, generator, present.device).masked_fill(~present, -1.0)
    restore = F.one_hot(score.argmax(dim=1), present.size(1)).bool() & emptied.unsqueeze(1)
    return drop & ~restore


def drop_modalities(
    batch: Batch, prob: float, generator: torch.Generator
) -> tuple[dict[str, Tensor], Tensor]:
    """Remove present modalities on purpose (keeping at least one per row).

    Returns a shallow copy of the batch whose dropped modalities have empty masks and zeroed
    features, and the (B, M) bool mask of what was dropped (always a subset of ``presence``).
    """
    dropped = _drop_keep_one(presence(batch), prob, generator)
    return _drop(batch, dropped), dropped


def _drop(batch: Batch, dropped: Tensor) -> dict[str, Tensor]:
    """A shallow copy of ``batch`` with the (B, M) ``dropped`` modalities removed."""
    out = dict(batch)
    for i, m in enumerate(_modalities(batch)):
        keep = ~dropped[:, i]
        out[f"{m}_mask"] = batch[f"{m}_mask"] & keep.unsqueeze(1)
        out[m] = batch[m].masked_fill(~keep.view(-1, 1, 1), 0.0)
    return out


def random_hide(
    batch: Batch,
    segments: Mapping[str, int],
    modality_prob: float,
    segment_prob: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Node-level masks for a masked view: whole modalities (>= 1 kept) and single segments."""
    mods = _modalities(batch)
    dropped = _drop_keep_one(presence(batch), modality_prob, generator)
    b = dropped.size(0)
    return {
        m: dropped[:, i : i + 1]
        | (_rand((b, segments[m]), generator, dropped.device) < segment_prob)
        for i, m in enumerate(mods)
    }


def _masked_mse(recon: Tensor, target: Tensor, select: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of per-segment MSE over selected segments, and their count (graph kept when empty)."""
    err = (recon.float() - target.float()).pow(2).mean(dim=-1)
    return (err * select).sum(), select.sum()


def _reconstruction(
    recon: Mapping[str, Tensor], targets: Mapping[str, Tensor], select: Mapping[str, Tensor],
    counts: Tensor, world: int,
) -> Tensor:
    """Mean over modalities (those with a selected segment) of the mean segment MSE.

    ``counts`` (M,) holds the selected segments per modality over the global batch (all
    ranks): this rank's sums are divided by them and scaled by ``world``, so that DDP's
    average of the ranks' gradients is the gradient of the global-batch term.
    """
    total = next(iter(recon.values())).new_zeros(())
    used = 0
    for i, (m, rec) in enumerate(recon.items()):
        err, _ = _masked_mse(rec, targets[m], select[m])
        total = total + err / counts[i].clamp(min=1)
        used += int(counts[i] > 0)
    return total * world / max(used, 1)


def contrastive(model: nn.Module, out, temperature: float) -> Tensor:
    """Symmetric InfoNCE between modality readouts of the same sample, per modality pair.

    Positives: the two modalities of one row; negatives: the other rows' readouts, on every
    rank: the projections of all ranks are gathered (with their gradients,
    :func:`~sslmm_ray.train.distributed.gather_rows`), each rank scores its own rows as
    anchors against all of them and divides its sum by the global row count times the world
    size, so that DDP's gradient average is the gradient of the global-batch InfoNCE and the
    mean over ranks of the returned values is its value. Only rows where both modalities are
    visible take part, and pairs with fewer than two such rows in the global batch are skipped
    (no negative). Readouts go through the shared projector and are L2-normalised.
    """
    mods = list(out.projected)
    z = torch.stack([F.normalize(out.projected[m].float(), dim=-1) for m in mods], dim=1)
    # one gather for features and visibility: (B, M, H + 1) -> (N, M, H + 1) over the ranks
    rows, mine = distributed.gather_rows(torch.cat([z, out.present.unsqueeze(-1).float()], -1))
    world = distributed.world_size()
    z_all, present = rows[..., :-1], rows[..., -1] > 0.5
    total, pairs = rows.sum() * 0.0, 0  # keeps every projection in the graph
    for i in range(len(mods)):
        for j in range(i + 1, len(mods)):
            both = present[:, i] & present[:, j]
            n = int(both.sum())
            if n < 2:
                continue
            zi, zj, anchors = z_all[both, i], z_all[both, j], mine[both]
            target = anchors.nonzero().squeeze(1)  # an anchor's positive is its own row
            logits = zi[anchors] @ zj.T / temperature
            logits_t = zj[anchors] @ zi.T / temperature
            ce = (F.cross_entropy(logits, target, reduction="sum")
                  + F.cross_entropy(logits_t, target, reduction="sum"))
            total = total + 0.5 * ce * world / n
            pairs += 1
    return total / max(pairs, 1)


def pretrain_loss(
    model: nn.Module, batch: Batch, cfg: PretrainConfig, generator: torch.Generator,
    hide: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Self-supervised loss: masked modality/segment reconstruction + cross-modal InfoNCE.

    One masked view per step: each present modality is hidden with ``mask_modality_prob``
    (>= 1 kept) and each segment with ``mask_segment_prob`` (``hide``, when given, replaces
    the draw: tests compare worker counts on the same masks). Hidden nodes carry the missing
    embedding and only receive messages; the decoders must rebuild their segment features
    from the rest (loss on hidden, observed segments only, as in masked autoencoders).
    InfoNCE aligns the readouts of the modalities visible in the view. Labels are never read.
    One forward computes the whole loss; the fusion and regression head are not run.

    ``loss = recon_weight * L_rec + contrastive_weight * L_nce``, both normalised over the
    global batch (all ranks; see :func:`finetune_loss`).
    """
    net = _unwrap(model)
    inputs = features(batch)
    if hide is None:
        hide = random_hide(inputs, net.segments, cfg.mask_modality_prob,
                           cfg.mask_segment_prob, generator)
    out = model(inputs, hide=hide, outputs=("recon", "projected"))
    select = {m: out.segment_valid[m] & hide[m] for m in out.recon}
    counts = distributed.global_sum(torch.stack([s.sum() for s in select.values()]))
    rec = _reconstruction(out.recon, out.targets, select, counts,
                          distributed.world_size())
    nce = contrastive(model, out, cfg.temperature)
    loss = cfg.recon_weight * rec + cfg.contrastive_weight * nce
    stats = {"loss": loss, "rec": rec, "nce": nce}
    stats = {k: float(v.detach()) for k, v in stats.items()}
    return loss, {**stats, "hidden_segments": float(counts.sum())}  # over the global batch


def rampup(epoch: int, epochs: int) -> float:
    """Sigmoid-shaped ramp ``exp(-5 (1 - t)^2)``, ``t = min(epoch / epochs, 1)`` (Laine & Aila)."""
    if epochs <= 0:
        return 1.0
    t = min(max(epoch / epochs, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@torch.no_grad()
def pseudo_labels(
    teacher: nn.Module,
    batch: Batch,
    views: int,
    modality_prob: float,
    segment_prob: float,
    kappa: float,
    generator: torch.Generator,
    label_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Teacher pseudo-labels and their confidence from ``views`` randomly perturbed views.

    The V views run as one batch of V * B rows. Each view hides modalities with
    ``modality_prob`` (>= 1 kept) and segments with ``segment_prob``, and runs the teacher with
    its dropout on (Monte-Carlo dropout): a sample with a single modality has no modality to
    hide, and without dropout its views would barely differ, so it would look the most
    certain exactly when it has the least evidence. With view predictions p_1..p_V:

        mu    = mean_v p_v                                 (the pseudo-label)
        sigma = std_v p_v  (population std)
        conf  = |mu| / (|mu| + sigma + kappa * label_scale)    in [0, 1)

    Confidence is high when the views agree (small sigma) on a score clearly away from the
    neutral 0 (large |mu|), i.e. when they agree on the sentiment sign. ``kappa`` is relative
    to ``label_scale`` (half the label range: 3 for MOSI/MOSEI, 1 for SIMS), so one threshold
    means the same on every data set; it keeps near-neutral predictions unconfident and makes
    conf < 1 strictly, so tau = 1 keeps nothing and tau = 0 keeps everything.
    """
    net = _unwrap(teacher)
    b = next(iter(batch.values())).size(0)
    inputs = {k: v.repeat(views, *([1] * (v.dim() - 1))) for k, v in features(batch).items()}
    hide = random_hide(inputs, net.segments, modality_prob, segment_prob, generator)
    was_training = teacher.training
    teacher.train()  # dropout on: Monte-Carlo views (the teacher has no batch statistics)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            preds = teacher(inputs, hide=hide, outputs=("pred",)).pred.float().view(views, b)
    finally:
        teacher.train(was_training)
    mu = preds.mean(dim=0)
    sigma = preds.std(dim=0, correction=0)
    return mu, mu.abs() / (mu.abs() + sigma + kappa * label_scale)


def _regression(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    return (pred - target).abs() if kind == "l1" else (pred - target).pow(2)


def finetune_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: Batch,
    cfg: FinetuneConfig,
    epoch: int,
    generator: torch.Generator,
    label_scale: float = 1.0,
    dropped: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Semi-supervised loss ``L_sup + w(epoch) * L_pseudo + lambda_rec * L_rec``.

    - ``L_sup``: L1 (or MSE, ``cfg.loss``) on labeled rows only.
    - ``L_pseudo`` (``cfg.pseudo_labels``): same loss against the teacher's pseudo-label on
      unlabeled rows whose confidence (:func:`pseudo_labels`) is >= ``tau``, and against the
      row's graph label (``graph_label``, :mod:`sslmm_ray.data.graph_labels`) on the others
      that have one (``cfg.graph_labels``); averaged over all unlabeled rows (rows with
      neither count as 0); ``w = unlabeled_weight * rampup``.
    - ``L_rec`` (``cfg.reconstruction``): present modalities are dropped on purpose with
      ``drop_prob`` (>= 1 kept) in a second view of the batch, and their segment features are
      rebuilt from the others. Zero when nothing was dropped. The supervised and pseudo-label
      terms read the batch as the data has it: computing them on the degraded view trains the
      regressor on more missingness than the test protocol has (measured: about 2 points of
      Non0_acc_2 lost on synthetic mosi, 3 seeds). ``dropped`` (B, M), when given, replaces
      the random draw of what to drop (tests compare worker counts on the same draws).

    One student forward computes the whole loss: when the dropped view is needed, it is
    concatenated to the batch along the batch dimension (2B rows; the network treats rows
    independently: no batch statistics) and the outputs are split. The network is asked only
    for what the loss reads (no reconstruction when nothing was dropped, never the contrastive
    projector), so under DDP with ``find_unused_parameters`` a part nothing read gets no
    gradient, as on one worker (``sslmm_ray.train.distributed``).

    Every mean is over the global batch: the counts (labeled rows, unlabeled rows, selected
    segments per modality) are summed over the ranks, and this rank's sums are divided by
    them and multiplied by the world size, so that DDP's average of the ranks' gradients is
    exactly the global-batch gradient (a rank without labeled rows adds nothing to the
    supervised term instead of diluting it). With one worker this is the plain per-batch
    mean. The returned stats are this rank's share times the world size: their mean over the
    ranks is the global-batch value.

    Unlabeled rows' ``label`` values are replaced by 0 before any arithmetic, so they cannot
    reach a loss or a gradient.
    """
    net = _unwrap(student)
    world = distributed.world_size()
    inputs = features(batch)
    b = batch["labeled"].size(0)
    reconstruct = cfg.reconstruction and cfg.lambda_rec > 0 and bool(getattr(net, "decoders", {}))

    labeled = batch["labeled"].bool()
    unlabeled = (~labeled).nonzero().squeeze(1)
    use_pseudo = cfg.pseudo_labels and teacher is not None
    mu = conf = None
    if use_pseudo and unlabeled.numel():
        sub = {k: v[unlabeled] for k, v in inputs.items()}
        mu, conf = pseudo_labels(teacher, sub, cfg.views, cfg.view_mask_prob,
                                 cfg.view_segment_prob, cfg.confidence_kappa, generator,
                                 label_scale)

    # The purposely degraded view: reconstruction's input and, with pseudo_view="dropped",
    # the student's side of the pseudo-label term.
    on_dropped = use_pseudo and cfg.pseudo_view == "dropped"
    view = None
    if reconstruct or on_dropped:
        if dropped is None:
            view, dropped = drop_modalities(inputs, cfg.drop_prob, generator)
        else:
            view = _drop(inputs, dropped)
    read_recon = reconstruct and dropped is not None and bool(dropped.any())
    two_views = on_dropped or read_recon
    student_inputs = ({k: torch.cat([v, view[k]]) for k, v in inputs.items()}
                      if two_views else inputs)
    out = student(student_inputs, outputs=("pred", "recon") if read_recon else ("pred",))
    pred = out.pred.float()
    pred_data, pred_view = pred[:b], (pred[b:] if two_views else None)

    select = None
    if reconstruct:
        assert dropped is not None
        select = {m: out.segment_valid[m][:b] & dropped[:, i : i + 1]
                  for i, m in enumerate(net.modalities)}
    counts = distributed.global_sum(torch.stack([
        labeled.sum(), unlabeled.new_tensor(unlabeled.numel()),
        *([s.sum() for s in select.values()] if select is not None else []),
    ]))

    target = torch.where(labeled, batch["label"].to(pred.dtype), torch.zeros_like(pred_data))
    sup = (_regression(pred_data, target, cfg.loss) * labeled).sum() * world / counts[0].clamp(
        min=1)
    loss = sup
    stats = {"sup": float(sup.detach()), "labeled": float(counts[0])}  # global batch

    if use_pseudo:
        weight = cfg.unlabeled_weight * rampup(epoch, cfg.rampup_epochs)
        if mu is not None and conf is not None:
            confident = conf >= cfg.tau
            keep, target_u = confident, mu.float()
            if cfg.graph_labels and "graph_labeled" in batch:
                # the graph's label where the teacher is unsure (sslmm_ray.data.graph_labels)
                graph = batch["graph_labeled"][unlabeled].bool() & ~confident
                target_u = torch.where(graph, batch["graph_label"][unlabeled].float(), target_u)
                keep = confident | graph
            student_pred = (pred_view if on_dropped else pred_data)[unlabeled]
            pseudo = ((_regression(student_pred, target_u, cfg.loss) * keep).sum() * world
                      / counts[1].clamp(min=1))
            share = world / float(counts[1])  # of the global batch's unlabeled rows
            stats.update(pseudo_label_fraction=float(keep.float().sum()) * share,
                         teacher_label_fraction=float(confident.float().sum()) * share,
                         confidence=float(conf.float().sum()) * share)
        else:
            pseudo = pred.new_zeros(())
            stats.update(pseudo_label_fraction=0.0, teacher_label_fraction=0.0,
                         confidence=0.0)
        loss = loss + weight * pseudo
        stats.update(pseudo=float(pseudo.detach()), unlabeled_weight=weight)

    if reconstruct:
        assert dropped is not None and select is not None
        if read_recon:
            recon = {m: r[b:] for m, r in out.recon.items()}
            targets = {m: t[:b] for m, t in out.targets.items()}
            rec = _reconstruction(recon, targets, select, counts[2:], world)
        else:
            rec = pred.new_zeros(())
        loss = loss + cfg.lambda_rec * rec
        stats.update(rec=float(rec.detach()), dropped=float(dropped.float().sum(dim=1).mean()))

    stats["loss"] = float(loss.detach())
    return loss, stats
