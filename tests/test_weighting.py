"""Exact token weighting (stages/weighting.py): an optimizer step's loss is the sum over all of its positions divided
by their number, whatever its split into micro-batches and ranks.

The losses with the step's counts, summed over unequal parts, equal the float64 mean over all rows (value and
gradients; the soft and the hard term with different counts). ``pipeline train`` on unpacked examples of unequal
lengths: 4 micro-batches of 2, one batch of 8 and 2 torchrun ranks of 2 x 2 take the same step, and its gradient
(read back from the checkpoint's AdamW state) and logged loss equal a float64 reference written out here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kd_pipeline import data
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from kd_pipeline.stages.losses import chunked_distill_loss, distill_loss
from kd_pipeline.stages.train import TrainConfig
from kd_pipeline.stages.train import run as train
from tests.test_chunked_loss import VALUE, assert_matches, make_case, run_dense
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl

# ---------------------------------------------------------------------------------------------------- the losses

# (kind, T): the default loss's closed-form gradient at T = 2 and T = 1, the shared-logsumexp path (T = 1, another
# kind) and the generic kd_loss + hard_ce path; the chunked loss per chunk: closed form or autograd
PATHS = [("forward-kl", 2.0), ("forward-kl", 1.0), ("reverse-kl", 1.0), ("jsd", 2.0)]
PARTS = [slice(0, 2), slice(2, 9), slice(9, 13)]  # unequal micro-batches of make_case's 13 rows


@pytest.mark.parametrize("head", ["dense", "chunked"])
@pytest.mark.parametrize(("kind", "temperature"), PATHS)
def test_shares_over_unequal_parts_add_up_to_the_mean(head: str, kind: str, temperature: float) -> None:
    """Each part's loss with the whole step's counts (13 positions with targets, 8 with labels: rows 5-9 have none)
    is its share: the shares' sum and its gradients equal the float64 loss of all 13 rows at once, and the parts
    ("kd", "ce", "loss") add up to the reference's. Without the counts each part is its own mean, and the sum of
    means divided by the number of parts (the old accumulation) is not: the split does change the weighting."""
    c = make_case("topk")
    opts: dict[str, Any] = {"alpha": 0.5, "temperature": temperature, "kind": kind, "beta": 0.3}
    ref = run_dense(c, **opts)
    n_kd, n_ce = len(c["labels"]), int((c["labels"] >= 0).sum())
    assert (n_kd, n_ce) == (13, 8)
    x = [c[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    total = torch.zeros(())
    parts = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    naive = 0.0
    for rows in PARTS:
        targets = (c["ids"][rows], c["lp"][rows], c["tail"][rows], c["labels"][rows])
        mask = c["mask"][rows]
        if head == "chunked":
            loss, got = chunked_distill_loss(
                x[0][rows], x[1], x[2], *targets, target_mask=mask, chunk=3, kd_count=n_kd, ce_count=n_ce, **opts
            )
            own, _ = chunked_distill_loss(x[0][rows], x[1], x[2], *targets, target_mask=mask, chunk=3, **opts)
        else:
            z = x[0][rows] @ x[1].T + x[2]  # (n, V) float32
            loss, got = distill_loss(z, *targets, target_mask=mask, kd_count=n_kd, ce_count=n_ce, **opts)
            own, _ = distill_loss(z, *targets, target_mask=mask, **opts)
        total = total + loss
        parts = {key: parts[key] + got[key] for key in parts}
        naive += float(own.detach()) / len(PARTS)
    total.backward()
    grads = [t.grad for t in x]
    assert all(g is not None for g in grads)
    assert_matches((float(total.detach()), parts, [g for g in grads if g is not None]), ref)
    assert naive != pytest.approx(ref[0]["loss"], rel=1e-3)  # measured: 0.4-1.2% off, 4,000x+ the tolerance


@pytest.mark.parametrize("head", ["dense", "chunked"])
def test_a_count_of_one_is_the_sum(head: str) -> None:
    """count 1 (what evaluation sums with): the float64 mean times the number of rows, per term."""
    c = make_case("topk")
    (ref, _) = run_dense(c, alpha=1.0, temperature=2.0)
    args = (c["ids"], c["lp"], c["tail"], c["labels"])
    if head == "chunked":
        _, parts = chunked_distill_loss(c["hidden"], c["weight"], c["bias"], *args, alpha=1.0, temperature=2.0,
                                        target_mask=c["mask"], kd_count=1.0, ce_count=1.0)  # fmt: skip
    else:
        z = c["hidden"] @ c["weight"].T + c["bias"]
        _, parts = distill_loss(z, *args, alpha=1.0, temperature=2.0, target_mask=c["mask"], kd_count=1, ce_count=1)
    assert parts["kd"] == pytest.approx(ref["kd"] * 13, **VALUE)
    assert parts["ce"] == pytest.approx(ref["ce"] * 8, **VALUE)


# ---------------------------------------------------------------------------------------------------- pipeline train

# 7 unpacked examples of 2 to 15 tokens, one per shard: 2 blocks of the loader's 4 shards, so one step of 8 (or of
# 2 ranks x 2 x 2) covers the whole epoch in every configuration, with a partial last micro-batch (and, on 2 ranks,
# 4 examples on one rank and 3 on the other)
LENGTHS = [3, 15, 5, 10, 2, 11, 7]
ALPHA = 0.5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return unequal_world(tmp_path_factory.mktemp("weighting"))


def unequal_world(root: Path) -> dict[str, Any]:
    """A teacher, a store of the 7 examples of LENGTHS (top-4 at T=2, one per shard), a student with weights, and
    the float64 reference (loss, gradients) of one step over every position of the store at its weights."""
    vocab = len(make_tokenizer(root / "tok"))
    docs = [{"text": " ".join(s.split()[:n])} for s, n in zip(SENTENCES, LENGTHS, strict=False)]
    write_jsonl(root / "docs.jsonl", docs)
    make_model(root / "teacher", "causal-lm", vocab_size=vocab)
    make_model(root / "student", "causal-lm", vocab_size=vocab, seed=1, hidden=16)
    cfg = LabelConfig(
        teacher=str(root / "teacher"), data=str(root / "docs.jsonl"), out=str(root / "store"), method="topk", top_k=4,
        temperature=2.0, shard_size=1,
    )  # fmt: skip
    label(cfg, log=lambda m: None)
    store = data.open_store(root / "store")
    assert sorted(len(ex["input_ids"]) for ex in store) == sorted(LENGTHS)
    return {"root": root, "store": root / "store", "student": root / "student", "reference": _reference(root)}


def _reference(root: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """The step's loss over every position of the store and its gradient, in float64, independently of the code
    under test: each example run alone through the student loaded with transformers, the forward KL over the k+1
    bins (kept ids + tail, the teacher's bins rescaled to sum to 1) at T plus the hard cross-entropy, summed over
    all positions and divided by their number."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float64)
    store = data.open_store(root / "store")
    t = store.manifest.targets.temperature
    total, positions = torch.zeros((), dtype=torch.float64), 0
    for ex in store:
        ids = torch.as_tensor(ex["input_ids"].astype("int64"))
        z = model(input_ids=ids[None]).logits[0, :-1]  # (P, V): position i predicts token i + 1
        kept = torch.as_tensor(ex["target_ids"].astype("int64"))  # (P, K)
        p = torch.cat([torch.as_tensor(ex["target_logprobs"]).double().exp(),
                       torch.as_tensor(ex["tail_mass"]).double()[:, None]], 1)  # fmt: skip
        p = p / p.sum(-1, keepdim=True)  # (P, K+1)
        s = torch.softmax(z / t, -1)
        q = torch.cat([s.gather(1, kept), 1 - s.gather(1, kept).sum(-1, keepdim=True)], 1)  # tails >> eps here
        kl = (p * (p.log() - q.log())).sum(-1)  # (P,)
        nll = -torch.log_softmax(z, -1).gather(1, ids[1:, None])[:, 0]  # (P,)
        total = total + (ALPHA * t**2 * kl + (1 - ALPHA) * nll).sum()
        positions += len(nll)
    loss = total / positions
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _trained(run: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A one-step run's logged train row, its gradient (AdamW's first moment after one step is (1 - 0.9) * g; the
    parameters are numbered as train.py groups them: matrices, then vectors) and its weights."""
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["split"] == "train"]
    names = [n for n, p in AutoModelForCausalLM.from_pretrained(run / "final").named_parameters()]
    shapes = {n: p.ndim for n, p in AutoModelForCausalLM.from_pretrained(run / "final").named_parameters()}
    order = [n for n in names if shapes[n] >= 2] + [n for n in names if shapes[n] < 2]
    state = load_file(str(run / "checkpoints" / "step-000001" / "optimizer.safetensors"))
    grads = {name: state[f"{i}.exp_avg"].double() / 0.1 for i, name in enumerate(order)}
    weights = load_file(str(run / "checkpoints" / "step-000001" / "model.safetensors"))
    return row, grads, weights


def _train(world: dict[str, Any], out: Path, **kw: Any) -> None:
    cfg = TrainConfig(
        store=str(world["store"]), student=str(world["student"]), out=str(out), steps=1, max_grad_norm=0.0,
        eval_fraction=0.0, save_every=1, log_every=1, warmup=0, alpha=ALPHA, **kw,
    )  # fmt: skip
    train(cfg, log=lambda m: None)


def _assert_step(got: tuple[dict[str, Any], dict[str, torch.Tensor], Any], reference: Any) -> None:
    row, grads, _ = got
    ref_loss, ref_grads = reference
    assert row["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert row["tokens"] == sum(n - 1 for n in LENGTHS)
    assert_same_gradients(grads, ref_grads)


def assert_same_gradients(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Every parameter's gradient (float32 arithmetic) equals the float64 reference's."""
    assert got.keys() == reference.keys()
    for name, g in got.items():
        r = reference[name]
        # float32 against float64, through a 2-layer model: measured <= 1.4e-6 of the largest entry
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()), msg=lambda m, n=name: f"{n}: {m}")


