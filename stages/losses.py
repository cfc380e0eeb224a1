"""Distillation losses over the k+1 bins: the teacher's kept ids, plus one tail bin for the rest of the mass.

A store keeps, per position, the teacher's top-k ids, their log-probabilities at temperature T normalised over
the *full* vocabulary, and the exact tail mass ``1 - sum(kept probabilities)``. These losses compare teacher and
student on exactly that information: k+1 bins, where bin i < k is "the token is kept id i" and bin k is "the token
is anything else". The student's bins come from its full softmax: its probability of each kept id, and its total
probability of every other id (computed as a log-sum-exp over the unkept ids, never as ``1 - sum``, which cancels
catastrophically when the tail is tiny). Coarsening both distributions the same way is a data-processing step,
so every divergence here is a true divergence between two distributions, zero exactly when the student's bins
match the teacher's, and with k = V (every id kept, tail 0) it equals the dense loss exactly.

Why not renormalise the top-k, as most offline-KD code does? Renormalising tells the student the teacher put
*all* its mass on the k kept ids, which is false: on a real teacher top-32 holds ~85% of the mass at T=1 and ~20%
at T=2. The student is then pushed to empty its tail, the loss is biased, and "Sparse Logit Sampling" (Anshumann
et al., 2025) measured top-k renormalised KD doing worse than no KD at small k. ``tail="renormalise"`` exists only
to measure that baseline.

Divergences, with p the teacher's bins and q the student's (all in nats, 0·log 0 = 0):

    forward-kl  KL(p || q) = sum p (log p - log q)                      (Hinton et al., 2015)
    reverse-kl  KL(q || p)
    jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, beta in (0, 1)  (TRL's GKD)
    skew-kl     KL(p || beta p + (1 - beta) q), beta in [0, 1)         (DistiLLM)
    skew-rkl    KL(q || beta q + (1 - beta) p), beta in [0, 1)
    tvd         0.5 sum |p - q|

Each is averaged over valid positions and multiplied by T^2, which keeps the gradient's scale independent of T.

Sampled targets (``sampled_targets``): ids drawn with replacement from the teacher, stored as counts. Their
empirical distribution p̂ = count / N has E[p̂] = p, and the forward KL's student-dependent part, the cross-entropy
-sum p log q, is linear in p, so forward-kl on sampled targets is an unbiased estimate of the dense forward KL up
to a student-independent constant (its gradient is unbiased). The other divergences are not linear in p and are
biased with sampled targets: ``UNBIASED_WITH_SAMPLES`` lists the kinds that are not.

Everything is computed in float32 and in log space: mixtures use ``logaddexp``, and empty bins (masked slots, a
zero tail) are excluded before they can reach an ``exp`` or a gradient, so no input here makes a NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_KINDS",
    "TAIL_MODES",
    "UNBIASED_WITH_SAMPLES",
    "distill_loss",
    "hard_ce",
    "kd_loss",
    "sampled_targets",
    "student_bins",
    "teacher_bins",
]

LOSS_KINDS = ("forward-kl", "reverse-kl", "jsd", "skew-kl", "skew-rkl", "tvd")
"""The divergences ``kd_loss`` knows, by the name the CLI and the train config use."""

UNBIASED_WITH_SAMPLES = ("forward-kl",)
"""Kinds whose loss on ``sampled_targets`` is an unbiased estimate (up to a constant) of the dense loss."""

TAIL_MODES = ("bin", "renormalise")
"""bin: the k+1-bin loss (unbiased to the tail); renormalise: the biased top-k baseline, for comparison only."""

# An empty bin in the *reference* side of a KL (q = 0 under p > 0 in forward KL, p = 0 under q > 0 in reverse KL)
# makes the divergence +inf. That happens when float32 rounding turned a tiny teacher tail into 0 (the labeler
# measures 1 - sum(kept) no finer than float32 eps) or a sampled target never drew some id. We read such a bin as
# holding float32 eps, the resolution the tail was measured at: the loss stays finite, and the student is still
# pushed hard to empty that bin, instead of one row turning the whole batch's gradient into NaN.
_LOG_EMPTY_BIN = math.log(torch.finfo(torch.float32).eps)
# Below this student tail mass, log(1 - kept) loses relative precision in float32 (kept-mass rounding grows
# with the logits' scale, ~1e-6 absolute): such rows get the exact masked logsumexp instead.
_PRECISE_TAIL = 1e-2


# ---------------------------------------------------------------------------------------------------- bins


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
    (~1e-7 absolute) is negligible against a tail above ``_PRECISE_TAIL``. Rows with a smaller tail (a confident
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
    log_q_tail = torch.log1p(-kept_mass.clamp(max=1.0 - _PRECISE_TAIL))  # (N,), exact enough above the bound
    precise = (1.0 - kept_mass.detach()) < _PRECISE_TAIL
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


# ---------------------------------------------------------------------------------------------------- losses


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
) -> Tensor:
    """The distillation loss against cached soft targets, over the k+1 bins.

    The per-position divergence (``kind``, see the module docstring for the definitions) between the teacher's
    bins p and the student's bins q, averaged over the valid positions and multiplied by T^2.

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

    Returns:
        () float32 scalar: the loss, T^2 * mean over valid positions. 0 (still attached to the graph) when no
        position is valid.

    Raises:
        ValueError: an unknown kind or tail mode, a beta out of range for the kind, T <= 0, shapes that do not
            agree, non-integer ids, or a valid kept id outside [0, V).
    """
    _check_options(kind, temperature, beta, tail)
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
    return per_position.mean() * temperature**2


def hard_ce(student_logits: Tensor, labels: Tensor, position_mask: Tensor | None = None) -> Tensor:
    """Cross-entropy against hard labels at temperature 1, averaged over the valid positions.

    Args:
        student_logits: (N, C) any float dtype; computed in float32.
        labels: (N,) integer: the true class/token; a negative label (the usual -100) marks a position to ignore.
        position_mask: (N,) bool or None: False = a padding position, excluded. None: all valid.

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
    if bool(valid.all()):  # no (N, C) copy for the common case
        return F.cross_entropy(student_logits.float(), labels.long())
    return F.cross_entropy(student_logits[valid].float(), labels[valid].long())


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
) -> tuple[Tensor, dict[str, float]]:
    """The classic mix: alpha * kd_loss + (1 - alpha) * hard_ce.

    Args:
        student_logits: (N, V) any float dtype.
        target_ids, target_logprobs, tail_mass, kind, temperature, beta, position_mask, target_mask, tail: as in
            ``kd_loss``.
        labels: (N,) integer hard labels; negative = no label at that position (as in ``hard_ce``).
        alpha: the weight of the soft term, in [0, 1].

    Returns:
        loss: () float32 scalar, the total.
        parts: {"loss", "kd", "ce"} as Python floats, for logging (this synchronises with the device).

    Raises:
        ValueError: alpha outside [0, 1], or anything ``kd_loss`` or ``hard_ce`` rejects.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (1 = soft targets only, 0 = hard labels only), got {alpha}")
    per_row = student_logits.dim() == 2 and labels.shape == student_logits.shape[:1]  # (N, V) logits, (N,) labels
    if per_row and kind == "forward-kl" and tail == "bin" and position_mask is None:
        from .fused_loss import distill_fused  # imports this module: loaded on first use

        return distill_fused(
            student_logits, target_ids, target_logprobs, tail_mass, labels, alpha, temperature, target_mask
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
    )
    ce = hard_ce(student_logits, labels, position_mask)
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
    )
    ce = _mean_nll(z, lse, labels, _labelled(labels, z.shape, position_mask))
    loss = alpha * kd + (1.0 - alpha) * ce
    return loss, {"loss": float(loss.detach()), "kd": float(kd.detach()), "ce": float(ce.detach())}


# ---------------------------------------------------------------------------------------------------- divergences


def _divergence(kind: str, log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Per-row divergence between two binned distributions given in log space: (N, B) float32 each -> (N,)."""
    if kind == "forward-kl":
        return _kl(log_p, log_q)
    if kind == "reverse-kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if kind == "skew-kl":
        return _kl(log_p, _log_mix(log_p, log_q, beta))
    if kind == "skew-rkl":
        return _kl(log_q, _log_mix(log_q, log_p, beta))
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)  # exp(-inf) = 0, with a zero gradient
    raise AssertionError(f"unreachable: kind {kind!r} passed validation")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum a (log a - log b) per row, with 0 log 0 = 0: (N, B), (N, B) -> (N,).

    Bins where a is empty are replaced by finite values *before* the arithmetic, not after: a masked-out
    ``0 * -inf`` still sends NaN into the backward pass.
    """
    live = ~torch.isneginf(log_a)
    log_b = torch.where(torch.isneginf(log_b), _LOG_EMPTY_BIN, log_b)  # see _LOG_EMPTY_BIN
    safe_a = torch.where(live, log_a, 0.0)
    safe_b = torch.where(live, log_b, 0.0)
    return torch.where(live, safe_a.exp() * (safe_a - safe_b), 0.0).sum(dim=-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(weight * a + (1 - weight) * b), elementwise, for weight in [0, 1)."""
    if weight == 0.0:
        return log_b
    both_empty = torch.isneginf(log_a) & torch.isneginf(log_b)
    # logaddexp(-inf, -inf) has a NaN gradient; feed it zeros there and put the -inf back afterwards.
    mixed = torch.logaddexp(
        torch.where(both_empty, 0.0, log_a) + math.log(weight),
        torch.where(both_empty, 0.0, log_b) + math.log1p(-weight),
    )
    return torch.where(both_empty, -math.inf, mixed)


