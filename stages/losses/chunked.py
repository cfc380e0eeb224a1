"""The output head and the distillation loss together, a chunk of rows at a time: (positions x vocabulary) logits
never exist.

A causal LM's head is one linear layer, z = h W^T + b, and every loss here is a sum of per-row terms. So the loss
and its gradients with respect to the hidden states, the head's weight and its bias can be computed C rows at a
time: the chunk's logits (C, V), its per-row loss, and in the same pass its gradient dL/dz (C, V), which is turned
at once into dL/dh = dL/dz W (C, H) and accumulated into dL/dW += dL/dz^T h (V, H) and dL/db += sum dL/dz (V,).
Then the chunk's logits and their gradient are dropped. As in Liger-Kernel's fused linear losses and Apple's Cut
Cross-Entropy, the gradients are computed in the forward pass, so that nothing of size (N, V) is kept for backward;
backward only scales them by the incoming gradient. Extra memory: a few (C, V) float32 blocks, plus (V, H) and
(N, H) float32 gradient buffers, whatever N is (the dense path keeps several (N, V) float32 tensors: 84 GB and more
for a 131,072-id vocabulary and 8 x 8,192 positions).

Per chunk, the default loss (forward-kl over the k+1 bins + cross-entropy) takes its gradient in closed form from
``fused``; every other loss (reverse-kl, jsd, skew-kl, skew-rkl, tvd, and ``tail="renormalise"``) runs its per-row
terms under autograd on the chunk's logits and takes ``torch.autograd.grad`` there: exact, and only (C, V) lives.

The means are over ALL rows, not per chunk: the soft term divides by N, the hard term by the number of labelled
rows, both counted before the first chunk, so the result does not depend on C. (Or by ``kd_count`` and
``ce_count``, the whole optimizer step's counts, for exact token weighting across micro-batches and ranks.)

Dtypes: the chunk's hidden states and the head are upcast to float32 and the logits computed in float32 (under
autocast too, which is switched off here): the losses need float32 logits anyway (bfloat16 logits lose the tail's
small probabilities), and dL/dW sums N/C chunk products, which a bfloat16 accumulator would round at every step.
A head stored in bfloat16 costs one float32 copy of W (V x H, the size of dL/dW). The gradients are returned in the
inputs' dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .bins import _ids_and_mask, _k1_bins, _normalise, student_bins, teacher_bins
from .checks import _check_id_range, _check_shapes, _labelled
from .divergences import _denominator, _divergence
from .fused import fused_grad, fused_rows
from .options import check_loss_options

__all__ = ["CHUNK_BYTES", "chunked_distill_loss", "rows_per_chunk"]

CHUNK_BYTES = 256 * 2**20
"""Default size of one float32 (C, V) block of logits: 256 MiB, i.e. 512 rows of a 131,072-id vocabulary or 1,365
of a 49,152-id one. A chunk holds about three such blocks at its peak (logits, their gradient, a logsumexp or
softmax temporary), so the head and the loss stay under ~1 GB whatever the batch; and a (C, H) x (H, V) product of
512+ rows keeps a GPU's matmul units busy. A small vocabulary gets one chunk for any realistic batch."""


