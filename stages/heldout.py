"""Held-out evaluation of any causal LM on a store's held-out examples, independent of training.

``stages.train`` evaluates its own student through its own head and loss code; this module runs a plain
transformers forward (``model(input_ids).logits``, ``F.cross_entropy``) over the examples that training holds
out by content key (``StoreDataset(split="eval")``), so the teacher, a distilled student and a hard-label student
are measured by one code path that shares nothing with the losses. It also times that forward (inference tokens
per second) and counts the parameters (``parameters()`` counts tied weights once).

Given a reference model's log-probs on the same batches (``reference_logprobs``, e.g. the teacher's full
distribution; kept as its last hidden states and output head, (positions x hidden) rather than (positions x
vocabulary) in memory, and expanded one batch at a time), ``score`` also measures how close a model is to it:
KL(reference || model) and top-1 agreement per scored position. ``score`` takes any batches of ``input_ids`` /
``attention_mask`` / ``labels`` (the store's held-out examples, or a second corpus tokenised by the caller).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

__all__ = ["HeldOut", "ReferenceLogprobs", "heldout", "reference_logprobs", "score"]


@dataclass
class HeldOut:
    """One model on the held-out examples."""

    parameters: int
    """Parameters (tied embedding and head counted once)."""
    nll: float
    """Mean next-token cross-entropy at T=1 over every held-out position, in nats."""
    perplexity: float
    """exp(nll)."""
    positions: int
    """Held-out positions scored."""
    tokens_per_second: float
    """Input tokens through the forward pass per second (batch_size sequences per call, float32, this machine)."""
    kl: float | None = None
    """Mean KL(reference || model) over the scored positions, in nats (None: no reference given)."""
    top1: float | None = None
    """Share of scored positions where the model's most probable id is the reference's (None: no reference)."""
    position_nll: list[float] | None = None
    """Each scored position's cross-entropy, batch by batch in order (row-major over the labels that are not
    -100); only with ``keep_positions``."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "position_nll"}


def _load(model_dir: str | Path) -> Any:
    import torch

    from .models import load_model

    model = load_model(str(model_dir), "causal-lm", device=torch.device("cpu"), dtype=torch.float32)
    model.eval()
    return model


class ReferenceLogprobs(Sequence["torch.Tensor"]):
    """A reference model's full next-token log-probs (float32, T=1), one (positions, V) tensor per batch, computed
    when a batch is read from what is kept: the model's last hidden states at the batch's scored positions,
    (positions, H), and its output head (one V x H matrix for every batch); memory in positions x hidden plus the
    head instead of positions x vocabulary. A batch whose logits are not the head applied to the last hidden state
    (a model that transforms its logits further, e.g. soft-capping, or whose head does not take that state) is kept
    as its log-probs."""

    def __init__(self, head: Any, kept: list[tuple[bool, torch.Tensor]]) -> None:
        self._head = head
        self._kept = kept  # per batch: (True, hidden states (N, H)) or (False, log-probs (N, V))

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        import torch

        hidden, kept = self._kept[i]
        if not hidden:
            return kept
        with torch.inference_mode():
            return torch.log_softmax(self._head(kept).float(), dim=-1)

    @property
    def compact(self) -> int:
        """Batches kept as hidden states (the others as log-probs)."""
        return sum(hidden for hidden, _ in self._kept)

    @property
    def nbytes(self) -> int:
        """Bytes of the kept tensors (hidden states or log-probs), the head not counted."""
        return sum(t.nelement() * t.element_size() for _, t in self._kept)