def _normalise(log_w: Tensor) -> Tensor:
    """Rescale each row of log-weights (N, B) to sum to 1; a row with no mass at all stays all -inf."""
    lse = torch.logsumexp(log_w, dim=-1, keepdim=True)  # (N, 1)
    return log_w - torch.where(torch.isneginf(lse), 0.0, lse)


# ---------------------------------------------------------------------------------------------------- validation


def _check_options(kind: str, temperature: float, beta: float, tail: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(LOSS_KINDS)}; got {kind!r}")
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be 'bin' (the k+1-bin loss) or 'renormalise' (biased baseline); got {tail!r}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd needs 0 < beta < 1, got beta={beta}; at beta=0 or 1 the generalised JSD vanishes, "
            "use kind='forward-kl' or kind='reverse-kl' for those limits"
        )
    if kind in ("skew-kl", "skew-rkl") and not 0.0 <= beta < 1.0:
        raise ValueError(f"{kind} needs 0 <= beta < 1 (beta=0 is the plain KL; beta=1 is always 0), got beta={beta}")


def _check_shapes(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    position_mask: Tensor | None,
    target_mask: Tensor | None,
) -> None:
    if student_logits.dim() != 2 or not student_logits.dtype.is_floating_point:
        raise ValueError(
            f"student_logits must be an (N, V) float tensor, got {tuple(student_logits.shape)} {student_logits.dtype}"
        )
    n = student_logits.shape[0]
    if target_ids.dim() != 2 or target_ids.shape[0] != n:
        raise ValueError(f"target_ids must be (N, K) with N={n} (student_logits rows), got {tuple(target_ids.shape)}")
    if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    expected = (n, target_ids.shape[1])
    if target_logprobs.shape != expected or not target_logprobs.dtype.is_floating_point:
        raise ValueError(
            f"target_logprobs must be a float tensor of shape {expected} like target_ids, "
            f"got {tuple(target_logprobs.shape)} {target_logprobs.dtype}"
        )
    if tail_mass.shape != (n,) or not tail_mass.dtype.is_floating_point:
        raise ValueError(
            f"tail_mass must be a float tensor of shape ({n},), got {tuple(tail_mass.shape)} {tail_mass.dtype}"
        )
    if position_mask is not None and (position_mask.shape != (n,) or position_mask.dtype != torch.bool):
        raise ValueError(
            f"position_mask must be a bool tensor of shape ({n},), "
            f"got {tuple(position_mask.shape)} {position_mask.dtype}"
        )
    if target_mask is not None and (target_mask.shape != expected or target_mask.dtype != torch.bool):
        raise ValueError(
            f"target_mask must be a bool tensor of shape {expected} like target_ids, "
            f"got {tuple(target_mask.shape)} {target_mask.dtype}"
        )


