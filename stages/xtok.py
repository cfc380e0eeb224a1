"""Cross-tokenizer distillation: a store's teacher targets, a student with another tokenizer, one loss.

The store (labelled with ``--spans``) gives each example's text, the teacher's token spans in it and the teacher's
vocabulary as strings. Here the student's tokenizer encodes the same text, the two tokenizations are aligned
(``stages.xtok_align``: pairs of positions that condition on the same text prefix), and each aligned pair gets a
soft loss; every student position gets the hard-label cross-entropy on the student's own next token.

The soft loss at an aligned pair, with q the teacher's stored probabilities (top-k: exp(log-prob), exact;
sampled: count / N; hybrid: the top-k exactly plus tail draws as tail_mass * count / N) and p the student's
softmax(z / T) over its own vocabulary:

* **shared ids** (the teacher's id has a student id with the same string, ``xtok_align.vocab_map``): forward KL
  over the bins {each shared id} + {everything else}:
  ``sum_shared q_i log(q_i / p_m(i)) + q_rest log(q_rest / p_rest)``, where q_rest = 1 - sum_shared q_i (the
  teacher's unshared ids and its tail) and p_rest = 1 - sum_shared p_m(i) (computed as a logsumexp over the other
  student ids, not as a difference). The stored probability of every shared id is matched exactly, and no mass
  is renormalised away.
* **the rest** (ULD, Boizard et al. 2024): the teacher's n known unshared probabilities, sorted descending,
  against the student's n largest probabilities among the ids not matched at this pair, sorted descending:
  ``sum_j |q_(j) - p_(j)|``. It asks the student to spread its unmatched mass with the teacher's shape, whatever
  the tokens are. A top-k store's tail (ids unknown) takes part in the KL's rest bin only.

Loss = alpha * T^2 * mean over aligned pairs (KL + ULD) + (1 - alpha) * mean over student positions of the
hard-label cross-entropy (at T = 1). Assumptions: see README, "Cross-tokenizer training".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import data
from .source_spans import encode_with_spans
from .xtok_align import aligned_positions

if TYPE_CHECKING:
    import torch

__all__ = ["CrossCollator", "teacher_entries", "xtok_soft_loss"]

NDArray = np.ndarray[Any, Any]


def _ragged(values: NDArray, offsets: NDArray, rows: NDArray) -> tuple[NDArray, NDArray]:
    """Rows ``rows`` of a ragged column as (n, W) values (0 on padding) and an (n, W) bool mask of real entries."""
    lo, hi = offsets[rows].astype(np.int64), offsets[rows + 1].astype(np.int64)  # (n,)
    width = int((hi - lo).max(initial=0))
    j = np.arange(width)  # (W,)
    mask = j[None, :] < (hi - lo)[:, None]  # (n, W)
    idx = np.where(mask, lo[:, None] + j[None, :], 0)
    out = values[idx] if len(values) else np.zeros(idx.shape, dtype=values.dtype)
    return np.where(mask, out, 0), mask


def teacher_entries(ex: dict[str, NDArray], targets: data.TargetSpec, rows: NDArray) -> tuple[NDArray, ...]:
    """The teacher's known (id, probability) entries at positions ``rows`` of one stored example.

    Returns:
        ids (n, W) int64, probs (n, W) float64 (exact for top-k entries, count / N estimates for sampled ones)
        and known (n, W) bool (False on padding).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if targets.sampled:
        ids, known = _ragged(ex["target_ids"], ex["target_offsets"], rows)
        counts, _ = _ragged(ex["target_counts"], ex["target_offsets"], rows)
        return ids.astype(np.int64), counts / float(targets.num_samples or 1), known
    ids = ex["target_ids"][rows].astype(np.int64)  # (n, K)
    probs = np.exp(ex["target_logprobs"][rows].astype(np.float64))  # (n, K)
    known = np.ones(ids.shape, dtype=bool)
    if targets.hybrid:
        tids, tknown = _ragged(ex["tail_ids"], ex["tail_offsets"], rows)
        tcounts, _ = _ragged(ex["tail_counts"], ex["tail_offsets"], rows)
        tail = ex["tail_mass"][rows].astype(np.float64)[:, None]  # (n, 1)
        ids = np.concatenate([ids, tids.astype(np.int64)], axis=1)
        probs = np.concatenate([probs, tail * tcounts / float(targets.num_samples or 1)], axis=1)
        known = np.concatenate([known, tknown], axis=1)
    return ids, probs, known


