"""The chunked head-and-loss (``chunked_distill_loss``) against dense float64 references: value, parts and the
gradients with respect to the hidden states, the head's weight and its bias, for every loss, every kind of row the
store produces, chunk sizes that do and do not divide N, float32 and bfloat16, logit scale and soft-capping, tied
embeddings; and proof in a clean process that (positions x vocabulary) logits never exist."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_pipeline.stages.losses import LOSS_KINDS, chunked_distill_loss, rows_per_chunk, sampled_targets
from tests.test_losses import BETA, dense_distill, reference

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- references


def renormalised_distill(
    z: torch.Tensor,
    ids: torch.Tensor,
    teacher_kept: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: str,
    beta: float,
    target_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tail="renormalise"`` in float64 from its definition: both distributions renormalised over the kept ids,
    the tail dropped; (loss, kd, ce) like ``dense_distill``."""
    mask = target_mask if target_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    p = teacher_kept * mask
    q = torch.softmax(z / temperature, dim=-1).gather(1, ids) * mask
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    kd = reference(kind, p, q, beta).mean() * temperature**2
    labelled = labels >= 0
    nll = -torch.log_softmax(z, dim=-1)[labelled, labels[labelled]]
    ce = nll.mean() if len(nll) else z.sum() * 0.0
    return alpha * kd + (1 - alpha) * ce, kd, ce


def make_case(rows: str, dtype: torch.dtype = torch.float32, n: int = 13, h: int = 8, v: int = 40) -> dict[str, Any]:
    """Hidden states, a head (weight and bias) and targets of one kind of row the store produces.

    rows: "topk" (top-6 with two ragged rows whose padding slots hold junk ids; rows 5-9 unlabelled, so a chunk
    of 5 holds no label at all), "sampled" (20 draws per row as ids + counts, ragged), "all-kept" (k = V, tail 0).
    """
    g = torch.Generator().manual_seed(5)
    k = 6
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 3 / math.sqrt(h)  # logits with a standard deviation of ~3
    bias = torch.randn(v, generator=g) * 0.5
    teacher = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[5:10] = -100
    mask = None
    if rows == "topk":
        lp, ids = teacher.topk(k, dim=-1)
        tail = (1 - lp.double().exp().sum(-1)).clamp_min(0).float()
        mask = torch.ones(n, k, dtype=torch.bool)
        for r, keep in ((1, 2), (8, 4)):
            mask[r, keep:] = False
            ids[r, keep:] = ids[r, 0]  # junk ids on padding slots, repeating a real one
            tail[r] += lp[r, keep:].double().exp().sum().float()  # their mass is tail, as the labeler stores it
        teacher_kept = lp.double().exp()
    elif rows == "sampled":
        counts = torch.zeros(n, k, dtype=torch.long)
        ids = torch.zeros(n, k, dtype=torch.long)
        mask = torch.zeros(n, k, dtype=torch.bool)
        draws = torch.multinomial(teacher.exp(), 20, replacement=True, generator=g)
        for r, row in enumerate(draws):
            u, c = torch.unique(row, return_counts=True)
            m = min(len(u), k)
            ids[r, :m], counts[r, :m], mask[r, :m] = u[:m], c[:m], True
            counts[r, m - 1] += 20 - int(counts[r, :m].sum())  # keep each row summing to 20
        assert not bool(mask.all()), "some rows must be ragged"
        lp, tail = sampled_targets(counts, 20)
        teacher_kept = counts.double() / 20
    else:
        assert rows == "all-kept"
        lp, ids = teacher.topk(v, dim=-1)
        tail = torch.zeros(n)
        teacher_kept = lp.double().exp()
    return {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "bias": bias.to(dtype),
        "ids": ids,
        "lp": lp,
        "tail": tail,
        "labels": labels,
        "mask": mask,
        "teacher_kept": teacher_kept,
    }