def _k1_bins(log_p_kept: Tensor, log_p_tail: Tensor, log_q_kept: Tensor, log_q_tail: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student as (N, K+1) log-space bins: the teacher's rescaled to sum to 1, and its tail dropped in
    rows where the kept ids cover the vocabulary (the student has no tail bin there); the student's as they are."""
    log_p_tail = log_p_tail.masked_fill(torch.isneginf(log_q_tail), -math.inf)  # no tail bin: ids cover V
    log_p = _normalise(torch.cat([log_p_kept, log_p_tail[:, None]], dim=1))  # (N, K+1)
    log_q = torch.cat([log_q_kept, log_q_tail[:, None]], dim=1)  # (N, K+1), sums to 1 already
    return log_p, log_q


def _mean_nll(z: Tensor, lse: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Mean cross-entropy lse - z[y] over the ``valid`` rows of (N, C) float32 logits with their logsumexp (N,)."""
    safe = labels.long().clamp_min(0)[:, None]
    nll = (lse - z.gather(1, safe)[:, 0]) * valid  # (N,)
    return nll.sum() / valid.sum().clamp_min(1)


def _labelled(labels: Tensor, logits_shape: tuple[int, ...], position_mask: Tensor | None) -> Tensor:
    """(N,) bool: the positions whose hard label counts (label >= 0, not masked), after checking the labels.

    Raises:
        ValueError: labels that are not an (N,) integer tensor, a bad position_mask, or a label >= C.
    """
    n, c = logits_shape
    if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an ({n},) integer tensor, got {tuple(labels.shape)} {labels.dtype}")
    if position_mask is not None and (position_mask.shape != (n,) or position_mask.dtype != torch.bool):
        raise ValueError(
            f"position_mask must be an ({n},) bool tensor, got {tuple(position_mask.shape)} {position_mask.dtype}"
        )
    valid = labels >= 0
    if position_mask is not None:
        valid = valid & position_mask
    if bool((labels[valid] >= c).any()):
        raise ValueError(f"labels must be < the number of classes {c}, got max {int(labels[valid].max())}")
    return valid


def _check_id_range(target_ids: Tensor, target_mask: Tensor | None, vocab: int) -> None:
    bad = (target_ids < 0) | (target_ids >= vocab)
    if target_mask is not None:
        bad = bad & target_mask
    if bool(bad.any()):
        raise ValueError(
            f"target ids must lie in [0, {vocab}) (the student's vocabulary), got {target_ids[bad][:8].tolist()}; "
            "a student with a smaller vocabulary than the store's teacher cannot be distilled from it"
        )


def _ids_and_mask(target_ids: Tensor, target_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """int64 ids with padding slots pointed at id 0 (safe for gather), and a full (N, K) bool mask."""
    mask = target_mask if target_mask is not None else torch.ones_like(target_ids, dtype=torch.bool)
    return target_ids.long().masked_fill(~mask, 0), mask
