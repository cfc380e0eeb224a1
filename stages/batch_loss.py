"""The distillation loss of one collated store batch, from the student's output at the batch's selected positions.

What ``pipeline train`` (``stages/train.py``) and the transformers ``Trainer`` integration (``stages/hf_trainer.py``)
both call, so that the two train on the same loss: they differ only in how they run the student's forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .weighting import selected

if TYPE_CHECKING:
    import torch

    from .models import OutputHead
    from .train_config import TrainConfig

__all__ = ["at_positions", "at_selected", "batch_loss", "train_loss"]


def batch_loss(
    rows: torch.Tensor,
    batch: dict[str, torch.Tensor],
    select: torch.Tensor,
    head: OutputHead | None,
    loss_chunk: int,
    options: dict[str, Any],
    counts: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the selected positions of ``batch``; returns the loss and its parts for logging.

    Args:
        rows: (N, H) the student's final hidden states at the N selected positions when ``loss_chunk`` > 0 (the
            head and the loss run together, a chunk of rows at a time: (N, V) logits never exist), else what
            ``head.logits`` takes: (N, H) hidden states of a split head, or (N, V) / (N, C) logits; with no
            ``head``, the (N, V) / (N, C) logits themselves.
        batch: the collated batch (``data.collate``'s keys) the rows come from.
        select: (B, P) bool (seq-cls: (B,)): the positions the rows are, in order (``weighting.selected``).
        head: the student's output head (``models.OutputHead``), or None when ``rows`` are logits (then
            ``loss_chunk`` must be 0).
        loss_chunk: rows per chunk of the head + loss; 0: the dense head and loss.
        options: ``distill_loss``'s keyword options: alpha, kind, temperature, beta, tail.
        counts: (kd_count, ce_count), the whole optimizer step's positions (``weighting.step_counts``): the loss
            is then this batch's share of the step's. None: this batch's own (its mean).
    """
    from .losses import chunked_distill_loss, distill_loss

    k = batch["target_ids"].shape[-1]
    flat = select.reshape(-1)
    tmask = batch.get("target_mask")  # sampled stores: (B, P, U) bool, False on padding slots
    targets = (
        batch["target_ids"].reshape(-1, k)[flat],
        batch["target_logprobs"].reshape(-1, k)[flat],
        batch["tail_mass"].reshape(-1)[flat],
        batch["labels"].reshape(-1)[flat],
    )
    options = {
        **options,
        "target_mask": tmask.reshape(-1, k)[flat] if tmask is not None else None,
        "kd_count": counts[0] if counts is not None else None,
        "ce_count": counts[1] if counts is not None else None,
    }
    if loss_chunk:  # (N, H) hidden states: head and loss together, never (N, V) logits
        assert head is not None, "the chunked loss needs the output head"
        return chunked_distill_loss(
            rows,
            head.head.weight,
            head.head.bias,
            *targets,
            logit_scale=head.scale,
            softcap=head.softcap,
            chunk=loss_chunk,
            **options,
        )
    z = head.logits(rows) if head is not None else rows.float()  # (N, V) float32
    if z.shape[0] == 0:  # a rank's padding-only batch: contribute zero, keep DDP in step
        zero = z.sum() * 0.0
        return zero, {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    return distill_loss(z, *targets, **options)


def at_selected(out: torch.Tensor, task: str, select: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The student's output at the selected positions: (B, L, H | V) -> (N, H | V) (masked-lm: at ``positions``,
    (B, P); seq-cls: (B, C) -> (N, C)), in ``select``'s order."""
    if task == "causal-lm":
        return out[:, :-1][select]  # position i predicts token i + 1
    if task == "masked-lm":
        assert positions is not None
        idx = positions.unsqueeze(-1).expand(-1, -1, out.shape[-1])
        return out.gather(1, idx)[select]  # (N, V)
    return out[select]  # (N, C)


def train_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    task: str,
    cfg: TrainConfig,
    temperature: float,
    counts: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation loss of one collated batch; returns the loss and its parts for logging.

    ``counts``: the soft and the hard term's denominators, the whole optimizer step's (``weighting.step_counts``);
    the loss is then this batch's share of the step's. None: this batch's own (its mean).

    ``model`` is ``at_positions``'s module, or DDP around it. With a chunked head, the head's weight enters the loss
    outside the module's forward, as an input of ``chunked_distill_loss``'s autograd Function: its gradient still
    reaches the parameter through autograd, where DDP's hooks reduce it like any other (for a tied student, summed
    with the input embedding's own gradient first).
    """
    net = getattr(model, "module", model)  # the module under DDP
    select = selected(batch)  # (B, P) bool: real positions of examples that count
    rows = model(batch["input_ids"], batch["attention_mask"], select, batch.get("positions"))  # (N, H) or (N, V)
    options = {"alpha": cfg.alpha, "kind": cfg.loss, "temperature": temperature, "beta": cfg.beta, "tail": cfg.tail}
    return batch_loss(rows, batch, select, net.head, net.loss_chunk, options, counts)


def at_positions(model: Any, task: str, loss_chunk: int | None = None) -> Any:
    """The student as a module that returns its output at the selected positions only, and the head to apply to it.

    A causal LM runs its backbone once and returns the (N, H) hidden states of the selected positions; its output
    head (``logits``, or the chunked head and loss) is applied to those rows only, so the (B, L, V) logits are never
    built. Other students run their full forward and are indexed: (N, V) or (N, C) logits. An ``nn.Module``, so
    that DDP can wrap it; its parameters are the student's.

    Args:
        model: the Hugging Face student.
        task: the store's task.
        loss_chunk: ``TrainConfig.loss_chunk``: rows per chunk of the head + loss, None to size them by
            ``losses.rows_per_chunk``, 0 for the dense head. Resolved to the module's ``loss_chunk``, which is 0
            (dense) for a student whose head is not one linear layer.
    """
    import torch

    from .losses import rows_per_chunk
    from .models import OutputHead, output_width

    class _AtPositions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.head = OutputHead(model, task)
            chunk = rows_per_chunk(output_width(model)) if loss_chunk is None else loss_chunk
            self.loss_chunk = chunk if self.head.split else 0

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            select: torch.Tensor,
            positions: torch.Tensor | None = None,
        ) -> torch.Tensor:
            """(N, H) hidden states where the head is split off, else (N, V) / (N, C) logits."""
            # the loader pads with 0; the model must see its own pad id there (classifiers locate the last
            # token by it)
            pad = int(model.config.pad_token_id or 0)
            input_ids = input_ids.masked_fill(attention_mask == 0, pad)
            out = self.head.hidden_or_logits(input_ids, attention_mask)  # (B, L, H) or (B, L, V) or (B, C)
            return at_selected(out, task, select, positions)

        def logits(self, rows: torch.Tensor) -> torch.Tensor:
            """``forward``'s rows -> (N, V) float32 logits (the dense head)."""
            return self.head.logits(rows)

    return _AtPositions()
