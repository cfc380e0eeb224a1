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
Or, given ``kd_count`` / ``ce_count`` (``count`` in ``kd_loss`` and ``hard_ce``), summed and divided by those: the
whole optimizer step's positions, over every micro-batch and rank, for exact token weighting (``stages.weighting``).

Sampled targets (``sampled_targets``): ids drawn with replacement from the teacher, stored as counts. Their
empirical distribution p̂ = count / N has E[p̂] = p, and the forward KL's student-dependent part, the cross-entropy
-sum p log q, is linear in p, so forward-kl on sampled targets is an unbiased estimate of the dense forward KL up
to a student-independent constant (its gradient is unbiased). The other divergences are not linear in p and are
biased with sampled targets: ``UNBIASED_WITH_SAMPLES`` lists the kinds that are not.

Hybrid targets (``hybrid_targets``): the exact top-k, plus ids drawn from the teacher restricted to the other ids,
each drawn id weighted tail_mass * count / N. They become K + U "kept" slots with a tail of 0 (the draws carry the
tail's mass), so every loss, the default fused one included, runs on them unchanged; p̂ is again unbiased with an
exact head, so forward-kl is unbiased up to the same kind of constant, and the other kinds are biased (less than
with sampled targets: only the tail is estimated).

Everything is computed in float32 and in log space: mixtures use ``logaddexp``, and empty bins (masked slots, a
zero tail) are excluded before they can reach an ``exp`` or a gradient, so no input here makes a NaN.

Layout (imports point one way, options <- bins, checks, divergences <- fused <- terms, chunked; nothing imports
back):

    options.py      LOSS_KINDS, TAIL_MODES, UNBIASED_WITH_SAMPLES, PRECISE_TAIL and check_loss_options; no torch
    bins.py         the teacher's and the student's k+1 bins; sampled_targets, hybrid_targets
    checks.py       checks of the tensors handed in (shapes, dtypes, id and label ranges)
    divergences.py  the per-row divergences and the mean NLL
    fused.py        the default loss (forward-kl + CE) with its gradient in closed form
    terms.py        kd_loss, hard_ce, distill_loss
    chunked.py      chunked_distill_loss: the output head and any of these losses, a chunk of rows at a time, so
                    that (positions x vocabulary) logits never exist (what ``pipeline train`` uses)

The options load eagerly and without torch (``TrainConfig`` and the CLI's ``--help`` use them); the losses, which
need torch, load on first access (``from kd_pipeline.stages.losses import distill_loss`` works as usual).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .options import LOSS_KINDS, PRECISE_TAIL, TAIL_MODES, UNBIASED_WITH_SAMPLES, check_loss_options

if TYPE_CHECKING:
    from .bins import hybrid_targets, sampled_targets, student_bins, teacher_bins
    from .chunked import chunked_distill_loss, rows_per_chunk
    from .terms import distill_loss, hard_ce, kd_loss

__all__ = [
    "LOSS_KINDS",
    "PRECISE_TAIL",
    "TAIL_MODES",
    "UNBIASED_WITH_SAMPLES",
    "check_loss_options",
    "chunked_distill_loss",
    "distill_loss",
    "hard_ce",
    "hybrid_targets",
    "kd_loss",
    "rows_per_chunk",
    "sampled_targets",
    "student_bins",
    "teacher_bins",
]

# The torch-backed names, by the submodule that defines them: imported on first access (PEP 562), so that
# importing this package for its options (stages.train, the CLI) does not load torch.
_LAZY = {
    "sampled_targets": "bins",
    "hybrid_targets": "bins",
    "student_bins": "bins",
    "teacher_bins": "bins",
    "distill_loss": "terms",
    "hard_ce": "terms",
    "kd_loss": "terms",
    "chunked_distill_loss": "chunked",
    "rows_per_chunk": "chunked",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later accesses skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