def _head_gives(head: Any, h: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether ``head`` applied to the hidden states ``h`` (N, H) gives the logits ``z`` (N, V), to 1e-4."""
    import torch

    try:
        rebuilt = head(h).float()
    except RuntimeError:  # the head does not take the last hidden state as it is
        return False
    return rebuilt.shape == z.shape and torch.allclose(rebuilt, z, rtol=0, atol=1e-4)


def reference_logprobs(model_dir: str | Path, batches: Iterable[dict[str, torch.Tensor]]) -> ReferenceLogprobs:
    """The causal LM in ``model_dir``'s next-token log-probs (float32, T=1, full vocabulary) at each batch's
    scored positions (``labels != -100``), for ``score(reference=...)``: a sequence of one (positions, V) tensor
    per batch, kept compact (``ReferenceLogprobs``). Each batch is kept as hidden states only where the head
    applied to them gives the model's own logits (checked on that batch, to 1e-4)."""
    import torch

    model = _load(model_dir)
    head = model.get_output_embeddings()
    kept: list[tuple[bool, torch.Tensor]] = []
    with torch.inference_mode():
        for batch in batches:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=head is not None,
            )
            scored = batch["labels"] != -100
            z = out.logits[:, :-1][scored].float()  # (N, V)
            if head is not None:
                h = out.hidden_states[-1][:, :-1][scored]  # (N, H)
                if _head_gives(head, h, z):
                    kept.append((True, h))  # boolean indexing copied it out of the batch's tensors
                    continue
            kept.append((False, torch.log_softmax(z, dim=-1)))
    return ReferenceLogprobs(head, kept)


def score(
    model_dir: str | Path,
    batches: Iterable[dict[str, torch.Tensor]],
    reference: Sequence[torch.Tensor] | None = None,
    keep_positions: bool = False,
) -> HeldOut:
    """Evaluate the causal LM in ``model_dir`` (float32, CPU) on ``batches``: cross-entropy of ``labels``
    (``-100``: not scored) and, with ``reference`` (``reference_logprobs`` of the same batches, in the same
    order), KL(reference || model) and top-1 agreement with it."""
    import torch

    batches = list(batches)
    if reference is not None and len(reference) != len(batches):
        raise ValueError(f"reference has {len(reference)} batches, the data {len(batches)}")
    model = _load(model_dir)
    nll, count, tokens, seconds, kl, agree = 0.0, 0, 0, 0.0, 0.0, 0
    positions: list[float] = []
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
            seconds += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
            labels = batch["labels"]  # (B, L-1), -100 on padding
            scored = labels != -100
            z = logits[:, :-1][scored].float()  # (N, V)
            ce = torch.nn.functional.cross_entropy(z, labels[scored], reduction="none")  # (N,)
            nll += float(ce.sum())
            count += int(scored.sum())
            if keep_positions:
                positions += ce.tolist()
            if reference is not None:
                ref = reference[i]  # (N, V)
                if ref.shape != z.shape:
                    raise ValueError(f"reference batch {i} has shape {tuple(ref.shape)}, expected {tuple(z.shape)}")
                log_q = torch.log_softmax(z, dim=-1)
                kl += float((ref.exp() * (ref - log_q)).sum())
                agree += int((ref.argmax(-1) == z.argmax(-1)).sum())
    mean = nll / max(count, 1)
    return HeldOut(
        parameters=sum(p.numel() for p in model.parameters()),
        nll=mean,
        perplexity=math.exp(mean),
        positions=count,
        tokens_per_second=tokens / seconds if seconds else float("nan"),
        kl=kl / max(count, 1) if reference is not None else None,
        top1=agree / max(count, 1) if reference is not None else None,
        position_nll=positions if keep_positions else None,
    )


def store_batches(
    store: str | Path, eval_fraction: float, batch_size: int = 4, max_batches: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The examples ``pipeline train`` holds out of ``store`` by content key (``eval_fraction``), in batches."""
    from itertools import islice

    from ..data.dataset import StoreDataset

    held = StoreDataset(store, batch_size=batch_size, shuffle=False, split="eval", eval_fraction=eval_fraction)
    return list(islice(held, max_batches))


def heldout(
    model_dir: str | Path, store: str | Path, eval_fraction: float, batch_size: int = 4, max_batches: int | None = None
) -> HeldOut:
    """Evaluate the causal LM in ``model_dir`` on ``store``'s held-out examples (float32, CPU).

    Args:
        model_dir: a transformers folder (weights + config).
        store: the store whose ``eval_fraction`` key split is evaluated (the split ``pipeline train`` holds out).
        eval_fraction: as ``TrainConfig.eval_fraction``.
        batch_size: sequences per forward.
        max_batches: only the first this many batches (the examples ``TrainConfig.eval_batches`` lets training's
            evaluation see at the same batch size); None: every held-out example.
    """
    return score(model_dir, store_batches(store, eval_fraction, batch_size, max_batches))
