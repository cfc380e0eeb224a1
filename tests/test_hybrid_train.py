"""Hybrid targets in training: the collated batch, the forward-KL loss against a float64 reference (value and
gradient), its unbiasedness over draws, and ``pipeline train`` on a labelled hybrid store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kd_pipeline.data.dataset import collate
from kd_pipeline.stages.label import run as label
from kd_pipeline.stages.losses import distill_loss, hybrid_targets, kd_loss
from kd_pipeline.stages.train import TrainConfig, TrainConfigError
from kd_pipeline.stages.train import run as train
from tests.test_hybrid import hybrid_manifest, random_hybrid_example
from tests.test_hybrid_label import label_cfg, tiny  # noqa: F401  (tiny: a module-scoped fixture)
from tests.test_sampled import _student

# ---------------------------------------------------------------------------------------------------- collate


@pytest.mark.parametrize("task", ["causal-lm", "masked-lm", "seq-cls"])
def test_collate_hybrid_puts_the_draws_beside_the_head(task: str) -> None:
    spec = hybrid_manifest(task=task).targets
    rng = np.random.default_rng(3)
    examples = [random_hybrid_example(rng, task, spec, 50, zero_tail=0.3) for _ in range(5)]
    batch = collate(examples, task)
    ids, lp, mask, tail = batch["target_ids"], batch["target_logprobs"], batch["target_mask"], batch["tail_mass"]
    U = max(int(np.diff(ex["tail_offsets"]).max(initial=0)) for ex in examples)
    assert ids.shape[-1] == lp.shape[-1] == mask.shape[-1] == 4 + U and mask.dtype == torch.bool
    assert not bool(tail.any())  # the draws carry the tail's mass: no tail bin
    for b, ex in enumerate(examples):
        off = ex["tail_offsets"]
        for p in range(len(off) - 1):
            row = (b, p) if task != "seq-cls" else (b,)
            np.testing.assert_array_equal(ids[row][:4].numpy(), ex["target_ids"][p])
            np.testing.assert_array_equal(lp[row][:4].numpy(), ex["target_logprobs"][p].astype(np.float32))
            n = off[p + 1] - off[p]
            np.testing.assert_array_equal(ids[row][4 : 4 + n].numpy(), ex["tail_ids"][off[p] : off[p + 1]])
            weight = float(ex["tail_mass"][p]) * ex["tail_counts"][off[p] : off[p + 1]] / 20.0
            np.testing.assert_allclose(lp[row][4 : 4 + n].numpy(), np.log(weight), rtol=1e-6)
            assert bool(mask[row][: 4 + n].all()) and not bool(mask[row][4 + n :].any())
            # the estimate sums to the whole mass: exact head + tail_mass * (counts / N)
            total = np.exp(lp[row][mask[row]].double().numpy()).sum()
            assert total == pytest.approx(1.0, abs=2e-3)


# ---------------------------------------------------------------------------------------------------- the loss


def _hybrid_case(rng: np.random.Generator, rows: int, vocab: int, k: int, n: int, temperature: float) -> dict[str, Any]:
    """A dense teacher, its exact top-k and tail, and n draws per row from the teacher restricted to the rest."""
    logits = rng.normal(size=(rows, vocab)) * 2
    p = np.exp(logits / temperature)
    p /= p.sum(axis=1, keepdims=True)  # (rows, V) float64
    top = np.argsort(-p, axis=1)[:, :k]
    lp = np.log(np.take_along_axis(p, top, axis=1)).astype(np.float32)
    tail = (1.0 - np.exp(lp.astype(np.float64)).sum(axis=1)).astype(np.float32)
    return {"p": p, "top": top, "lp": lp, "tail": tail, "draw": lambda: _draw(rng, p, top, n)}


def _draw(rng: np.random.Generator, p: np.ndarray, top: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, V) int64 counts of n draws per row from p restricted to the ids outside ``top``, as ids + counts
    padded to (rows, U)."""
    rows, vocab = p.shape
    ids = np.zeros((rows, n), dtype=np.int64)
    counts = np.zeros((rows, n), dtype=np.int64)
    for r in range(rows):
        rest = p[r].copy()
        rest[top[r]] = 0.0
        u, c = np.unique(rng.choice(vocab, n, p=rest / rest.sum()), return_counts=True)
        ids[r, : len(u)], counts[r, : len(u)] = u, c
    return ids, counts