def rows_per_chunk(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk such that a float32 (rows, vocab) block fits in ``budget`` bytes (at least 1)."""
    return max(1, budget // (4 * max(vocab, 1)))


@dataclass(frozen=True)
class _Options:
    alpha: float
    kind: str
    temperature: float
    beta: float
    tail: str
    logit_scale: float | None
    softcap: float | None
    chunk: int
    counts: tuple[float | None, float | None]  # kd_count, ce_count: as in distill_loss
    grad: bool  # compute the gradients (False under no_grad, or when no input needs one)


def chunked_distill_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_ids: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    kind: str = "forward-kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    target_mask: Tensor | None = None,
    tail: str = "bin",
    logit_scale: float | None = None,
    softcap: float | None = None,
    chunk: int = 1024,
    kd_count: float | None = None,
    ce_count: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``distill_loss`` of the logits z = f(hidden W^T + b), computed ``chunk`` rows at a time.

    f is the head's output transform, as ``stages.models.OutputHead`` applies it: z = u * logit_scale, then
    z = softcap * tanh(z / softcap). The value, the parts and the gradients equal ``distill_loss`` on the dense
    logits (tests/test_chunked_loss.py checks them against a float64 reference).

    Args:
        hidden: (N, H) float (any dtype): the final hidden states at the N positions that count (select them
            first: there is no position_mask).
        weight: (V, H) float: the output head's weight (for a tied student, the input embedding itself: its
            gradient here adds to the embedding's own through autograd).
        bias: (V,) float or None: the head's bias.
        target_ids, target_logprobs, tail_mass, target_mask, kind, temperature, beta, tail: as in ``kd_loss``.
        labels: (N,) integer hard labels; negative = no label (as in ``hard_ce``).
        alpha: the soft term's weight in [0, 1].
        logit_scale: multiply the head's output by this (Cohere's ``logit_scale``); None: 1.
        softcap: cap the logits with softcap * tanh(z / softcap) (Gemma 2's ``final_logit_softcapping``); None:
            no cap.
        chunk: rows per chunk, >= 1 (``rows_per_chunk`` picks one for a memory budget).
        kd_count, ce_count: the soft and the hard term's denominators, as in ``distill_loss`` (default: N and the
            number of labelled rows); the whole optimizer step's counts for exact token weighting.

    Returns:
        loss: () float32: alpha * T^2 * mean soft divergence + (1 - alpha) * mean CE over the labelled rows;
            differentiable with respect to hidden, weight and bias.
        parts: {"loss", "kd", "ce"} as Python floats, for logging (this synchronises with the device).

    Raises:
        ValueError: anything ``distill_loss`` rejects, a weight whose width is not H, a bias that is not (V,), a
            chunk < 1, or a logit_scale or softcap that is not a finite number (softcap > 0, logit_scale != 0).
    """
    problems = check_loss_options(kind, temperature, beta, tail, alpha)
    problems += _check_head(hidden, weight, bias, logit_scale, softcap, chunk)
    if problems:
        raise ValueError("; ".join(problems))
    n, v = hidden.shape[0], weight.shape[0]
    # the targets' checks want logits only for their shape: a meta tensor has one and no storage
    _check_shapes(torch.empty(n, v, device="meta"), target_ids, target_logprobs, tail_mass, None, target_mask)
    _labelled(labels, (n, v), None)
    _check_id_range(target_ids, target_mask, v)
    ids, mask = _ids_and_mask(target_ids, target_mask)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    opts = _Options(
        alpha,
        kind,
        temperature,
        beta,
        tail,
        logit_scale,
        softcap,
        chunk,
        (kd_count, ce_count),
        torch.is_grad_enabled() and any(needs),
    )
    loss, kd, ce = _ChunkedHeadLoss.apply(hidden, weight, bias, ids, mask, target_logprobs, tail_mass, labels, opts)  # type: ignore[no-untyped-call]
    return loss, {"loss": float(loss.detach()), "kd": float(kd), "ce": float(ce)}


def _check_head(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float | None, softcap: float | None, chunk: int
) -> list[str]:
    """Every problem with the head's tensors and options, as messages."""
    p = []
    if hidden.dim() != 2 or not hidden.dtype.is_floating_point:
        p.append(f"hidden must be an (N, H) float tensor, got {tuple(hidden.shape)} {hidden.dtype}")
    if weight.dim() != 2 or not weight.dtype.is_floating_point or weight.shape[-1] != hidden.shape[-1]:
        p.append(
            f"weight must be a (V, H) float tensor with H={hidden.shape[-1]} (hidden's width), "
            f"got {tuple(weight.shape)} {weight.dtype}"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.dtype.is_floating_point):
        p.append(f"bias must be None or a float tensor of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if scale is not None and not (math.isfinite(scale) and scale != 0):
        p.append(f"logit_scale must be a finite, non-zero number or None, got {scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        p.append(f"softcap must be a finite number > 0 or None, got {softcap}")
    if chunk < 1:
        p.append(f"chunk must be >= 1 row, got {chunk}")
    return p


class _ChunkedHeadLoss(torch.autograd.Function):
    """The loss of ``chunked_distill_loss``, with its gradients computed in forward; see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ids: Tensor,
        mask: Tensor,
        target_logprobs: Tensor,
        tail_mass: Tensor,
        labels: Tensor,
        opts: _Options,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = (opts.grad and x for x in ctx.needs_input_grad[:3])
        t, device = opts.temperature, hidden.device
        with torch.autocast(device.type, enabled=False):  # float32 on purpose: see the module docstring
            w = weight.float()  # (V, H): the weight itself when it is float32
            b = bias.float() if bias is not None else None
            valid = labels >= 0  # (N,)
            # the normalisers of the whole batch (or of the whole optimizer step, when given), not of a chunk
            n_kd = _denominator(opts.counts[0], n)
            n_ce = _denominator(opts.counts[1], int(valid.sum()))
            c_kd = opts.alpha * t / n_kd  # the soft term's d/dz is c_kd * (s - p̂) per row
            c_ce = (1.0 - opts.alpha) * valid / n_ce  # (N,); 0 on unlabelled rows
            grad_h = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=device) if need_h else None
            grad_w = torch.zeros(v, weight.shape[1], dtype=torch.float32, device=device) if need_w else None
            grad_b = torch.zeros(v, dtype=torch.float32, device=device) if need_b else None
            kd_sum = torch.zeros((), dtype=torch.float64, device=device)
            nll_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i in range(0, n, opts.chunk):
                rows = slice(i, i + opts.chunk)
                h = hidden[rows].float()  # (C, H)
                u = h @ w.T if b is None else torch.addmm(b, h, w.T)  # (C, V) the head's raw output
                z = _transform(u, opts)  # (C, V) the logits the loss sees
                kd_rows, nll_rows, dz = _chunk_terms(
                    z,
                    ids[rows],
                    mask[rows],
                    target_logprobs[rows],
                    tail_mass[rows],
                    labels[rows],
                    c_kd,
                    c_ce[rows],
                    opts,
                )
                kd_sum += kd_rows.sum().double()
                nll_sum += nll_rows.sum().double()
                if dz is None:
                    continue
                du = _chain(dz, z, opts)  # (C, V) dL/du
                if grad_h is not None:
                    grad_h[rows] = du @ w  # (C, H)
                if grad_w is not None:
                    grad_w.addmm_(du.T, h)  # (V, H)
                if grad_b is not None:
                    grad_b += du.sum(0)
            kd = (kd_sum * t**2 / n_kd).float()
            ce = (nll_sum / n_ce).float()
            loss = opts.alpha * kd + (1.0 - opts.alpha) * ce
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        # the gradients stay float32 until here: scaled once, then rounded once to the inputs' dtypes
        grads = [
            None if g is None else (g * grad_loss).to(dtype)
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None, None, None)


def _transform(u: Tensor, opts: _Options) -> Tensor:
    """The head's output transform, in place on u (C, V) float32: logit scale, then soft-capping."""
    if opts.logit_scale is not None:
        u.mul_(opts.logit_scale)
    if opts.softcap is not None:
        u.div_(opts.softcap).tanh_().mul_(opts.softcap)
    return u


def _chain(dz: Tensor, z: Tensor, opts: _Options) -> Tensor:
    """dL/du from dL/dz (C, V) float32, in place: d(c tanh(x / c))/dx = 1 - tanh^2 = 1 - (z / c)^2 (autograd's own
    formula for tanh, from its output), then d(s u)/du = s."""
    if opts.softcap is not None:
        dz.mul_(1.0 - (z / opts.softcap).square())
    if opts.logit_scale is not None:
        dz.mul_(opts.logit_scale)
    return dz


def _chunk_terms(
    z: Tensor,
    ids: Tensor,
    mask: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    labels: Tensor,
    c_kd: float,
    c_ce: Tensor,
    opts: _Options,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk's per-row soft divergences (C,) and hard NLLs (C,) (0 where unlabelled), and, when gradients are
    wanted, the gradient (C, V) float32 of c_kd * T * sum(divergences) + sum(c_ce * NLLs) with respect to z."""
    t = opts.temperature
    if opts.kind == "forward-kl" and opts.tail == "bin":  # the default: the gradient in closed form
        rows = fused_rows(z, ids, mask, target_logprobs, tail_mass, labels, t)
        dz = fused_grad(z, ids, mask, rows, c_kd, c_ce, t) if opts.grad else None
        return rows.kd, rows.nll, dz
    with torch.enable_grad():  # forward runs under no_grad; this chunk's (C, V) graph is freed by autograd.grad
        zg = z.detach().requires_grad_(opts.grad)
        lse = torch.logsumexp(zg if t == 1.0 else zg / t, dim=-1)  # (C,)
        log_q_kept, log_q_tail = student_bins(zg, ids, mask, t, lse)
        log_p_kept, log_p_tail = teacher_bins(target_logprobs, tail_mass, mask)
        if opts.tail == "bin":
            log_p, log_q = _k1_bins(log_p_kept, log_p_tail, log_q_kept, log_q_tail)
        else:
            log_p, log_q = _normalise(log_p_kept), _normalise(log_q_kept)  # the biased top-k baseline
        kd_rows = _divergence(opts.kind, log_p, log_q, opts.beta)  # (C,)
        valid = labels >= 0
        lse1 = lse if t == 1.0 else torch.logsumexp(zg, dim=-1)
        nll_rows = (lse1 - zg.gather(1, labels.long().clamp_min(0)[:, None])[:, 0]) * valid  # (C,)
        dz = None
        if opts.grad:
            (dz,) = torch.autograd.grad(c_kd * t * kd_rows.sum() + (c_ce * nll_rows).sum(), zg)
    return kd_rows.detach(), nll_rows.detach(), dz
