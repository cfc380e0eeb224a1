"""The teacher's and the student's k+1 bins, in log space, and the targets made from sampled ids.

Bin i < K is "the token is kept id i", bin K "the token is any other id". The teacher's bins are read as stored;
the student's come from its full softmax, the tail bin as a log-sum-exp over the unkept ids where it is small
(never as ``1 - sum``, which cancels catastrophically there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .options import PRECISE_TAIL

__all__ = ["hybrid_targets", "sampled_targets", "student_bins", "teacher_bins"]


def student_bins(
    student_logits: Tensor,
    target_ids: Tensor,
    target_mask: Tensor | None,
    temperature: float,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The student's k+1 bins at temperature T, in log space.

    Args:
        student_logits: (N, V) any float dtype: raw student logits; computed in float32.
        target_ids: (N, K) integer: the teacher's kept ids per row, distinct within a row's valid slots.
        target_mask: (N, K) bool or None: True = a real slot; False = a padding slot of a ragged row (its id is
            ignored, whatever it holds). None: every slot is real.
        temperature: T > 0.
        lse: (N,) float32 or None: logsumexp(student_logits / T) over V, when the caller already has it (the
            hard-label cross-entropy at T = 1 needs the same one).

    Returns:
        log_q_kept: (N, K) float32: log softmax(student_logits / T) at the kept ids; -inf on masked slots.
        log_q_tail: (N,) float32: log of the student's mass on every id that is not among the row's valid kept
            ids; -inf where those ids cover the whole vocabulary.

    The tail costs O(N K) where it is large: log(1 - sum of the kept probabilities), whose float32 rounding
    (~1e-7 absolute) is negligible against a tail above ``PRECISE_TAIL``. Rows with a smaller tail (a confident
    student) get the exact value, logsumexp over the unkept ids minus the full logsumexp, computed on those
    rows only, so it stays accurate far below float32 eps without a second pass over every (N, V) logit.
    """
    ids, mask = _ids_and_mask(target_ids, target_mask)
    z = student_logits.float()  # (N, V) float32: bf16 logits lose too much in the tail sums
    if temperature != 1.0:
        z = z / temperature
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)  # (N,)
    log_q_kept = (z.gather(1, ids) - lse[:, None]).masked_fill(~mask, -math.inf)  # (N, K)
    kept_mass = log_q_kept.exp().sum(dim=-1)  # (N,)
    log_q_tail = torch.log1p(-kept_mass.clamp(max=1.0 - PRECISE_TAIL))  # (N,), exact enough above the bound
    precise = (1.0 - kept_mass.detach()) < PRECISE_TAIL
    if bool(precise.any()):
        rows = precise.nonzero()[:, 0]
        log_q_tail = log_q_tail.index_put((rows,), _exact_tail(z[rows], ids[rows], mask[rows], lse[rows]))
    return log_q_kept, log_q_tail


def _exact_tail(z: Tensor, ids: Tensor, mask: Tensor, lse: Tensor) -> Tensor:
    """log of the mass outside the valid kept ids, as logsumexp over the unkept logits - lse: (R, V) -> (R,)."""
    # kept[n, v]: v is a valid kept id of row n. Padding slots write into a spare column V, so a junk id that
    # repeats a real one cannot clear it; bool, not int, because this is as large as the logits.
    n, v = z.shape
    slots = torch.where(mask, ids, v)  # (R, K)
    kept = torch.zeros(n, v + 1, dtype=torch.bool, device=z.device).scatter_(1, slots, True)[:, :v]  # (R, V)
    covered = kept.all(dim=-1)  # (R,): no tail bin at all
    # Rows whose ids cover everything keep finite logits here: a logsumexp over all -inf has a NaN gradient even
    # where its value is discarded below.
    lse_tail = torch.logsumexp(z.masked_fill(kept & ~covered[:, None], -math.inf), dim=-1)  # (R,)
    return torch.where(covered, -math.inf, lse_tail - lse)


