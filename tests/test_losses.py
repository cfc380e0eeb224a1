"""The k+1-bin distillation losses against plain dense references, plus their numerics and validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kd_pipeline.stages.losses import (
    LOSS_KINDS,
    UNBIASED_WITH_SAMPLES,
    distill_loss,
    hard_ce,
    kd_loss,
    sampled_targets,
    student_bins,
    teacher_bins,
)

# A beta per kind that every kind accepts; skew kinds are also run at their beta=0 edge where it matters.
BETA = {"forward-kl": 0.5, "reverse-kl": 0.5, "jsd": 0.3, "skew-kl": 0.1, "skew-rkl": 0.1, "tvd": 0.5}


# ---------------------------------------------------------------------------------------------------- references


def reference(kind: str, p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """The divergence per row between two distributions given as probabilities (N, B) float64 -> (N,).

    Straight from the definitions, with 0 log 0 = 0; the empty bins are taken out before the log, so that
    autograd through this (the gradient references) gets no 0/0 from a padding slot.
    """

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        live = a > 0
        one = torch.ones_like(a)
        return torch.where(live, a * (torch.where(live, a, one).log() - torch.where(live, b, one).log()), 0.0).sum(-1)

    if kind == "forward-kl":
        return kl(p, q)
    if kind == "reverse-kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew-kl":
        return kl(p, beta * p + (1 - beta) * q)
    if kind == "skew-rkl":
        return kl(q, beta * q + (1 - beta) * p)
    assert kind == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def topk_targets(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the labeler stores: kept ids (N, K) int64, their full-vocab log-probs (N, K) float32, tail (N,) float32."""
    logp = torch.log_softmax(teacher.double() / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    tail = (1 - values.exp().sum(-1)).clamp_min(0)
    return ids, values.float(), tail.float()


def coarsen(prob: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, V) probabilities -> (N, K+1): the kept ids, then the sum over every other id (not 1 - sum)."""
    others = torch.ones_like(prob, dtype=torch.bool).scatter(1, ids, False)
    return torch.cat([prob.gather(1, ids), (prob * others).sum(-1, keepdim=True)], dim=1)


def logits(n: int, v: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def dense_distill(
    z: torch.Tensor,
    ids: torch.Tensor,
    teacher_kept: torch.Tensor,
    teacher_tail: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: str = "forward-kl",
    beta: float = 0.5,
    target_mask: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """distill_loss written out densely in float64, from the definitions; none of the code under test is used.

    Args:
        z: (N, V) float64 student logits (requires_grad for the gradient check).
        ids: (N, K) kept ids; teacher_kept: (N, K) the teacher's probabilities there (over the full vocabulary);
            teacher_tail: (N,) its tail mass; all float64.
        labels: (N,) hard labels, negative = none.
        target_mask: (N, K) bool, False = padding slot; position_mask: (N,) bool, False = padding position.

    Returns:
        (loss, kd, ce), float64 scalars.
    """
    n, v = z.shape
    mask = target_mask if target_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    rows = position_mask if position_mask is not None else torch.ones(n, dtype=torch.bool)
    kept = torch.zeros(n, v, dtype=torch.bool)  # (N, V): v is a real kept id of row n
    for r in range(n):
        for j in range(ids.shape[1]):
            if mask[r, j]:
                kept[r, ids[r, j]] = True
    s = torch.softmax(z / temperature, dim=-1)  # (N, V): the student over the full vocabulary
    q_kept = s.gather(1, ids.clamp(0, v - 1)) * mask  # (N, K), 0 on padding slots
    # the student's tail as the sum over the unkept ids, not 1 - sum(q_kept): equal in exact arithmetic, but
    # 1 - sum rounds a tail of e^-70 to 0 even in float64
    q_tail = (s * ~kept).sum(-1)  # (N,)
    p_kept = teacher_kept * mask
    p_tail = teacher_tail.clamp_min(0) * (~kept).any(-1)  # no tail bin where the kept ids cover V
    p = torch.cat([p_kept, p_tail[:, None]], dim=1)  # (N, K+1)
    p = p / p.sum(-1, keepdim=True)  # kd_loss's documented rescaling of the stored bins to sum to 1
    q = torch.cat([q_kept, q_tail[:, None]], dim=1)  # (N, K+1)
    kd = reference(kind, p[rows], q[rows], beta).mean() * temperature**2
    labelled = (labels >= 0) & rows
    nll = -torch.log_softmax(z, dim=-1)[labelled, labels[labelled]]  # hard labels at T = 1
    ce = nll.mean() if len(nll) else z.sum() * 0.0
    return alpha * kd + (1 - alpha) * ce, kd, ce


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_all_ids_kept_equals_dense(kind: str, temperature: float, masked: bool) -> None:
    """K == V, tail 0: the k+1-bin loss is the dense loss, whatever the order of the kept ids."""
    n, v = 7, 11
    teacher, student = logits(n, v, 0), logits(n, v, 1)
    ids = torch.stack([torch.randperm(v, generator=torch.Generator().manual_seed(i)) for i in range(n)])
    logp = torch.log_softmax(teacher / temperature, dim=-1).gather(1, ids)
    position_mask = torch.tensor([True, False, True, True, False, True, True]) if masked else None

    loss = kd_loss(
        student,
        ids,
        logp,
        torch.zeros(n),
        kind=kind,
        temperature=temperature,
        beta=BETA[kind],
        position_mask=position_mask,
    )

    p = torch.softmax(teacher.double() / temperature, dim=-1)
    q = torch.softmax(student.double() / temperature, dim=-1)
    per_row = reference(kind, p, q, BETA[kind])
    if position_mask is not None:
        per_row = per_row[position_mask]
    expected = per_row.mean() * temperature**2
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_tail_noise_is_ignored_when_every_id_is_kept(kind: str) -> None:
    """K == V leaves no tail bin: a stored tail that is only rounding noise must not change the loss."""
    teacher, student = logits(3, 6, 33), logits(3, 6, 34)
    ids, logp, _ = topk_targets(teacher, 6, 1.0)
    exact = kd_loss(student, ids, logp, torch.zeros(3), kind=kind, beta=BETA[kind])
    noisy = kd_loss(student, ids, logp, torch.full((3,), 1e-5), kind=kind, beta=BETA[kind])
    torch.testing.assert_close(noisy, exact, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("kind", ["skew-kl", "skew-rkl"])
def test_skew_at_beta_zero_is_plain_kl(kind: str) -> None:
    n, v = 4, 9
    teacher, student = logits(n, v, 2), logits(n, v, 3)
    ids, logp, tail = topk_targets(teacher, 3, 1.0)
    plain = "forward-kl" if kind == "skew-kl" else "reverse-kl"
    torch.testing.assert_close(
        kd_loss(student, ids, logp, tail, kind=kind, beta=0.0), kd_loss(student, ids, logp, tail, kind=plain)
    )


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_bins_equal_coarsened_dense(kind: str, temperature: float) -> None:
    """K < V: the loss is the dense divergence between both distributions coarsened into (kept ids, tail)."""
    n, v, k = 6, 40, 5
    teacher, student = logits(n, v, 4), logits(n, v, 5)
    ids, logp, tail = topk_targets(teacher, k, temperature)

    loss = kd_loss(student, ids, logp, tail, kind=kind, temperature=temperature, beta=BETA[kind])

    p = coarsen(torch.softmax(teacher.double() / temperature, dim=-1), ids)
    q = coarsen(torch.softmax(student.double() / temperature, dim=-1), ids)
    expected = reference(kind, p, q, BETA[kind]).mean() * temperature**2
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


def test_student_tail_is_accurate_when_tiny() -> None:
    """The kept ids hold all but ~e^-60 of the student's mass: 1 - sum(kept) would round to 0, the bin must not."""
    z = torch.tensor([[30.0, 29.0, -30.0, -31.0]])
    ids = torch.tensor([[0, 1]])
    log_q_kept, log_q_tail = student_bins(z, ids, None, 1.0)
    expected = torch.logsumexp(z.double()[:, 2:], -1) - torch.logsumexp(z.double(), -1)
    assert log_q_kept.dtype == log_q_tail.dtype == torch.float32
    torch.testing.assert_close(log_q_tail.double(), expected, atol=1e-4, rtol=0)
    naive = torch.log((1 - log_q_kept.exp().sum(-1)).clamp_min(0))  # float32 rounding noise, or -inf
    assert not torch.isclose(naive, log_q_tail, atol=10.0, rtol=0).any()


def test_bins_shapes_dtypes_and_masks() -> None:
    z = logits(2, 6, 6).bfloat16()
    ids = torch.tensor([[0, 1, 2], [3, 3, 5]])  # row 1: slot 1 is padding holding a duplicate of a real id
    mask = torch.tensor([[True, True, True], [True, False, True]])
    log_q_kept, log_q_tail = student_bins(z, ids, mask, 2.0)
    assert log_q_kept.shape == (2, 3) and log_q_tail.shape == (2,)
    assert log_q_kept.dtype == torch.float32
    assert torch.isneginf(log_q_kept[1, 1])
    # Every row's bins are a distribution; the padding slot's junk id did not leak into or out of the tail.
    total = torch.logaddexp(torch.logsumexp(log_q_kept, -1), log_q_tail)
    torch.testing.assert_close(total, torch.zeros(2), atol=1e-6, rtol=0)

    log_p_kept, log_p_tail = teacher_bins(
        torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 7.0, -1.0]]).half(), torch.tensor([0.5, 0.0]), mask
    )
    assert log_p_kept.dtype == log_p_tail.dtype == torch.float32
    assert torch.isneginf(log_p_kept[1, 1]) and torch.isneginf(log_p_tail[1])
    torch.testing.assert_close(log_p_tail[0], torch.tensor(math.log(0.5)))


