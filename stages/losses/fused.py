"""The default distillation loss (forward KL over the k+1 bins + cross-entropy) with a closed-form gradient.

``distill_loss`` (``terms``) routes here for ``kind="forward-kl"``, ``tail="bin"``: the value is computed the way
``kd_loss`` and ``hard_ce`` compute it, and the backward pass writes the whole gradient into one (N, V) buffer,
where autograd through logsumexp and the gathers keeps several (N, V) float32 temporaries alive (each 400 MB for a
batch of 2,040 positions over a 49,152-id vocabulary). tests/test_losses.py checks value and gradient against a
dense float64 reference written out in the test, differentiated by autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .bins import _ids_and_mask, _k1_bins, student_bins, teacher_bins
from .checks import _check_id_range, _check_shapes, _labelled
from .divergences import _denominator, _kl

__all__ = ["FusedRows", "distill_fused", "fused_grad", "fused_rows"]


def distill_fused(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    labels: Tensor,
    alpha: float,
    temperature: float,
    target_mask: Tensor | None,
    counts: tuple[float | None, float | None] = (None, None),
) -> tuple[Tensor, dict[str, float]]:
    """distill_loss for the default loss (forward KL over the k+1 bins + cross-entropy), with its gradient in closed
    form: the value is computed as ``kd_loss`` and ``hard_ce`` compute it, the backward pass writes the gradient
    into one (N, V) buffer instead of the several (N, V) temporaries autograd keeps for logsumexp and the gathers.

    With s = softmax(z / T), the student's tail S = 1 - sum of s over the kept ids, and the teacher's bins p
    (normalised over the k+1 bins), the soft term's gradient is alpha * T * (s - p̂) / N, where p̂ is p on a kept id
    and p_tail * s_i / S on any other id i (the tail bin's mass spread as the student spreads its own); the hard
    term's is (1 - alpha) * (softmax(z) - onehot(y)) / N_labelled. ``counts`` (kd_count, ce_count), as in
    ``distill_loss``, replace N and N_labelled where given.
    """
    _check_shapes(student_logits, target_ids, target_logprobs, tail_mass, None, target_mask)
    _labelled(labels, student_logits.shape, None)
    n, v = student_logits.shape
    if n == 0:
        zero = student_logits.float().sum() * 0.0
        return zero, {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    _check_id_range(target_ids, target_mask, v)
    ids, mask = _ids_and_mask(target_ids, target_mask)
    loss, kd, ce = _FusedKdCe.apply(  # type: ignore[no-untyped-call]
        student_logits, ids, mask, target_logprobs, tail_mass, labels, alpha, temperature, counts
    )
    return loss, {"loss": float(loss.detach()), "kd": float(kd), "ce": float(ce)}


class _FusedKdCe(torch.autograd.Function):
    """alpha * T^2 * mean forward-KL over the k+1 bins + (1 - alpha) * mean CE; see :func:`distill_fused`."""

    @staticmethod
    def forward(
        ctx: Any,
        z: Tensor,
        ids: Tensor,
        mask: Tensor,
        target_logprobs: Tensor,
        tail_mass: Tensor,
        labels: Tensor,
        alpha: float,
        temperature: float,
        counts: tuple[float | None, float | None],
    ) -> tuple[Tensor, Tensor, Tensor]:
        rows = fused_rows(z.float(), ids, mask, target_logprobs, tail_mass, labels, temperature)
        n_kd = _denominator(counts[0], z.shape[0])
        n_ce = _denominator(counts[1], 0) if counts[1] is not None else rows.valid.sum().clamp_min(1)
        kd = rows.kd.sum() / n_kd * temperature**2
        ce = rows.nll.sum() / n_ce
        ctx.save_for_backward(z, ids, mask, *rows.saved())
        ctx.alpha, ctx.temperature, ctx.n_kd, ctx.n_ce = alpha, temperature, n_kd, n_ce
        ctx.mark_non_differentiable(kd, ce)
        return alpha * kd + (1.0 - alpha) * ce, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        z, ids, mask, *saved = ctx.saved_tensors
        rows = FusedRows.from_saved(saved)
        alpha, t = ctx.alpha, ctx.temperature
        c_kd = alpha * t / ctx.n_kd  # d(T^2 * sum KL / N)/dz = T * (s - p̂) / N
        c_ce = (1.0 - alpha) * rows.valid / ctx.n_ce  # (N,): d(sum CE / N_y)/dz = (softmax - onehot) / N_y
        g = fused_grad(z, ids, mask, rows, c_kd, c_ce, t)
        g.mul_(grad_loss)
        return g.to(z.dtype), None, None, None, None, None, None, None, None


@dataclass
class FusedRows:
    """Per-row results of the default loss on (N, V) logits, and what its closed-form gradient needs.

    Attributes:
        kd: (N,) float32: forward KL over the k+1 bins per row (before T^2 and the mean).
        nll: (N,) float32: the hard-label NLL at T = 1 per row; 0 where the row has no label.
        valid: (N,) bool: the row has a hard label (>= 0).
        log_p: (N, K+1) float32: the teacher's bins.
        log_q_kept: (N, K) float32, log_q_tail: (N,) float32: the student's bins at T.
        lse: (N,) float32: logsumexp(z / T); lse1: (N,) float32: logsumexp(z).
        safe: (N, 1) int64: the labels, 0 where there is none (a safe gather index).
    """

    kd: Tensor
    nll: Tensor
    valid: Tensor
    log_p: Tensor
    log_q_kept: Tensor
    log_q_tail: Tensor
    lse: Tensor
    lse1: Tensor
    safe: Tensor

    def saved(self) -> tuple[Tensor, ...]:
        """The tensors ``fused_grad`` needs, in ``from_saved``'s order (kd and nll are not needed)."""
        return self.valid, self.log_p, self.log_q_kept, self.log_q_tail, self.lse, self.lse1, self.safe

    @staticmethod
    def from_saved(saved: Sequence[Tensor]) -> FusedRows:
        valid, log_p, log_q_kept, log_q_tail, lse, lse1, safe = saved
        empty = lse.new_empty(0)
        return FusedRows(empty, empty, valid, log_p, log_q_kept, log_q_tail, lse, lse1, safe)


def fused_rows(
    zf: Tensor,
    ids: Tensor,
    mask: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    labels: Tensor,
    temperature: float,
) -> FusedRows:
    """The default loss's per-row terms: zf (N, V) float32 logits, ids (N, K) int64 (padding slots at 0), mask
    (N, K) bool, the stored targets and (N,) labels -> :class:`FusedRows`. Each row depends on its own inputs
    only, so rows may be computed in chunks (``chunked``)."""
    lse = torch.logsumexp(zf if temperature == 1.0 else zf / temperature, dim=-1)  # (N,)
    log_q_kept, log_q_tail = student_bins(zf, ids, mask, temperature, lse)
    log_p, log_q = _k1_bins(*teacher_bins(target_logprobs, tail_mass, mask), log_q_kept, log_q_tail)
    valid = labels >= 0
    lse1 = lse if temperature == 1.0 else torch.logsumexp(zf, dim=-1)
    safe = labels.long().clamp_min(0)[:, None]
    nll = (lse1 - zf.gather(1, safe)[:, 0]) * valid
    return FusedRows(_kl(log_p, log_q), nll, valid, log_p, log_q_kept, log_q_tail, lse, lse1, safe)


def fused_grad(z: Tensor, ids: Tensor, mask: Tensor, rows: FusedRows, c_kd: float, c_ce: Tensor, t: float) -> Tensor:
    """The gradient with respect to the logits, in closed form: per row n, c_kd * (s - p̂) + c_ce[n] * (softmax(z)
    - onehot(y)), with s, p̂ as in ``distill_fused`` (the gradient of c_kd * T * KL_n + c_ce[n] * NLL_n).

    Args:
        z: (N, V) any float dtype: the logits ``rows`` was computed from; read, never written.
        ids, mask: (N, K) int64 and bool, as for ``fused_rows``.
        rows: ``fused_rows``'s result for these logits.
        c_kd: the soft term's coefficient, the same for every row: alpha * T / (the number of rows the loss
            averages over).
        c_ce: (N,) float32: the hard term's coefficient per row: (1 - alpha) / (the number of labelled rows the loss
            averages over) on a labelled row, 0 on the others.
        t: T.

    Returns:
        (N, V) float32: the gradient, in a new buffer.
    """
    log_p, log_q_kept, log_q_tail, lse, lse1, safe = rows.saved()[1:]
    n = z.shape[0]
    c_s = c_kd + c_ce if t == 1.0 else torch.full_like(c_ce, c_kd)  # (N,): s's coefficient (T = 1: softmax(z) = s)
    # An unkept id i gets s_i * (c_s - c_kd * e^d), d = log(p_tail / S): the tail bin's mass spread as the
    # student spreads its own. e^d overflows float32 when the student's tail S is far below the teacher's, so
    # the row factor is applied in log space: log|c_s - c_kd e^d| and its sign, from x = log c_s, y = log c_kd + d.
    no_tail = torch.isneginf(log_q_tail) | torch.isneginf(log_p[:, -1])
    d = torch.where(no_tail, -math.inf, log_p[:, -1] - torch.where(no_tail, 0.0, log_q_tail))
    x = torch.log(c_s)
    y = (math.log(c_kd) if c_kd > 0 else -math.inf) + d
    m = torch.maximum(x, y)
    gap = torch.where(torch.isneginf(m), 0.0, (x - y).abs())
    shift = m + torch.log(-torch.expm1(-gap))  # -inf where the factor is 0
    sign = torch.where(x >= y, 1.0, -1.0)
    g = z.float() if t == 1.0 else z.float() / t
    g = g.clone() if g.data_ptr() == z.data_ptr() else g  # one (N, V) buffer, never the input itself
    g.sub_((lse - shift)[:, None]).exp_().mul_(sign[:, None])  # every id as if unkept
    # kept ids: c_s * s - c_kd * p, written over (not added to: s * e^d may overflow where S is tiny)
    kept = c_s[:, None] * log_q_kept.exp() - c_kd * log_p[:, :-1].exp()  # (N, K)
    # a padding slot (ragged sampled rows; its id reads 0) writes the row's first slot again, or leaves id 0
    # as it is in a row with no real slot, so that it never clobbers a real value
    first_id = ids[:, :1].expand_as(ids)
    first_val = torch.where(mask[:, :1], kept[:, :1], g.gather(1, ids[:, :1])).expand_as(kept)
    g.scatter_(1, torch.where(mask, ids, first_id), torch.where(mask, kept, first_val))
    if t != 1.0:  # the hard term's softmax(z) at T = 1, a block of rows at a time (no second (N, V) buffer)
        for i in range(0, n, 256):
            block = (z[i : i + 256].float() - lse1[i : i + 256, None]).exp_()
            g[i : i + 256].add_(block.mul_(c_ce[i : i + 256, None]))
    g.scatter_add_(1, safe, -c_ce[:, None].to(g.dtype))
    return g
