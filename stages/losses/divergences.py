"""The per-row terms: divergences between two binned distributions given in log space, and the mean NLL.

Every divergence here is computed in float32 and log space: mixtures use ``logaddexp``, and empty bins (masked
slots, a zero tail) are excluded before they can reach an ``exp`` or a gradient, so no input makes a NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__: list[str] = []  # package-private: the package's __init__ exposes the losses built on these

# An empty bin in the *reference* side of a KL (q = 0 under p > 0 in forward KL, p = 0 under q > 0 in reverse KL)
# makes the divergence +inf. That happens when float32 rounding turned a tiny teacher tail into 0 (the labeler
# measures 1 - sum(kept) no finer than float32 eps) or a sampled target never drew some id. We read such a bin as
# holding float32 eps, the resolution the tail was measured at: the loss stays finite, and the student is still
# pushed hard to empty that bin, instead of one row turning the whole batch's gradient into NaN.
_LOG_EMPTY_BIN = math.log(torch.finfo(torch.float32).eps)


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


def _mean_nll(z: Tensor, lse: Tensor, labels: Tensor, valid: Tensor, count: float | None = None) -> Tensor:
    """Cross-entropy lse - z[y] summed over the ``valid`` rows of (N, C) float32 logits with their logsumexp (N,),
    divided by the number of valid rows (or by ``count``, at least 1)."""
    safe = labels.long().clamp_min(0)[:, None]
    nll = (lse - z.gather(1, safe)[:, 0]) * valid  # (N,)
    return nll.sum() / (_denominator(count, 0) if count is not None else valid.sum().clamp_min(1))


def _denominator(count: float | None, rows: int) -> float:
    """What a loss term's sum is divided by: ``count`` when given (the whole optimizer step's positions), else this
    call's ``rows``; at least 1, so that a term with no position is 0, not NaN."""
    return max(float(count) if count is not None else float(rows), 1.0)
