"""The losses themselves: ``kd_loss`` (the soft term over the k+1 bins), ``hard_ce`` (the hard-label term) and
``distill_loss`` (their mix, which routes the default loss to the closed-form gradient of ``fused``).

The package docstring (``stages/losses/__init__.py``) defines the bins and the divergences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bins import _k1_bins, _normalise, student_bins, teacher_bins
from .checks import _check_id_range, _check_shapes, _labelled
from .divergences import _denominator, _divergence, _mean_nll
from .fused import distill_fused
from .options import check_loss_options

__all__ = ["distill_loss", "hard_ce", "kd_loss"]


def kd_loss(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    *,
    kind: str = "forward-kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    position_mask: Tensor | None = None,
    target_mask: Tensor | None = None,
    tail: str = "bin",
    student_lse: Tensor | None = None,
    count: float | None = None,
) -> Tensor:
    """The distillation loss against cached soft targets, over the k+1 bins.

    The per-position divergence (``kind``, see the package docstring for the definitions) between the teacher's
    bins p and the student's bins q, summed over the valid positions, divided by their number (or by ``count``)
    and multiplied by T^2.

    The teacher's bins are rescaled jointly to sum to exactly 1 before use. That only absorbs the rounding of
    float16-stored log-probs against a tail measured from unquantised values (a relative change of ~1e-3 at most);
    the tail keeps its share, so this is not the top-k renormalisation. Where the row's kept ids cover the whole
    vocabulary the tail bin does not exist and the teacher's (rounding-level) tail is dropped.

    Args:
        student_logits: (N, V) any float dtype: student logits at the N positions; computed in float32.
        target_ids: (N, K) integer: the teacher's kept ids (distinct within a row's valid slots).
        target_logprobs: (N, K) float: teacher log-probs at temperature T, normalised over the full vocabulary.
        tail_mass: (N,) float: 1 - sum of the kept teacher probabilities.
        kind: one of ``LOSS_KINDS``.
        temperature: T > 0, the temperature the targets were made at; the student is softened by the same T.
        beta: the mixture weight: jsd needs 0 < beta < 1; skew-kl/skew-rkl need 0 <= beta < 1 (0 gives the plain
            forward/reverse KL); other kinds ignore it.
        position_mask: (N,) bool or None: False = a padding position, excluded from the mean. None: all valid.
        target_mask: (N, K) bool or None: False = a padding slot of a ragged row. None: all slots real.
        tail: "bin" (default): the k+1 bins, unbiased to the tail. "renormalise": the usual biased baseline,
            renormalise BOTH teacher and student over the kept ids and drop the tail; for comparison only.
        student_lse: (N,) float32 or None: logsumexp(student_logits / T), if the caller already computed it.
        count: divide the sum by this instead of the number of valid positions: for exact token weighting, the
            valid positions of the whole optimizer step (every micro-batch, every rank; ``stages.weighting``).
            The result is then this call's share of the step's mean, and the shares add up. 1: the sum.

    Returns:
        () float32 scalar: the loss, T^2 * (sum over valid positions) / (their number, or ``count``). 0 (still
        attached to the graph) when no position is valid.

    Raises:
        ValueError: an unknown kind or tail mode, a beta out of range for the kind, T <= 0, shapes that do not
            agree, non-integer ids, or a valid kept id outside [0, V).
    """
    problems = check_loss_options(kind, temperature, beta, tail)
    if problems:
        raise ValueError("; ".join(problems))
    _check_shapes(student_logits, target_ids, target_logprobs, tail_mass, position_mask, target_mask)
    if position_mask is not None:
        # Select before any work: padding rows may hold junk ids, and they cost nothing this way.
        student_logits, target_ids, target_logprobs, tail_mass = (
            student_logits[position_mask],
            target_ids[position_mask],
            target_logprobs[position_mask],
            tail_mass[position_mask],
        )
        target_mask = target_mask[position_mask] if target_mask is not None else None
        student_lse = student_lse[position_mask] if student_lse is not None else None
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    _check_id_range(target_ids, target_mask, student_logits.shape[1])

    log_q_kept, log_q_tail = student_bins(student_logits, target_ids, target_mask, temperature, student_lse)
    log_p_kept, log_p_tail = teacher_bins(target_logprobs, tail_mass, target_mask)
    if tail == "bin":
        log_p, log_q = _k1_bins(log_p_kept, log_p_tail, log_q_kept, log_q_tail)
    else:
        log_p, log_q = _normalise(log_p_kept), _normalise(log_q_kept)  # (N, K): the biased baseline

    per_position = _divergence(kind, log_p, log_q, beta)  # (N,)
    return per_position.sum() / _denominator(count, per_position.shape[0]) * temperature**2


def hard_ce(
    student_logits: Tensor, labels: Tensor, position_mask: Tensor | None = None, *, count: float | None = None
) -> Tensor:
    """Cross-entropy against hard labels at temperature 1, summed over the valid positions and divided by their
    number (or by ``count``).

    Args:
        student_logits: (N, C) any float dtype; computed in float32.
        labels: (N,) integer: the true class/token; a negative label (the usual -100) marks a position to ignore.
        position_mask: (N,) bool or None: False = a padding position, excluded. None: all valid.
        count: divide by this instead of the number of valid positions (as in ``kd_loss``).

    Returns:
        () float32 scalar; 0 (still attached to the graph) when no position is valid.

    Raises:
        ValueError: shapes that do not agree, non-integer labels, or a label >= C.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (N, C), got shape {tuple(student_logits.shape)}")
    valid = _labelled(labels, student_logits.shape, position_mask)
    if not bool(valid.any()):
        return student_logits.float().sum() * 0.0
    denominator = _denominator(count, int(valid.sum()))
    if bool(valid.all()):  # no (N, C) copy for the common case
        return F.cross_entropy(student_logits.float(), labels.long(), reduction="sum") / denominator
    return F.cross_entropy(student_logits[valid].float(), labels[valid].long(), reduction="sum") / denominator