# ---------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_gradients_finite_with_masks_and_full_rows(kind: str) -> None:
    """Masked slots, a row whose ids cover the vocabulary, a zero teacher tail: finite loss and gradient."""
    n, v, k = 4, 6, 6
    teacher = logits(n, v, 7)
    student = logits(n, v, 8).requires_grad_()
    ids, logp, tail = topk_targets(teacher, k, 1.0)
    mask = torch.ones(n, k, dtype=torch.bool)
    mask[0, 3:] = False  # ragged row: a real tail bin
    mask[1, 1:] = False
    tail[0] = logp[0, 3:].exp().sum()
    tail[1] = 0.0  # float rounding of a tiny tail: student still has mass there
    tail[2] = 1e-7  # rounding noise where the ids cover everything: no tail bin exists

    loss = kd_loss(student, ids, logp, tail, kind=kind, beta=BETA[kind], target_mask=mask)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("k", [1, 4, 12])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_zero_when_student_is_teacher(kind: str, k: int, temperature: float) -> None:
    z = logits(5, 12, 9, scale=3.0)
    ids, logp, tail = topk_targets(z, k, temperature)
    student = z.clone().requires_grad_()
    loss = kd_loss(student, ids, logp, tail, kind=kind, temperature=temperature, beta=BETA[kind])
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(float(loss.detach())) < 1e-5
    # TVD has a kink at p == q: its (sub)gradient there is rounding noise times sign, not ~0.
    if kind != "tvd":
        assert grad.abs().max() < 1e-4