def teacher_bins(target_logprobs: Tensor, tail_mass: Tensor, target_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The teacher's k+1 bins, in log space, as stored.

    Args:
        target_logprobs: (N, K) float16/bfloat16/float32: the teacher's log softmax(logits / T) at the kept ids,
            normalised over the FULL vocabulary (never over the top-k). May be -inf (e.g. an id sampled 0 times).
        tail_mass: (N,) float: 1 - sum of the kept probabilities. Values <= 0 (float rounding of a tail below
            float32 eps) read as an empty tail.
        target_mask: (N, K) bool or None: True = a real slot; None = all real.

    Returns:
        log_p_kept: (N, K) float32: the stored log-probs; -inf on masked slots.
        log_p_tail: (N,) float32: log(tail_mass); -inf where the tail is 0.
    """
    log_p_kept = target_logprobs.float()
    if target_mask is not None:
        log_p_kept = log_p_kept.masked_fill(~target_mask, -math.inf)
    log_p_tail = torch.log(tail_mass.float().clamp_min(0.0))  # log(0) = -inf: an empty bin, handled downstream
    return log_p_kept, log_p_tail


def sampled_targets(counts: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """Targets from ids sampled with replacement from the teacher (at temperature T), stored as counts.

    Pass the results to ``kd_loss`` as ``target_logprobs`` and ``tail_mass``. The empirical distribution
    p̂ = count / num_samples has E[p̂] = p, so with ``kind="forward-kl"`` the loss is an unbiased estimate of the
    dense forward KL up to a student-independent constant (the cross-entropy -sum p log q is linear in p; only the
    teacher's entropy term, which has no gradient, is biased), and its gradient is unbiased. reverse-kl, jsd, skew
    and tvd are not linear in p and are biased with these targets (see ``UNBIASED_WITH_SAMPLES``).

    Args:
        counts: (N, K) integer: how often each kept id was drawn; 0 for a padding slot. Each row sums to
            num_samples (or to 0 for a padding row, which ``kd_loss``'s position_mask must then exclude).
        num_samples: N, the number of draws per position (> 0).

    Returns:
        log_p_kept: (N, K) float32: log(count / num_samples); -inf where the count is 0.
        tail_mass: (N,) float32: zeros; every draw landed on a stored id, so there is no tail.

    Raises:
        ValueError: counts is not a 2-D integer tensor, num_samples < 1, a count is negative, or a row sums to
            something other than num_samples or 0.
    """
    if counts.dim() != 2 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"counts must be an (N, K) integer tensor, got {tuple(counts.shape)} {counts.dtype}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    counts = counts.long()
    sums = counts.sum(dim=-1)
    if bool((counts < 0).any()) or bool(((sums != num_samples) & (sums != 0)).any()):
        raise ValueError(
            f"every count must be >= 0 and every row must sum to num_samples={num_samples} (or 0 for padding); "
            f"got row sums {sorted(set(sums.tolist()))[:8]} and min count {int(counts.min())}"
        )
    log_p_kept = torch.log(counts.float() / num_samples)  # log(0) = -inf for ids never drawn
    return log_p_kept, torch.zeros(counts.shape[0], dtype=torch.float32, device=counts.device)


def hybrid_targets(
    target_ids: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    tail_ids: Tensor,
    tail_counts: Tensor,
    num_samples: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Targets from a hybrid store: the exact top-k, plus ids drawn from the teacher restricted to the other ids.

    Pass the results to ``kd_loss`` / ``distill_loss`` as ``target_ids``, ``target_logprobs``, ``target_mask`` and
    ``tail_mass`` (what ``data.dataset.collate`` builds for a batch). The teacher's probability of a kept id i is
    exp(lp_i), exactly; of a drawn id j, p̂_j = tail_mass * count_j / num_samples, whose expectation over the draws
    is tail_mass * p_j / tail_mass = p_j. So p̂ is an unbiased estimate of the teacher's distribution with an exact
    head, and ``kind="forward-kl"`` (its student-dependent part, -sum p̂ log q, is linear in p̂) has an unbiased
    value up to a student-independent constant and an unbiased gradient. The constant is the plug-in sum p̂ log p̂,
    which the loss's value includes (as for sampled targets): it differs from the teacher's sum p log p (biased),
    with no gradient. reverse-kl, jsd, skew and tvd are not linear in p̂ and are biased with these targets.

    Args:
        target_ids: (N, K) integer: the top-k ids.
        target_logprobs: (N, K) float: their log-probs at T over the full vocabulary.
        tail_mass: (N,) float: 1 - the kept mass, exact.
        tail_ids: (N, U) integer: each row's ids drawn from its tail (distinct from its top-k ids); any value on a
            padding slot.
        tail_counts: (N, U) integer: how often each was drawn; 0 on a padding slot. Each row sums to num_samples,
            or to 0 where the row's tail is 0 (no draws) or the row is padding.
        num_samples: N, the draws per row (> 0).

    Returns:
        ids: (N, K + U) int64: the top-k ids, then the tail ids (0 on padding slots).
        log_p: (N, K + U) float32: the top-k log-probs, then log(tail_mass * count / num_samples) (-inf on padding).
        mask: (N, K + U) bool: True on the K head slots and the real tail slots.
        tail: (N,) float32 zeros: the draws carry the tail's mass, so there is no tail bin.

    Raises:
        ValueError: shapes that do not agree, non-integer counts, a negative count, or a row of counts that sums to
            something other than num_samples or 0.
    """
    n, k = target_ids.shape
    if tail_ids.shape != tail_counts.shape or tail_ids.shape[0] != n or tail_mass.shape != (n,):
        raise ValueError(
            f"hybrid targets need (N, K) top-k, (N,) tail_mass and (N, U) tail ids and counts, got "
            f"{tuple(target_ids.shape)}, {tuple(tail_mass.shape)}, {tuple(tail_ids.shape)}, {tuple(tail_counts.shape)}"
        )
    if tail_counts.dtype.is_floating_point or tail_counts.dtype == torch.bool or num_samples < 1:
        raise ValueError(f"tail_counts must be integers and num_samples >= 1, got {tail_counts.dtype}, {num_samples}")
    counts = tail_counts.long()
    sums = counts.sum(dim=-1)
    if bool((counts < 0).any()) or bool(((sums != num_samples) & (sums != 0)).any()):
        raise ValueError(f"every row of tail_counts must sum to num_samples={num_samples} or to 0")
    mask = counts > 0  # (N, U)
    weight = tail_mass.double()[:, None] * counts.double() / num_samples  # float64: a tiny tail stays above 0
    log_tail = torch.log(weight).float().masked_fill(~mask, -math.inf)  # (N, U)
    ids = torch.cat([target_ids.long(), tail_ids.long().masked_fill(~mask, 0)], dim=1)
    log_p = torch.cat([target_logprobs.float(), log_tail], dim=1)
    full = torch.cat([torch.ones(n, k, dtype=torch.bool, device=mask.device), mask], dim=1)
    return ids, log_p, full, torch.zeros(n, dtype=torch.float32, device=tail_mass.device)


def _k1_bins(log_p_kept: Tensor, log_p_tail: Tensor, log_q_kept: Tensor, log_q_tail: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student as (N, K+1) log-space bins: the teacher's rescaled to sum to 1, and its tail dropped in
    rows where the kept ids cover the vocabulary (the student has no tail bin there); the student's as they are."""
    log_p_tail = log_p_tail.masked_fill(torch.isneginf(log_q_tail), -math.inf)  # no tail bin: ids cover V
    log_p = _normalise(torch.cat([log_p_kept, log_p_tail[:, None]], dim=1))  # (N, K+1)
    log_q = torch.cat([log_q_kept, log_q_tail[:, None]], dim=1)  # (N, K+1), sums to 1 already
    return log_p, log_q


def _normalise(log_w: Tensor) -> Tensor:
    """Rescale each row of log-weights (N, B) to sum to 1; a row with no mass at all stays all -inf."""
    lse = torch.logsumexp(log_w, dim=-1, keepdim=True)  # (N, 1)
    return log_w - torch.where(torch.isneginf(lse), 0.0, lse)


def _ids_and_mask(target_ids: Tensor, target_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """int64 ids with padding slots pointed at id 0 (safe for gather), and a full (N, K) bool mask."""
    mask = target_mask if target_mask is not None else torch.ones_like(target_ids, dtype=torch.bool)
    return target_ids.long().masked_fill(~mask, 0), mask