def _reference(
    z: np.ndarray, case: dict[str, Any], ids: np.ndarray, counts: np.ndarray, n: int, labels: np.ndarray, **kw: Any
) -> tuple[float, float]:
    """(loss, plug-in entropy term) in float64: alpha * T^2 * mean KL(p̂ || q) + (1 - alpha) * mean CE, where p̂ is
    exp(lp) on the top-k, tail * count / n on the drawn ids, 0 elsewhere (normalised), q = softmax(z / T)."""
    alpha, temperature = kw["alpha"], kw["temperature"]
    rows, vocab = z.shape
    p_hat = np.zeros((rows, vocab))
    for r in range(rows):
        p_hat[r, case["top"][r]] = np.exp(case["lp"][r].astype(np.float64))
        p_hat[r, ids[r][counts[r] > 0]] = float(case["tail"][r]) * counts[r][counts[r] > 0] / n
    p_hat /= p_hat.sum(axis=1, keepdims=True)
    zt = z / temperature
    log_q = zt - np.log(np.exp(zt - zt.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)) - zt.max(1, keepdims=1)
    safe = np.where(p_hat > 0, p_hat, 1.0)
    entropy_term = (p_hat * np.log(safe)).sum(axis=1)  # sum p̂ log p̂: no gradient
    kd = (entropy_term - (p_hat * log_q).sum(axis=1)).mean() * temperature**2
    log_s = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ce = -log_s[np.arange(rows), labels].mean()
    return alpha * kd + (1 - alpha) * ce, float(entropy_term.mean())


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_hybrid_forward_kl_equals_a_float64_reference(path: str) -> None:
    rng = np.random.default_rng(0)
    rows, vocab, k, n, temperature, alpha = 6, 30, 4, 9, 2.0, 0.7
    case = _hybrid_case(rng, rows, vocab, k, n, temperature)
    ids, counts = case["draw"]()
    targets = hybrid_targets(
        torch.as_tensor(case["top"]),
        torch.as_tensor(case["lp"]),
        torch.as_tensor(case["tail"]),
        torch.as_tensor(ids),
        torch.as_tensor(counts),
        n,
    )
    tid, tlp, tmask, tail = targets
    assert tid.shape == (rows, k + n) and not bool(tail.any())
    z_np = rng.normal(size=(rows, vocab)) * 1.5
    labels = rng.integers(0, vocab, rows)
    z = torch.tensor(z_np, dtype=torch.float32, requires_grad=True)
    # the default route takes the fused closed-form gradient; a position mask routes through autograd
    pm = None if path == "fused" else torch.ones(rows, dtype=torch.bool)
    loss, _ = distill_loss(
        z, tid, tlp, tail, torch.as_tensor(labels), alpha=alpha, temperature=temperature, target_mask=tmask,
        position_mask=pm,
    )  # fmt: skip
    loss.backward()
    z64 = torch.tensor(z_np, dtype=torch.float64, requires_grad=True)
    ref, _ = _reference(z_np, case, ids, counts, n, labels, alpha=alpha, temperature=temperature)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # the reference's gradient by autograd, through the same float64 formula written in torch
    p_hat = torch.zeros(rows, vocab, dtype=torch.float64)
    for r in range(rows):
        p_hat[r, case["top"][r]] = torch.from_numpy(np.exp(case["lp"][r].astype(np.float64)))
        real = counts[r] > 0
        p_hat[r, ids[r][real]] = torch.from_numpy(float(case["tail"][r]) * counts[r][real] / n)
    p_hat = p_hat / p_hat.sum(1, keepdim=True)
    log_q = torch.log_softmax(z64 / temperature, dim=-1)
    kd = -(p_hat * log_q).sum(1).mean() * temperature**2  # the entropy term has no gradient
    ce = torch.nn.functional.cross_entropy(z64, torch.as_tensor(labels))
    (alpha * kd + (1 - alpha) * ce).backward()
    assert z.grad is not None and z64.grad is not None
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


