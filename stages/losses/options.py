"""The losses' options, their one validator, and the precise-tail threshold: no torch, so that the CLI and
``TrainConfig`` can check a configuration (and list the choices in ``--help``) without loading it."""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["LOSS_KINDS", "PRECISE_TAIL", "TAIL_MODES", "UNBIASED_WITH_SAMPLES", "check_loss_options"]

LOSS_KINDS = ("forward-kl", "reverse-kl", "jsd", "skew-kl", "skew-rkl", "tvd")
"""The divergences ``kd_loss`` knows, by the name the CLI and the train config use."""

UNBIASED_WITH_SAMPLES = ("forward-kl",)
"""Kinds whose loss on ``sampled_targets`` or ``hybrid_targets`` is an unbiased estimate (up to a constant) of the
dense loss."""

TAIL_MODES = ("bin", "renormalise")
"""bin: the k+1-bin loss (unbiased to the tail); renormalise: the biased top-k baseline, for comparison only."""

PRECISE_TAIL = 1e-2
"""Below this tail mass, ``1 - sum(kept probabilities)`` is recomputed exactly (a log-sum-exp over the unkept ids).

The kept probabilities come from float32 log-probs, so their sum carries ~1e-7 (student, float32 sum) to ~2e-6
(teacher, float32 logits of a large vocabulary) of absolute rounding: negligible against a tail above 1e-2, but
above 1e-4 relative error below it, and all of it once the tail nears float32 eps. The labeler
(``stages.soft_targets``, the teacher's stored tail) and the student's tail bin (``bins.student_bins``) use the same
bound; bench/label_overhead.py measured the teacher's side.
"""


def check_loss_options(
    kind: str,
    temperature: float | None,
    beta: float,
    tail: str,
    alpha: float | None = None,
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """Every problem with a set of loss options, as messages; an empty list when they are valid.

    Args:
        kind: one of ``LOSS_KINDS``.
        temperature: T, finite and > 0; None skips the check (a train config takes T from the store).
        beta: jsd needs 0 < beta < 1; skew-kl and skew-rkl need 0 <= beta < 1; other kinds ignore it.
        tail: one of ``TAIL_MODES``.
        alpha: the soft term's weight in [0, 1], or None where there is no mix (``kd_loss``).
        names: how to call each option in the messages ("kind", "temperature", "beta", "tail", "alpha" to, e.g.,
            "--loss"), so that the CLI's errors name its flags; default: the argument names.

    Returns:
        One message per problem, each saying what was expected and what came.
    """

    def name(option: str) -> str:
        return (names or {}).get(option, option)

    problems = []
    if kind not in LOSS_KINDS:
        problems.append(f"{name('kind')} must be one of {', '.join(LOSS_KINDS)}; got {kind!r}")
    if tail not in TAIL_MODES:
        problems.append(
            f"{name('tail')} must be 'bin' (the k+1-bin loss) or 'renormalise' (biased baseline); got {tail!r}"
        )
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        problems.append(f"{name('temperature')} must be a finite number > 0, got {temperature}")
    b = name("beta")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        problems.append(
            f"jsd needs 0 < {b} < 1, got {b}={beta}; at {b}=0 or 1 the generalised JSD vanishes, "
            "use forward-kl or reverse-kl for those limits"
        )
    if kind in ("skew-kl", "skew-rkl") and not 0.0 <= beta < 1.0:
        problems.append(f"{kind} needs 0 <= {b} < 1 ({b}=0 is the plain KL; {b}=1 is always 0), got {b}={beta}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        problems.append(f"{name('alpha')} must be in [0, 1] (1 = soft targets only, 0 = hard labels only), got {alpha}")
    return problems