def distill_loss(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    kind: str = "forward-kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    position_mask: Tensor | None = None,
    target_mask: Tensor | None = None,
    tail: str = "bin",
    kd_count: float | None = None,
    ce_count: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The classic mix: alpha * kd_loss + (1 - alpha) * hard_ce.

    Args:
        student_logits: (N, V) any float dtype.
        target_ids, target_logprobs, tail_mass, kind, temperature, beta, position_mask, target_mask, tail: as in
            ``kd_loss``.
        labels: (N,) integer hard labels; negative = no label at that position (as in ``hard_ce``).
        alpha: the weight of the soft term, in [0, 1].
        kd_count: the soft term's denominator (``kd_loss``'s ``count``): default, its valid positions here.
        ce_count: the hard term's denominator (``hard_ce``'s ``count``): default, its labelled positions here.
            The two differ where positions have targets but no label. For exact token weighting pass the whole
            optimizer step's counts (``stages.weighting``): the loss and the parts are then this call's shares of
            the step's, which add up over its micro-batches and ranks.

    Returns:
        loss: () float32 scalar, the total.
        parts: {"loss", "kd", "ce"} as Python floats, for logging (this synchronises with the device).

    Raises:
        ValueError: alpha outside [0, 1], or anything ``kd_loss`` or ``hard_ce`` rejects.
    """
    problems = check_loss_options(kind, temperature, beta, tail, alpha)
    if problems:  # here, before routing: the fused path takes no options it would check itself
        raise ValueError("; ".join(problems))
    per_row = student_logits.dim() == 2 and labels.shape == student_logits.shape[:1]  # (N, V) logits, (N,) labels
    if per_row and kind == "forward-kl" and tail == "bin" and position_mask is None:
        return distill_fused(
            student_logits,
            target_ids,
            target_logprobs,
            tail_mass,
            labels,
            alpha,
            temperature,
            target_mask,
            (kd_count, ce_count),
        )
    if per_row and temperature == 1.0:
        return _distill_shared(
            student_logits,
            target_ids,
            target_logprobs,
            tail_mass,
            labels,
            alpha=alpha,
            kind=kind,
            beta=beta,
            position_mask=position_mask,
            target_mask=target_mask,
            tail=tail,
            counts=(kd_count, ce_count),
        )
    kd = kd_loss(
        student_logits,
        target_ids,
        target_logprobs,
        tail_mass,
        kind=kind,
        temperature=temperature,
        beta=beta,
        position_mask=position_mask,
        target_mask=target_mask,
        tail=tail,
        count=kd_count,
    )
    ce = hard_ce(student_logits, labels, position_mask, count=ce_count)
    loss = alpha * kd + (1.0 - alpha) * ce
    return loss, {"loss": float(loss.detach()), "kd": float(kd.detach()), "ce": float(ce.detach())}


def _distill_shared(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    kind: str,
    beta: float,
    position_mask: Tensor | None,
    target_mask: Tensor | None,
    tail: str,
    counts: tuple[float | None, float | None],
) -> tuple[Tensor, dict[str, float]]:
    """distill_loss at T = 1: the soft and the hard term share one logsumexp over the vocabulary.

    At T = 1 both terms need logsumexp(z) over (N, V); computing it once makes the whole distillation loss cost
    about what the hard-label cross-entropy alone costs (the kept ids and the tail are O(N K)).
    """
    z = student_logits.float()  # (N, V)
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    kd = kd_loss(
        z,
        target_ids,
        target_logprobs,
        tail_mass,
        kind=kind,
        temperature=1.0,
        beta=beta,
        position_mask=position_mask,
        target_mask=target_mask,
        tail=tail,
        student_lse=lse,
        count=counts[0],
    )
    ce = _mean_nll(z, lse, labels, _labelled(labels, z.shape, position_mask), counts[1])
    loss = alpha * kd + (1.0 - alpha) * ce
    return loss, {"loss": float(loss.detach()), "kd": float(kd.detach()), "ce": float(ce.detach())}
