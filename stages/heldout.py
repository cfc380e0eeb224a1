"""Held-out evaluation of any causal LM on a store's held-out examples, independent of training.

``stages.train`` evaluates its own student through its own head and loss code; this module runs a plain
transformers forward (``model(input_ids).logits``, ``F.cross_entropy``) over the examples that training holds
out by content key (``StoreDataset(split="eval")``), so the teacher, a distilled student and a hard-label student
are measured by one code path that shares nothing with the losses. It also times that forward (inference tokens
per second) and counts the parameters (``parameters()`` counts tied weights once).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["HeldOut", "heldout"]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    import torch

    from ..data.dataset import StoreDataset
    from .models import load_model

    model = load_model(str(model_dir), "causal-lm", device=torch.device("cpu"), dtype=torch.float32)
    model.eval()
    held = StoreDataset(store, batch_size=batch_size, shuffle=False, split="eval", eval_fraction=eval_fraction)
    nll, count, tokens, seconds = 0.0, 0, 0, 0.0
    with torch.inference_mode():
        for i, batch in enumerate(held):
            if max_batches is not None and i >= max_batches:
                break
            t0 = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
            seconds += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
            labels = batch["labels"]  # (B, L-1), -100 on padding
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum"
                )
            )
            count += int((labels != -100).sum())
    mean = nll / max(count, 1)
    return HeldOut(
        parameters=sum(p.numel() for p in model.parameters()),
        nll=mean,
        perplexity=math.exp(mean),
        positions=count,
        tokens_per_second=tokens / seconds if seconds else float("nan"),
    )