def run_chunked(c: dict[str, Any], chunk: int, **opts: Any) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    """The code under test: loss value, parts and the gradients (hidden, weight, bias) in the inputs' dtype."""
    x = [c[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    loss, parts = chunked_distill_loss(
        *x, c["ids"], c["lp"], c["tail"], c["labels"], target_mask=c["mask"], chunk=chunk, **opts
    )
    loss.backward()
    grads = [t.grad for t in x]
    assert all(g is not None and g.dtype == t.dtype for g, t in zip(grads, x, strict=True))
    return float(loss.detach()), parts, [g for g in grads if g is not None]


def run_dense(
    c: dict[str, Any],
    *,
    alpha: float,
    temperature: float = 1.0,
    kind: str = "forward-kl",
    beta: float = 0.5,
    tail: str = "bin",
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """The reference: plain ``hidden @ W.T + b`` in float64 (from the very same, possibly bf16-rounded, values),
    the head's transform, the float64 loss from its definition, and autograd through all of it."""
    x = [c[name].detach().double().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    z = x[0] @ x[1].T + x[2]  # (N, V) float64
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    args = (z, c["ids"], c["teacher_kept"])
    kw: dict[str, Any] = {"alpha": alpha, "temperature": temperature, "kind": kind, "beta": beta}
    if tail == "bin":
        loss, kd, ce = dense_distill(*args, c["tail"].double(), c["labels"], target_mask=c["mask"], **kw)
    else:
        loss, kd, ce = renormalised_distill(*args, c["labels"], target_mask=c["mask"], **kw)
    loss.backward()
    grads = [t.grad for t in x]
    assert all(g is not None for g in grads)
    parts = {"loss": float(loss.detach()), "kd": float(kd.detach()), "ce": float(ce.detach())}
    return parts, [g for g in grads if g is not None]


# float32 against float64: values measured at <= 1.4e-7 relative over every test here, so rel 1e-6 (abs 1e-7 for
# parts that are ~0); gradients measured at <= 0.8 of rtol 1e-5 + atol 1e-7 (near-zero entries, where the atol
# dominates; test_losses.py's dense float32 loss measures alike).
VALUE = {"rel": 1e-6, "abs": 1e-7}
GRAD = {"rtol": 1e-5, "atol": 1e-7}


def assert_matches(
    got: tuple[float, dict[str, float], list[torch.Tensor]],
    want: tuple[dict[str, float], list[torch.Tensor]],
    value: dict[str, float] = VALUE,
    grad: dict[str, float] = GRAD,
) -> None:
    loss, parts, grads = got
    ref, ref_grads = want
    assert loss == pytest.approx(ref["loss"], **value)
    for key in ("loss", "kd", "ce"):
        assert parts[key] == pytest.approx(ref[key], **value), key
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), r, **grad, msg=lambda m, name=name: f"d/d{name}: {m}")


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("tail", ["bin", "renormalise"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_every_loss_matches_dense(kind: str, alpha: float, temperature: float, tail: str) -> None:
    """Every loss, alpha, T and tail mode, on top-k rows with padding slots and unlabelled rows, in chunks of 5
    rows (13 rows: the last chunk is ragged, and chunk [5, 10) holds no label at all): value, parts and gradients
    equal the dense float64 loss of ``hidden @ W.T + b``."""
    c = make_case("topk")
    opts = {"alpha": alpha, "temperature": temperature, "kind": kind, "beta": BETA[kind], "tail": tail}
    assert_matches(run_chunked(c, 5, **opts), run_dense(c, **opts))


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
@pytest.mark.parametrize("rows", ["topk", "sampled", "all-kept"])
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_rows_and_chunk_sizes(kind: str, rows: str, chunk: int) -> None:
    """Ragged sampled rows, all-kept rows (k = V), and chunks of 1 row, of a size that does not divide N, of N
    and of more than N: the same value and gradients as the dense loss."""
    c = make_case(rows)
    opts = {"alpha": 0.5, "temperature": 2.0, "kind": kind, "beta": BETA[kind]}
    if kind == "reverse-kl" and rows == "sampled":
        # KL(q || p) is +inf where a sampled teacher has an empty bin (its tail, an id never drawn) that the
        # student fills; the losses read such a bin as float32 eps (divergences._LOG_EMPTY_BIN). No float64
        # definition to compare with, so: the dense float32 distill_loss on the logits, by autograd.
        assert_matches(run_chunked(c, chunk, **opts), run_dense_float32(c, **opts))
        return
    assert_matches(run_chunked(c, chunk, **opts), run_dense(c, **opts))


def run_dense_float32(c: dict[str, Any], **opts: Any) -> tuple[dict[str, float], list[torch.Tensor]]:
    """``distill_loss`` on the dense float32 logits ``hidden @ W.T + b``, differentiated by autograd."""
    from kd_pipeline.stages.losses import distill_loss

    x = [c[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    loss, parts = distill_loss(
        x[0] @ x[1].T + x[2], c["ids"], c["lp"], c["tail"], c["labels"], target_mask=c["mask"], **opts
    )
    loss.backward()
    return parts, [t.grad.double() for t in x if t.grad is not None]


@pytest.mark.parametrize(
    ("kind", "rows"),
    [(k, r) for k in LOSS_KINDS for r in ("topk", "sampled") if (k, r) != ("reverse-kl", "sampled")],  # +inf: above
)
def test_bfloat16_hidden_and_head(kind: str, rows: str) -> None:
    """bfloat16 hidden states, weight and bias: computed in float32 from the exact bf16 values (so the value is as
    precise as float32's), and the gradients come back in bfloat16, each rounded once to an 8-bit significand."""
    c = make_case(rows, torch.bfloat16)
    opts = {"alpha": 0.5, "temperature": 2.0, "kind": kind, "beta": BETA[kind]}
    # rounding to bf16 (8 significant bits) alone is up to half an ulp, 2^-8 relative, plus float32's share; an
    # upper bound, not a fit: measured at 0.985 of it (some entries round by almost the whole half ulp)
    grad = {"rtol": 2**-8 + 1e-5, "atol": 1e-7}
    assert_matches(run_chunked(c, 4, **opts), run_dense(c, **opts), grad=grad)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("logit_scale", "softcap"), [(0.3, None), (None, 2.5), (1.7, 4.0)])
@pytest.mark.parametrize("kind", ["forward-kl", "jsd", "tvd"])
def test_logit_scale_and_softcap(
    kind: str, logit_scale: float | None, softcap: float | None, temperature: float
) -> None:
    """The head's transform (Cohere's logit scale, Gemma 2's soft cap, both) with the closed-form gradient
    (forward-kl) and the autograd one (jsd, tvd): the chain rule through tanh and the scale is applied."""
    c = make_case("topk")
    opts = {"alpha": 0.5, "temperature": temperature, "kind": kind, "beta": BETA[kind]}
    head = {"logit_scale": logit_scale, "softcap": softcap}
    assert_matches(run_chunked(c, 4, **opts, **head), run_dense(c, **opts, **head))


def test_without_bias_frozen_head_and_no_grad() -> None:
    """No bias; a frozen head gets no gradient (and none is computed); under no_grad the value is the same."""
    c = make_case("sampled")
    hidden = c["hidden"].clone().requires_grad_(True)
    args = (c["ids"], c["lp"], c["tail"], c["labels"])
    loss, parts = chunked_distill_loss(hidden, c["weight"], None, *args, alpha=0.5, target_mask=c["mask"], chunk=3)
    loss.backward()
    x = hidden.detach().double().requires_grad_(True)
    ref, *_ = dense_distill(
        x @ c["weight"].double().T, c["ids"], c["teacher_kept"], c["tail"].double(), c["labels"], alpha=0.5,
        temperature=1.0, target_mask=c["mask"],
    )  # fmt: skip
    ref.backward()
    assert hidden.grad is not None and x.grad is not None
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), **VALUE)
    torch.testing.assert_close(hidden.grad.double(), x.grad, **GRAD)
    with torch.no_grad():
        value, _ = chunked_distill_loss(hidden, c["weight"], None, *args, alpha=0.5, target_mask=c["mask"], chunk=3)
    assert not value.requires_grad and float(value) == parts["loss"]


def test_empty_batch_gives_zero_loss_and_zero_gradients() -> None:
    """A rank's padding-only batch: loss 0 and zero (not missing) gradients, so DDP still reduces the head."""
    w = torch.randn(7, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    empty = torch.zeros(0, 3, dtype=torch.long)
    loss, parts = chunked_distill_loss(
        h, w, None, empty, torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, dtype=torch.long), alpha=0.5, chunk=2
    )
    loss.backward()
    assert parts == {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    assert w.grad is not None and h.grad is not None and not w.grad.any() and h.grad.shape == (0, 4)


def test_tied_embeddings_get_both_gradients() -> None:
    """A tied student: the head's weight IS the input embedding. The chunked head's gradient flows into the same
    parameter as the input side's, and the sum equals the float64 dense path (model logits -> loss) exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 40, (2, 9), generator=g)
    teacher = torch.log_softmax(torch.randn(18, 40, generator=g) * 3, -1)
    lp, ids = teacher.topk(5, dim=-1)
    tail = (1 - lp.double().exp().sum(-1)).clamp_min(0).float()
    labels = input_ids.reshape(-1)
    opts: dict[str, Any] = {"alpha": 0.5, "temperature": 2.0}

    hidden = model.model(input_ids=input_ids)[0].reshape(18, 16)  # (N, H)
    loss, _ = chunked_distill_loss(hidden, model.lm_head.weight, None, ids, lp, tail, labels, chunk=4, **opts)
    loss.backward()
    got = model.model.embed_tokens.weight.grad
    assert got is not None

    dense = LlamaForCausalLM(config).double()
    dense.load_state_dict(model.state_dict())
    logits = dense(input_ids=input_ids).logits.reshape(18, 40)
    ref, *_ = dense_distill(logits, ids, lp.double().exp(), tail.double(), labels, **opts)
    ref.backward()
    want = dense.model.embed_tokens.weight.grad
    assert want is not None
    # float32 backbone against float64: measured <= 0.05 of this
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # both sides matter: the head side alone (hidden states held fixed) is far from the total, and so is the rest
    hidden64 = dense.model(input_ids=input_ids)[0].reshape(18, 16).detach()
    head_only, *_ = dense_distill(
        hidden64 @ dense.lm_head.weight.T, ids, lp.double().exp(), tail.double(), labels, **opts
    )
    (head_side,) = torch.autograd.grad(head_only, dense.lm_head.weight)
    err = (got.double() - want).abs().max()
    assert (want - head_side).abs().max() > 100 * err and head_side.abs().max() > 100 * err


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("Granite", {"logits_scaling": 4.0}),  # logits / 4
        ("Cohere", {"logit_scale": 0.5}),  # logits * 0.5
        # the tiny model's logits are ~0.2: a cap of 0.1 bends them
        ("Gemma2", {"final_logit_softcapping": 0.1, "head_dim": 8, "query_pre_attn_scalar": 8}),
    ],
)
def test_output_head_applies_the_models_own_transform(arch: str, extra: dict[str, Any]) -> None:
    """OutputHead (the dense head, and the scale and cap it hands the chunked loss) gives the logits the model's
    own forward gives, for each head transform transformers applies after the linear layer."""
    import transformers

    from kd_pipeline.stages.models import OutputHead

    config = getattr(transformers, f"{arch}Config")(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=32, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    head = OutputHead(model, "causal-lm")
    assert head.split
    input_ids = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=input_ids).logits[0]
        hidden = head.hidden_or_logits(input_ids, torch.ones_like(input_ids))[0]
        got = head.logits(hidden)
        z = hidden @ head.head.weight.T  # the linear layer alone
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z, want, rtol=1e-3, atol=1e-3)  # the transform matters here


@pytest.mark.parametrize(
    "problem",
    ["chunk", "softcap", "scale", "width", "bias", "kind", "ids"],
)
def test_rejects_bad_input(problem: str) -> None:
    c = make_case("topk")
    args: dict[str, Any] = {
        "hidden": c["hidden"], "weight": c["weight"], "bias": c["bias"], "target_ids": c["ids"],
        "target_logprobs": c["lp"], "tail_mass": c["tail"], "labels": c["labels"], "alpha": 0.5, "chunk": 4,
    }  # fmt: skip
    message = {
        "chunk": (r"chunk must be >= 1 row, got 0", {"chunk": 0}),
        "softcap": (r"softcap must be a finite number > 0 or None, got -1.0", {"softcap": -1.0}),
        "scale": (r"logit_scale must be a finite, non-zero number or None, got nan", {"logit_scale": math.nan}),
        "width": (r"weight must be a \(V, H\) float tensor with H=8 .* got \(40, 7\)", {"weight": torch.zeros(40, 7)}),
        "bias": (r"bias must be None or a float tensor of shape \(40,\), got \(39,\)", {"bias": torch.zeros(39)}),
        "kind": (r"kind must be one of forward-kl, .*got 'kl'", {"kind": "kl"}),
        "ids": (r"target ids must lie in \[0, 40\)", {"target_ids": c["ids"] + 40}),
    }[problem]
    with pytest.raises(ValueError, match=message[0]):
        chunked_distill_loss(**{**args, **message[1]})


def test_rows_per_chunk() -> None:
    assert rows_per_chunk(131_072) == 512 and rows_per_chunk(49_152) == 1365
    assert rows_per_chunk(50) > 1_000_000 and rows_per_chunk(10**12) == 1


# ---------------------------------------------------------------------------------------------------- memory


_MEMORY_PROBE = """
import json, resource, sys
import torch
from kd_pipeline.stages.losses import chunked_distill_loss

torch.set_num_threads(2)
n, h, v, k, chunk, kind = int(sys.argv[2]), 32, 50_000, 8, int(sys.argv[3]), sys.argv[1]
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g).requires_grad_(True)
weight = (torch.randn(v, h, generator=g) * 0.2).requires_grad_(True)
ids = torch.randint(0, v, (n, k), generator=g)
lp = torch.full((n, k), -5.0)
tail = 1 - lp.exp().sum(-1)
labels = torch.randint(0, v, (n,), generator=g)

def rss():  # resident now, bytes
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

def peak():  # the process's peak resident so far, bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def run(rows):
    args = (hidden[:rows], weight, None, ids[:rows], lp[:rows], tail[:rows], labels[:rows])
    loss, _ = chunked_distill_loss(*args, alpha=0.5, kind=kind, chunk=chunk, temperature=2.0)
    loss.backward()

run(chunk)  # warm-up: one chunk's working set, and the code paths' pages resident
# what N rows need beyond one chunk's peak (a peak minus a peak: transient pages of the warm-up, or of other load
# on the machine before it, do not count as growth)
before = peak()
run(n)
chunked = peak() - before
# the control: what the same measurement sees for ONE dense (N, V) float32 buffer
before = rss()
dense = torch.ones(n, v)
control = peak() - before
print(json.dumps({"chunked": chunked, "control": control, "dense_bytes": n * v * 4}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["forward-kl", "jsd"])
def test_logits_never_exist(kind: str) -> None:
    """4,096 positions x 50,000 ids: one dense float32 (N, V) tensor is 819 MB (the dense default loss keeps
    several). The chunked loss (closed-form gradient: forward-kl; autograd per chunk: jsd) and its backward, in a
    fresh process, in chunks of 64 rows, raise the peak resident memory by less than a fifth of ONE such tensor;
    the same measurement sees a single (N, V) buffer in full (the control)."""
    # glibc raises its mmap threshold (up to 32 MB) after freeing a large block, and then keeps freed chunk-sized
    # blocks in its heap, where they count as resident: a fixed threshold returns them, so the peak is what was
    # live at once
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MEMORY_PROBE), kind, "4096", "64"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["control"] > 0.95 * got["dense_bytes"]  # the measurement works
    # (64, 50,000) float32 blocks are 12.8 MB; a few live at once, plus (V, H) and (N, H) float32 gradients
    # (6.9 MB); measured 68 MB (forward-kl) and 121 MB (jsd)
    assert got["chunked"] < 0.2 * got["dense_bytes"], got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_loss_scales_every_gradient_once(dtype: torch.dtype) -> None:
    """backward of ``loss * 3`` (as DDP's ``loss * world`` and gradient accumulation do): every gradient is 3x the
    float64 reference's; a second backward through the same graph (retain_graph) adds 1x more, so the gradients
    saved in forward are scaled, not consumed."""
    c = make_case("topk", dtype=dtype)
    x = [c[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    loss, _ = chunked_distill_loss(
        *x, c["ids"], c["lp"], c["tail"], c["labels"], target_mask=c["mask"], chunk=4, alpha=0.5
    )
    (loss * 3.0).backward(retain_graph=True)
    _, want = run_dense(c, alpha=0.5)
    # GRAD's atol scaled by the 3 (float32); bf16 inputs: the gradients rounded to bf16 (8 bits of mantissa)
    tol = {"rtol": 1e-5, "atol": 3e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    for t, w in zip(x, want, strict=True):
        assert t.grad is not None
        torch.testing.assert_close(t.grad.double(), 3.0 * w, **tol)
    loss.backward()
    for t, w in zip(x, want, strict=True):
        assert t.grad is not None
        torch.testing.assert_close(t.grad.double(), 4.0 * w, **tol)