def test_forward_kl_gradient_is_T_times_q_minus_p() -> None:
    """Dense check of the T^2 scaling: d/dz T^2 KL(p || softmax(z/T)) = T (q - p) / N."""
    n, v, t = 3, 8, 2.0
    teacher, student = logits(n, v, 10), logits(n, v, 11).requires_grad_()
    ids, logp, tail = topk_targets(teacher, v, t)
    (grad,) = torch.autograd.grad(kd_loss(student, ids, logp, tail, temperature=t), student)
    p, q = torch.softmax(teacher / t, -1), torch.softmax(student.detach() / t, -1)
    torch.testing.assert_close(grad, t * (q - p) / n, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- tail modes


def test_renormalise_is_the_biased_topk_baseline() -> None:
    n, v, k, t = 5, 50, 4, 2.0
    teacher, student = logits(n, v, 12, scale=1.0), logits(n, v, 13, scale=1.0)
    ids, logp, tail = topk_targets(teacher, k, t)
    assert tail.min() > 0.5  # most of the mass is in the tail

    binned = kd_loss(student, ids, logp, tail, temperature=t)
    renormalised = kd_loss(student, ids, logp, tail, temperature=t, tail="renormalise")

    p = torch.softmax(teacher.double() / t, -1).gather(1, ids)
    q = torch.softmax(student.double() / t, -1).gather(1, ids)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    expected = reference("forward-kl", p, q, 0.0).mean() * t**2
    torch.testing.assert_close(renormalised.double(), expected, atol=1e-5, rtol=1e-5)
    assert abs(float(binned) - float(renormalised)) > 0.05


def test_renormalise_equals_bin_when_nothing_is_dropped() -> None:
    teacher, student = logits(3, 7, 14), logits(3, 7, 15)
    ids, logp, tail = topk_targets(teacher, 7, 1.0)
    torch.testing.assert_close(
        kd_loss(student, ids, logp, tail, tail="renormalise"), kd_loss(student, ids, logp, tail), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("tail_mode", ["bin", "renormalise"])
def test_padding_slots_do_not_change_the_loss(kind: str, tail_mode: str) -> None:
    """A ragged row padded with junk ids and values gives the same loss as the unpadded row."""
    v = 20
    teacher, student = logits(1, v, 16), logits(1, v, 17)
    ids, logp, tail = topk_targets(teacher, 3, 2.0)
    junk_ids = torch.tensor([[ids[0, 0].item(), 19, 0, 19]])  # a duplicate of a real id, repeats, anything
    junk_values = torch.tensor([[0.0, -1.0, 5.0, float("-inf")]])
    padded_ids = torch.cat([ids, junk_ids], dim=1)
    padded_logp = torch.cat([logp, junk_values], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4])

    def loss(ids: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return kd_loss(
            student, ids, logp, tail, kind=kind, temperature=2.0, beta=BETA[kind], target_mask=mask, tail=tail_mode
        )

    plain = loss(ids, logp, None)
    padded = loss(padded_ids, padded_logp, mask)
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-6)


def test_padding_positions_are_excluded_even_with_junk_ids() -> None:
    teacher, student = logits(3, 10, 18), logits(3, 10, 19)
    ids, logp, tail = topk_targets(teacher, 4, 1.0)
    ids[1] = 999  # out of range, but the position is padding
    position_mask = torch.tensor([True, False, True])
    loss = kd_loss(student, ids, logp, tail, position_mask=position_mask)
    keep = [0, 2]
    torch.testing.assert_close(loss, kd_loss(student[keep], ids[keep], logp[keep], tail[keep]))
    empty = kd_loss(student, ids, logp, tail, position_mask=torch.zeros(3, dtype=torch.bool))
    assert float(empty) == 0.0


# ---------------------------------------------------------------------------------------------------- sampled targets


def draw_counts(p: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """(R, V) probabilities -> (R, V) int64 counts of num_samples draws with replacement per row."""
    draws = torch.multinomial(p, num_samples, replacement=True, generator=torch.Generator().manual_seed(seed))
    return torch.zeros_like(p, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))


def compact(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, V) counts -> what a store keeps: ids (R, K), counts (R, K), mask (R, K); K = most distinct ids in a row."""
    k = int((counts > 0).sum(-1).max())
    top, ids = counts.topk(k, dim=-1)
    return ids, top, top > 0


def test_sampled_targets_values() -> None:
    log_p, tail = sampled_targets(torch.tensor([[3, 1, 0], [0, 0, 0]], dtype=torch.int32), 4)
    assert log_p.dtype == tail.dtype == torch.float32
    torch.testing.assert_close(log_p[0, :2], torch.tensor([math.log(0.75), math.log(0.25)]))
    assert torch.isneginf(log_p[0, 2]) and torch.isneginf(log_p[1]).all()
    assert (tail == 0).all()
    assert UNBIASED_WITH_SAMPLES == ("forward-kl",)


def test_many_samples_gradient_approaches_dense() -> None:
    rows, v, t = 4, 30, 1.5
    teacher, student = logits(rows, v, 20), logits(rows, v, 21)
    p = torch.softmax(teacher.double() / t, -1)
    ids, counts, mask = compact(draw_counts(p, 20_000, seed=22))
    log_p, tail = sampled_targets(counts, 20_000)

    z = student.clone().requires_grad_()
    (sampled,) = torch.autograd.grad(kd_loss(z, ids, log_p, tail, temperature=t, target_mask=mask), z)
    full_ids, full_logp, full_tail = topk_targets(teacher, v, t)
    (dense,) = torch.autograd.grad(kd_loss(z, full_ids, full_logp, full_tail, temperature=t), z)
    # Each gradient entry is T (q - p̂) / rows; p̂ has a standard deviation <= 0.0036 at 20,000 draws.
    torch.testing.assert_close(sampled, dense, atol=0.02 * t / rows, rtol=0)


def test_small_sample_gradient_is_unbiased() -> None:
    """Forward KL on 8-sample targets: the mean gradient over many draws matches the dense one within 5 SE."""
    repeats, v, t, n_samples = 4000, 12, 1.0, 8
    teacher, student = logits(1, v, 23), logits(1, v, 24)
    p = torch.softmax(teacher.double() / t, -1)
    ids, counts, mask = compact(draw_counts(p.expand(repeats, v), n_samples, seed=25))
    log_p, tail = sampled_targets(counts, n_samples)

    # One batch of `repeats` rows, each an independent draw for the same student position: row r's gradient is
    # repeats * (the batch loss's gradient at row r).
    z = student.expand(repeats, v).clone().requires_grad_()
    (grad,) = torch.autograd.grad(kd_loss(z, ids, log_p, tail, temperature=t, target_mask=mask), z)
    per_draw = grad.double() * repeats  # (repeats, V)
    mean, se = per_draw.mean(0), per_draw.std(0) / math.sqrt(repeats)

    q = torch.softmax(student.double()[0] / t, -1)
    dense = t * (q - p[0])
    assert ((mean - dense).abs() <= 5 * se + 1e-6).all(), (mean - dense, se)


# ---------------------------------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 4),
    v=st.integers(2, 40),
    kind=st.sampled_from(LOSS_KINDS),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
    seed=st.integers(0, 2**31 - 2),
    half=st.booleans(),
    ragged=st.booleans(),
    data=st.data(),
)
def test_loss_is_finite_and_nonnegative(
    n: int,
    v: int,
    kind: str,
    temperature: float,
    scale: float,
    seed: int,
    half: bool,
    ragged: bool,
    data: st.DataObject,
) -> None:
    k = data.draw(st.integers(1, v), label="k")
    beta = 0.5
    if kind == "jsd":
        beta = data.draw(st.floats(0.01, 0.99), label="beta")
    elif kind.startswith("skew"):
        beta = data.draw(st.floats(0.0, 0.99), label="beta")
    teacher, student = logits(n, v, seed, scale), logits(n, v, seed + 1, scale).requires_grad_()
    ids, logp, tail = topk_targets(teacher, k, temperature)
    if half:
        logp = logp.half()  # the store's default value dtype
    mask = None
    if ragged:
        mask = torch.arange(k)[None, :] < torch.randint(0, k + 1, (n, 1), generator=torch.Generator().manual_seed(seed))
        tail = tail + (logp.float().exp() * ~mask).sum(-1)

    for mode in ("bin", "renormalise"):
        loss = kd_loss(
            student,
            ids,
            logp,
            tail,
            kind=kind,
            temperature=temperature,
            beta=beta,
            target_mask=mask,
            tail=mode,
        )
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss), (mode, loss)
        assert float(loss.detach()) >= -1e-6, (mode, loss)
        assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------------- hard labels, mix


def test_hard_ce_matches_cross_entropy_and_ignores_padding() -> None:
    z = logits(5, 7, 26)
    labels = torch.tensor([0, 6, -100, 3, 2])
    mask = torch.tensor([True, True, True, False, True])
    keep = [0, 1, 4]
    torch.testing.assert_close(hard_ce(z, labels, mask), F.cross_entropy(z[keep], labels[keep]))
    assert float(hard_ce(z, torch.full((5,), -100))) == 0.0


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distill_loss_matches_dense_reference(kind: str, temperature: float, alpha: float) -> None:
    """Every kind through distill_loss (T=1: the shared-logsumexp path; T=2: the separate terms), with padding
    positions, padding slots and unlabelled positions: value, parts and gradient equal the float64 reference."""
    g = torch.Generator().manual_seed(7)
    n, v, k = 12, 40, 5
    z = torch.randn(n, v, generator=g) * 3
    ids, lp, tail = topk_targets(torch.randn(n, v, generator=g) * 3, k, temperature)
    target_mask = torch.ones(n, k, dtype=torch.bool)
    target_mask[2, 3:] = False  # a ragged row: its dropped slots' mass goes to the tail, as the labeler would
    tail[2] += lp[2, 3:].double().exp().sum().float()
    ids[2, 3:] = ids[2, 0]  # junk ids on the padding slots, repeating a real one
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    position_mask = torch.ones(n, dtype=torch.bool)
    position_mask[5] = False
    beta = BETA[kind]

    a = z.clone().requires_grad_(True)
    loss, parts = distill_loss(
        a,
        ids,
        lp,
        tail,
        labels,
        alpha=alpha,
        kind=kind,
        temperature=temperature,
        beta=beta,
        position_mask=position_mask,
        target_mask=target_mask,
    )
    loss.backward()
    b = z.double().requires_grad_(True)
    ref, kd, ce = dense_distill(
        b,
        ids,
        lp.double().exp(),
        tail.double(),
        labels,
        alpha=alpha,
        temperature=temperature,
        kind=kind,
        beta=beta,
        target_mask=target_mask,
        position_mask=position_mask,
    )
    ref.backward()
    assert a.grad is not None and b.grad is not None
    # float32 arithmetic against float64: values measured <= 2e-7 relative (every kind, T, alpha), so 2e-6;
    # gradients measured at <= 0.2 of rtol 1e-5 + atol 1e-7
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=2e-6, abs=1e-7)
    assert parts["loss"] == pytest.approx(float(ref.detach()), rel=2e-6, abs=1e-7)
    assert parts["kd"] == pytest.approx(float(kd.detach()), rel=2e-6, abs=1e-7)
    assert parts["ce"] == pytest.approx(float(ce.detach()), rel=2e-6, abs=1e-7)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- validation


def _call(**overrides: Any) -> None:
    teacher, student = logits(3, 8, 29), logits(3, 8, 30)
    ids, logp, tail = topk_targets(teacher, 2, 1.0)
    args: dict[str, Any] = {"student_logits": student, "target_ids": ids, "target_logprobs": logp, "tail_mass": tail}
    args.update(overrides)
    kd_loss(**args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "kl"}, r"kind must be one of forward-kl, .*got 'kl'"),
        ({"tail": "drop"}, r"tail must be 'bin' .*got 'drop'"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -1.0}, r"temperature must be .* got -1.0"),
        ({"kind": "jsd", "beta": 0.0}, r"jsd needs 0 < beta < 1, got beta=0.0.*forward-kl.*reverse-kl"),
        ({"kind": "jsd", "beta": 1.0}, r"jsd needs 0 < beta < 1, got beta=1.0"),
        ({"kind": "skew-kl", "beta": 1.0}, r"skew-kl needs 0 <= beta < 1.*got beta=1.0"),
        ({"kind": "skew-rkl", "beta": -0.1}, r"skew-rkl needs 0 <= beta < 1.*got beta=-0.1"),
        ({"student_logits": torch.zeros(3)}, r"student_logits must be an \(N, V\) float tensor, got \(3,\)"),
        ({"target_ids": torch.zeros(4, 2, dtype=torch.long)}, r"target_ids must be \(N, K\) with N=3.*got \(4, 2\)"),
        ({"target_ids": torch.zeros(3, 2)}, r"target_ids must be an integer tensor, got torch.float32"),
        ({"target_logprobs": torch.zeros(3, 3)}, r"target_logprobs must be .* shape \(3, 2\).* got \(3, 3\)"),
        ({"tail_mass": torch.zeros(3, 1)}, r"tail_mass must be .* shape \(3,\), got \(3, 1\)"),
        ({"position_mask": torch.ones(3)}, r"position_mask must be a bool tensor .* got \(3,\) torch.float32"),
        ({"target_mask": torch.ones(3, 5, dtype=torch.bool)}, r"target_mask must be .* \(3, 2\).* got \(3, 5\)"),
        ({"target_ids": torch.full((3, 2), 8)}, r"target ids must lie in \[0, 8\).* got \[8, 8"),
    ],
)
def test_kd_loss_rejects_bad_input(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_other_validation_errors() -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\].*got 1.5"):
        teacher = logits(2, 5, 31)
        ids, logp, tail = topk_targets(teacher, 2, 1.0)
        distill_loss(teacher, ids, logp, tail, torch.tensor([0, 1]), alpha=1.5)
    with pytest.raises(ValueError, match=r"labels must be < the number of classes 5, got max 5"):
        hard_ce(logits(2, 5, 32), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"labels must be an \(2,\) integer tensor"):
        hard_ce(logits(2, 5, 32), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"row must sum to num_samples=4 .*got row sums \[3\]"):
        sampled_targets(torch.tensor([[2, 1]]), 4)
    with pytest.raises(ValueError, match=r"counts must be an \(N, K\) integer tensor"):
        sampled_targets(torch.tensor([[2.0, 2.0]]), 4)
    with pytest.raises(ValueError, match=r"num_samples must be >= 1, got 0"):
        sampled_targets(torch.tensor([[0, 0]]), 0)


def test_cheap_and_exact_student_tails_agree() -> None:
    """The O(N K) tail (large tails) and the exact masked logsumexp (tiny tails) give the same values."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 300, generator=g) * torch.linspace(0.5, 12, 64)[:, None]  # flat ... very peaked
    ids = logits.topk(8, dim=-1).indices
    _, tail = student_bins(logits, ids, None, 1.0)
    z = logits.double()
    kept = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    exact = torch.logsumexp(z.masked_fill(kept, -math.inf), -1) - torch.logsumexp(z, -1)
    torch.testing.assert_close(tail.double(), exact, rtol=0, atol=1e-3)  # log-space: 0.1% of the tail mass


# ---------------------------------------------------------------------------------------------------- fused default


def fused_case(case: str, temperature: float) -> dict[str, Any]:
    """Inputs of one kind of row the store produces, for distill_loss's fused path (forward-kl, tail="bin", no
    position_mask), and the teacher's bins as the reference reads them (probabilities, float64)."""
    g = torch.Generator().manual_seed(11)
    n, v, k = 10, 40, 6
    z = torch.randn(n, v, generator=g) * 3
    teacher = torch.log_softmax(torch.randn(n, v, generator=g) * 3 / temperature, -1)
    lp, ids = teacher.topk(k, dim=-1)
    tail = (1 - lp.double().exp().sum(-1)).clamp_min(0).float()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[4] = -100
    mask = None
    teacher_kept = lp.double().exp()
    if case == "padding slots":
        mask = torch.ones(n, k, dtype=torch.bool)
        mask[1, 2:] = False
        ids[1, 2:] = ids[1, 0]  # junk ids on padding slots that repeat a real one
        tail[1] += lp[1, 2:].double().exp().sum().float()  # the dropped slots' mass is tail, as the labeler stores
    elif case == "all ids kept":  # k = V: the reference is the dense full-vocabulary KD
        lp, ids = teacher.topk(v, dim=-1)
        tail = torch.zeros(n)
        teacher_kept = lp.double().exp()
    elif case == "tiny student tail":  # the student's tail ~e^-70, far below float32 eps; the teacher's is large
        z[:3].scatter_(1, ids[:3], 80.0)
    elif case == "sampled":  # 20 draws per row, as ids + counts (stages.label's sampled store)
        counts = torch.zeros(n, k, dtype=torch.long)
        draws = torch.multinomial(teacher.exp(), 20, replacement=True, generator=g)
        mask = torch.zeros(n, k, dtype=torch.bool)
        ids = torch.zeros(n, k, dtype=torch.long)
        for r, row in enumerate(draws):
            u, c = torch.unique(row, return_counts=True)
            m = min(len(u), k)
            ids[r, :m], counts[r, :m], mask[r, :m] = u[:m], c[:m], True
            counts[r, m - 1] += 20 - int(counts[r, :m].sum())  # keep each row summing to 20
        lp, tail = sampled_targets(counts, 20)
        teacher_kept = counts.double() / 20  # the empirical distribution: the unbiased estimator's target
    elif case == "bfloat16 logits":
        z = z.bfloat16()
    return {"z": z, "ids": ids, "lp": lp, "tail": tail, "labels": labels, "mask": mask, "teacher_kept": teacher_kept}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(
    "case", ["topk", "padding slots", "all ids kept", "tiny student tail", "sampled", "bfloat16 logits"]
)
def test_fused_default_loss_matches_dense_reference(temperature: float, alpha: float, case: str) -> None:
    """distill_loss's forward-kl + CE path writes its gradient in closed form: its value, parts and gradient must
    equal the dense float64 reference and autograd through it, on every kind of row the store produces."""
    c = fused_case(case, temperature)
    a = c["z"].clone().requires_grad_(True)
    loss, parts = distill_loss(
        a, c["ids"], c["lp"], c["tail"], c["labels"], alpha=alpha, temperature=temperature, target_mask=c["mask"]
    )
    loss.backward()
    # bf16 logits: the reference sees the very same rounded values, so only the loss's float32 arithmetic differs
    b = c["z"].double().requires_grad_(True)
    ref, kd, ce = dense_distill(
        b,
        c["ids"],
        c["teacher_kept"],
        c["tail"].double(),
        c["labels"],
        alpha=alpha,
        temperature=temperature,
        target_mask=c["mask"],
    )
    ref.backward()
    assert a.grad is not None and b.grad is not None and a.grad.dtype == a.dtype
    # Values: the loss computes in float32 (bf16 logits are exact in float32), the reference in float64; measured
    # relative error <= 2e-7 in every case (bf16: 1e-7), so 2e-6, a factor 10 above.
    for got, want in ((float(loss.detach()), ref), (parts["loss"], ref), (parts["kd"], kd), (parts["ce"], ce)):
        assert got == pytest.approx(float(want.detach()), rel=2e-6, abs=1e-7)
    # Gradients: float32, measured at <= 0.6 of rtol 1e-5 + atol 1e-7 (the tiny-tail rows; others <= 0.06). A bf16
    # input gets its gradient back in bf16, rounded to an 8-bit significand: up to 2^-8 relative (rounding the
    # float64 gradient alone gives 3.7e-3 here), plus float32's share; measured at 0.9 of this bound.
    tol = {"rtol": 2**-8 + 1e-5, "atol": 1e-7} if case == "bfloat16 logits" else {"rtol": 1e-5, "atol": 1e-7}
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad.double(), b.grad, **tol)