def test_accumulation_equals_one_big_batch(world: dict[str, Any], tmp_path: Path) -> None:
    """4 micro-batches of 2 (2, 2, 2, 1 examples of unequal lengths; head and loss in chunks of 5 positions) and one
    batch of 8 (7 examples; the dense head and loss) take the step of the float64 reference: the same loss, gradient
    and weights."""
    _train(world, tmp_path / "accum", batch_size=2, grad_accum=4, loss_chunk=5)
    _train(world, tmp_path / "big", batch_size=8, grad_accum=1, loss_chunk=0)
    accum, big = _trained(tmp_path / "accum"), _trained(tmp_path / "big")
    for got in (accum, big):
        _assert_step(got, world["reference"])
    for name, w in accum[2].items():
        torch.testing.assert_close(w, big[2][name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_two_ranks_equal_one(world: dict[str, Any], tmp_path: Path) -> None:
    """2 torchrun ranks (gloo) of 2 micro-batches of 2 (4 examples on rank 0, 3 on rank 1: unequal positions too)
    take the step of the float64 reference, the same as one process with one batch of 8."""
    from tests.test_scale_out import torchrun

    out = tmp_path / "ranked"
    proc = torchrun(
        "train", "--store", str(world["store"]), "--student", str(world["student"]), "--out", str(out),
        "--steps", "1", "--batch-size", "2", "--grad-accum", "2", "--max-grad-norm", "0", "--eval-fraction", "0",
        "--save-every", "1", "--log-every", "1", "--warmup", "0", "--alpha", str(ALPHA), "--trace",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = [json.loads((out / "trace" / f"rank-{r:05d}.jsonl").read_text()) for r in (0, 1)]
    assert sorted(len(t["examples"]) for t in traces) == [3, 4]  # the ranks held unequal shares
    ranked = _trained(out)
    _assert_step(ranked, world["reference"])
    _train(world, tmp_path / "single", batch_size=8)
    single = _trained(tmp_path / "single")
    for name, w in ranked[2].items():
        torch.testing.assert_close(w, single[2][name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------- evaluation


class _FirstToken(torch.nn.Module):
    """A classifier whose logits are a table row picked by the example's first token: (B, C) at the examples."""

    loss_chunk = 0

    def __init__(self, vocab: int, classes: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, classes, generator=torch.Generator().manual_seed(0)) * 2)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor, positions: Any
    ) -> Any:
        return self.table[input_ids[:, 0]][select]


def test_evaluation_divides_each_term_by_its_own_positions(tmp_path: Path) -> None:
    """A seq-cls store where every third example has no label: evaluation's KD loss is the mean over every example
    (all have targets, as in training), its CE and accuracy the means over the labelled ones (float64 reference)."""
    import numpy as np

    from kd_pipeline.data import ShardBuilder, StoreWriter
    from kd_pipeline.stages.train import evaluate
    from tests.conftest import make_manifest, random_example

    m = make_manifest(task="seq-cls", k=4)
    rng = np.random.default_rng(3)
    with StoreWriter(tmp_path / "store", m) as w:
        b = ShardBuilder("seq-cls", m.targets)
        for i in range(12):
            ex = random_example(rng, "seq-cls", m.targets, m.vocab_size)
            ex["label"] = ex["label"] if i % 3 else np.array([-1])
            b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"], ex["label"], None)
        w.write_shard(0, b.build(), {"entropy_sum": 1.0, "count": 1.0})
        w.finish()
    net, t = _FirstToken(m.vocab_size, 50), m.targets.temperature
    got = evaluate(net, (data.open_store(tmp_path / "store"), {}), TrainConfig(batch_size=5), "seq-cls", t,
                   torch.device("cpu"), 0, 1)  # fmt: skip

    kl, nll, correct = [], [], []
    for ex in data.open_store(tmp_path / "store"):  # the stored (float16) targets
        z = net.table.detach().double()[int(ex["input_ids"][0])]  # (C,)
        s = torch.softmax(z / t, -1)
        ids = torch.as_tensor(ex["target_ids"][0].astype("int64"))
        p = torch.cat([torch.as_tensor(ex["target_logprobs"][0]).double().exp(),
                       torch.as_tensor(ex["tail_mass"]).double()])  # fmt: skip
        p = p / p.sum()
        q = torch.cat([s[ids], 1 - s[ids].sum(0, keepdim=True)])
        kl.append(float((p * (p.log() - q.log())).sum()) * t**2)
        if ex["label"][0] >= 0:
            nll.append(-float(torch.log_softmax(z, -1)[int(ex["label"][0])]))
            correct.append(int(z.argmax()) == int(ex["label"][0]))
    assert len(nll) == 8
    assert got["kd"] == pytest.approx(sum(kl) / len(kl), rel=1e-5)
    assert got["ce"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert got["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert got["positions"] == len(nll)