def test_hybrid_forward_kl_is_unbiased_over_draws() -> None:
    """Averaged over many independent draw sets, the estimator's gradient equals the dense forward KL's, T (q - p),
    and its value minus the plug-in entropy term equals the dense cross-entropy -T^2 sum p log q."""
    rng = np.random.default_rng(1)
    vocab, k, n, temperature, sets = 12, 3, 5, 1.5, 20_000
    case = _hybrid_case(rng, 1, vocab, k, n, temperature)
    draws = [case["draw"]() for _ in range(sets)]  # each: (1, n) ids and counts
    ids = np.concatenate([d[0] for d in draws])  # (sets, n): one row per draw set of the same position
    counts = np.concatenate([d[1] for d in draws])
    rep = {key: np.repeat(case[key], sets, axis=0) for key in ("top", "lp", "tail")}
    tid, tlp, tmask, tail = hybrid_targets(
        *(torch.as_tensor(rep[key]) for key in ("top", "lp", "tail")), torch.as_tensor(ids), torch.as_tensor(counts), n
    )
    z_np = rng.normal(size=(1, vocab))
    z = torch.tensor(np.repeat(z_np, sets, axis=0), dtype=torch.float32, requires_grad=True)
    loss, _ = distill_loss(z, tid, tlp, tail, torch.zeros(sets, dtype=torch.long), alpha=1.0, temperature=temperature,
                           target_mask=tmask)  # fmt: skip
    loss.backward()
    assert z.grad is not None
    per_set = z.grad.double().numpy() * sets  # (sets, V): each draw set's own gradient (the loss is a mean)
    q = np.exp(z_np[0] / temperature) / np.exp(z_np[0] / temperature).sum()
    dense = temperature * (q - case["p"][0])
    bound = 5 * per_set.std(axis=0) / np.sqrt(sets) + 1e-5
    assert np.all(np.abs(per_set.mean(axis=0) - dense) <= bound), (per_set.mean(axis=0) - dense, bound)
    # the value: the loss is T^2 * mean over sets of [sum p̂ log p̂ - sum p̂ log q]
    entropy = np.zeros(sets)
    cross = np.zeros(sets)
    log_q = np.log(q)
    for s in range(sets):
        p_hat = np.zeros(vocab)
        p_hat[case["top"][0]] = np.exp(case["lp"][0].astype(np.float64))
        real = counts[s] > 0
        p_hat[ids[s][real]] = float(case["tail"][0]) * counts[s][real] / n
        p_hat /= p_hat.sum()
        entropy[s] = (p_hat[p_hat > 0] * np.log(p_hat[p_hat > 0])).sum()
        cross[s] = -(p_hat * log_q).sum()
    assert float(loss.detach()) == pytest.approx(temperature**2 * (entropy + cross).mean(), rel=1e-5)
    dense_cross = -(case["p"][0] * log_q).sum()
    assert abs(cross.mean() - dense_cross) <= 5 * cross.std() / np.sqrt(sets)
    # the estimate is informative: a single draw set's cross-entropy does vary
    assert cross.std() > 1e-3


def test_hybrid_targets_refuse_bad_counts() -> None:
    top, lp, tail = torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), -2.0), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="sum to num_samples=4 or to 0"):
        hybrid_targets(top, lp, tail, torch.ones(2, 2, dtype=torch.long), torch.tensor([[2, 1], [4, 0]]), 4)
    with pytest.raises(ValueError, match="integers"):
        hybrid_targets(top, lp, tail, torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2), 4)


def test_other_kinds_run_on_hybrid_targets() -> None:
    """Biased but well defined: every kind gives a finite loss and gradient on hybrid targets."""
    rng = np.random.default_rng(2)
    case = _hybrid_case(rng, 5, 20, 3, 6, 1.0)
    ids, counts = case["draw"]()
    t = hybrid_targets(*(torch.as_tensor(case[x]) for x in ("top", "lp", "tail")), torch.as_tensor(ids),
                       torch.as_tensor(counts), 6)  # fmt: skip
    for kind in ("reverse-kl", "jsd", "skew-kl", "skew-rkl", "tvd"):
        z = torch.randn(5, 20, requires_grad=True)
        value = kd_loss(z, t[0], t[1], t[3], kind=kind, target_mask=t[2], beta=0.3)
        value.backward()
        assert torch.isfinite(value) and z.grad is not None and bool(torch.isfinite(z.grad).all())


# ---------------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def hybrid_store(tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    root = tmp_path_factory.mktemp("hybrid-train")
    label(label_cfg(tiny, root / "store", samples=50), log=lambda m: None)
    return {"store": root / "store", "student": _student(root / "student", tiny["vocab"] + 3)}


def _train_cfg(s: dict[str, Any], out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "store": str(s["store"]),
        "student": str(s["student"]),
        "out": str(out),
        "steps": 8,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup": 2,
        "eval_every": 4,
        "save_every": 4,
        "log_every": 1,
        "alpha": 0.9,
    }
    base.update(kw)
    return TrainConfig(**base)


def test_train_on_a_hybrid_store(hybrid_store: dict[str, Any], tmp_path: Path) -> None:
    logs: list[str] = []
    train(_train_cfg(hybrid_store, tmp_path / "a"), log=logs.append)
    assert not any("warning" in line for line in logs)
    assert any("top-4 + 50 tail samples" in line for line in logs)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["split"] == "train"]
    assert len(kd) == 8 and all(np.isfinite(kd)) and all(x >= -1e-4 for x in kd)
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals and all(np.isfinite(r["kd"]) for r in evals)
    assert (tmp_path / "a" / "final" / "config.json").exists()


def test_train_hybrid_store_biased_losses_warn_and_renormalise_is_refused(
    hybrid_store: dict[str, Any], tmp_path: Path
) -> None:
    logs: list[str] = []
    train(_train_cfg(hybrid_store, tmp_path / "r", loss="jsd", steps=2), log=logs.append)
    warnings = [line for line in logs if "no unbiased estimator" in line]
    assert len(warnings) == 1 and "hybrid targets" in warnings[0] and "from the tail" in warnings[0]
    with pytest.raises(TrainConfigError, match="--tail renormalise .* a hybrid store has no tail to drop"):
        train(_train_cfg(hybrid_store, tmp_path / "n", tail="renormalise"), log=lambda m: None)