class CrossCollator:
    """Stored examples -> a batch for a student with its own tokenizer (numpy in, torch tensors out).

    Args:
        tokenizer: the student's fast tokenizer.
        targets: the store's target spec.
        vocab: (V_teacher,) int64 teacher id -> student id or -1 (``xtok_align.vocab_map``).
        max_length: the student's longest sequence; longer encodings are cut.
    """

    def __init__(self, tokenizer: Any, targets: data.TargetSpec, vocab: NDArray, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.targets = targets
        self.vocab = vocab
        self.max_length = max_length

    def encode(self, ex: dict[str, NDArray]) -> dict[str, Any]:
        """One example: the student's ids, the aligned pairs and the teacher's entries at them."""
        if "text" not in ex:
            raise data.IncompatibleStoreError(
                "a shard of this store holds no source text and token spans; cross-tokenizer training needs a store "
                "labelled with `pipeline label --spans`"
            )
        try:
            text = bytes(ex["text"]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise data.CorruptShardError(
                f"an example's source text is not UTF-8 ({e.reason} at byte {e.start})"
            ) from None
        ((ids, spans),) = encode_with_spans(self.tokenizer, [text])
        ids, spans = ids[: self.max_length], spans[: self.max_length]
        pairs = aligned_positions(ex["token_spans"], spans)  # (N, 2)
        pairs = pairs[pairs[:, 1] < len(ids) - 1]  # the student's last position predicts nothing
        tid, prob, known = teacher_entries(ex, self.targets, pairs[:, 0])
        sid = np.where(known, self.vocab[np.where(known, tid, 0)], -1)  # (N, W) student id or -1
        real = spans[1:][spans[1:, 1] > spans[1:, 0]]  # the predicted tokens' spans, for bits per character
        chars = len(bytes(ex["text"])[int(real[0, 0]) : int(real[-1, 1])].decode("utf-8")) if len(real) else 0
        return {"ids": ids, "pos": pairs[:, 1], "sid": sid, "prob": prob, "known": known, "chars": chars}

    def __call__(self, examples: list[dict[str, NDArray]], task: str = "causal-lm") -> dict[str, torch.Tensor]:
        """``StoreDataset``'s ``collate_fn`` (``task`` is always causal-lm here).

        Shapes: input_ids, attention_mask (B, M); labels (B, M - 1), -100 on padding; pair_row, pair_pos (N,)
        the aligned student positions; t_sid (N, W) int64 student id or -1; t_prob (N, W) float32; t_known (N, W)
        bool; chars (B,) the characters the student's predicted tokens cover."""
        import torch

        enc = [self.encode(ex) for ex in examples]
        B, M = len(enc), max(len(e["ids"]) for e in enc)
        W = max((e["sid"].shape[1] for e in enc), default=0)
        input_ids = torch.zeros((B, M), dtype=torch.long)
        mask = torch.zeros((B, M), dtype=torch.long)
        for b, e in enumerate(enc):
            input_ids[b, : len(e["ids"])] = torch.tensor(e["ids"])
            mask[b, : len(e["ids"])] = 1
        labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

        def padded(key: str, fill: float) -> NDArray:
            return np.concatenate(
                [np.pad(e[key], ((0, 0), (0, W - e[key].shape[1])), constant_values=fill) for e in enc]
            )

        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "pair_row": torch.from_numpy(np.concatenate([np.full(len(e["pos"]), b) for b, e in enumerate(enc)])),
            "pair_pos": torch.from_numpy(np.concatenate([e["pos"] for e in enc]).astype(np.int64)),
            "t_sid": torch.from_numpy(padded("sid", -1).astype(np.int64)),
            "t_prob": torch.from_numpy(padded("prob", 0.0).astype(np.float32)),
            "t_known": torch.from_numpy(padded("known", False).astype(bool)),
            "chars": torch.tensor([e["chars"] for e in enc], dtype=torch.long),
        }


def xtok_soft_loss(
    z: torch.Tensor, sid: torch.Tensor, prob: torch.Tensor, known: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per aligned pair: KL over the shared ids + rest bin, plus the sorted-probability (ULD) term.

    Args:
        z: (N, V) float32 student logits at the aligned positions.
        sid: (N, W) int64 student id of each teacher entry, -1 where it has none (or on padding).
        prob: (N, W) float32 teacher probabilities (0 on padding).
        known: (N, W) bool real entries.
        temperature: T, the store's labeling temperature.

    Returns:
        ((N,) KL term, (N,) ULD term), float32.
    """
    import torch

    s = torch.log_softmax(z.float() / temperature, dim=-1)  # (N, V)
    shared = known & (sid >= 0)  # (N, W)
    idx = sid.clamp(min=0)
    ls = s.gather(1, idx)  # (N, W) student log-prob of each shared entry's id
    q = torch.where(shared, prob, torch.zeros_like(prob))
    kl_shared = torch.where(q > 0, q * (torch.log(q.clamp(min=1e-30)) - ls), torch.zeros_like(q)).sum(-1)
    # (N, V) ids matched at this pair: each shared entry marks its id; the others mark a spare last column, so no
    # write of False can clear a shared id's mark (the order of repeated scatter writes is not defined)
    spare = torch.where(shared, sid, s.shape[1])
    matched = torch.zeros((s.shape[0], s.shape[1] + 1), dtype=torch.bool, device=s.device).scatter_(1, spare, True)
    s_rest = s.masked_fill(matched[:, :-1], float("-inf"))
    log_p_rest = torch.logsumexp(s_rest, dim=-1)  # (N,) log of the student's mass off the matched ids
    q_rest = (1.0 - q.sum(-1)).clamp(min=0.0)  # (N,) the teacher's unshared + tail mass
    kl_rest = torch.where(q_rest > 0, q_rest * (torch.log(q_rest.clamp(min=1e-30)) - log_p_rest), 0.0)
    # ULD on what is not shared: the teacher's known unshared entries against the student's largest others
    u = torch.where(known & ~shared, prob, torch.zeros_like(prob)).sort(dim=-1, descending=True).values  # (N, W)
    n = (known & ~shared).sum(-1, keepdim=True)  # (N, 1)
    W = u.shape[1]
    top = torch.exp(s_rest).topk(min(W, s.shape[1]), dim=-1).values if W else u  # (N, W) descending
    if top.shape[1] < W:
        top = torch.nn.functional.pad(top, (0, W - top.shape[1]))
    live = torch.arange(W, device=z.device)[None, :] < n  # (N, W)
    uld = torch.where(live, (u - top).abs(), torch.zeros_like(u)).sum(-1)
    return kl_shared + kl_rest, uld
