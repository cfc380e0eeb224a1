"""Train from a store with transformers' ``Trainer``: the store's loader, the project's (chunked) loss, exact token
weighting, and everything else (optimizer, schedule, logging, checkpoints, callbacks, accelerate's DDP) Trainer's.

    from transformers import AutoModelForCausalLM, TrainingArguments
    from kd_pipeline.stages.hf_trainer import StoreTrainer

    student = AutoModelForCausalLM.from_pretrained("students/smol-init")
    args = TrainingArguments(
        "runs/hf", per_device_train_batch_size=8, gradient_accumulation_steps=4, max_steps=1000,
        learning_rate=1e-3, warmup_steps=10, logging_steps=10, report_to=[],
    )
    trainer = StoreTrainer(model=student, args=args, store="stores/pydoc-top32", loss="forward-kl", alpha=0.5)
    trainer.train()
    trainer.save_model("runs/hf/final")

What it changes in ``Trainer`` (a subclass; nothing is patched):

- ``get_train_dataloader``: the store's ``StoreDataset`` (its order, shuffling, per-rank split and lockstep), batch
  size ``per_device_train_batch_size``, seed ``args.seed``, rank ``args.process_index`` of ``args.world_size``,
  ``dataloader_num_workers`` workers; ``set_epoch`` reaches it each epoch. Batches arrive collated
  (``data.collate``): no collator to pass.
- ``get_batch_samples``: Trainer takes each optimizer step's micro-batches before the first forward and passes
  ``num_items_in_batch`` to ``compute_loss``; here that is the step's (positions with targets, positions with a
  label) over every micro-batch and rank (``weighting.step_counts``: one all-reduce), not Trainer's count of labels
  (which would count the loader's weight-0 stand-ins and cannot tell the two terms' counts apart).
- ``compute_loss``: the student's forward at the store's positions and ``batch_loss``, the very function ``pipeline
  train`` calls: each micro-batch's loss is its sum over the step's positions, times the number of processes
  (DDP averages gradients), so the step's gradient is that of the mean over all its positions
  (``loss_is_scaled_for_ga``: Trainer does not divide it again).

The output head and the loss run in chunks of positions (``loss_chunk``, as ``pipeline train --loss-chunk``) for a
causal LM whose head is one linear layer: the forward runs through the (possibly wrapped) model with
``logits_to_keep=1`` and the final hidden states are taken from its backbone, so DDP sees the forward and reduces
the head's gradient like any other. That needs the head's weight whole on each process: with DeepSpeed ZeRO-3 or
FSDP (parameters sharded outside forward) pass ``loss_chunk=0``, which takes the logits from the model's own
forward (the (positions x vocabulary) logits then exist, as in any Trainer run). Only training is adapted:
``Trainer.evaluate`` is not (evaluate with ``pipeline train``'s metrics or your own loop).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer

from .. import data
from ..data.dataset import StoreDataset
from .batch_loss import at_selected, batch_loss
from .losses import check_loss_options, rows_per_chunk
from .models import _ARCH_SUFFIXES, OutputHead, output_width
from .weighting import selected, step_counts

__all__ = ["StoreTrainer"]


class StoreTrainer(Trainer):
    """``transformers.Trainer`` over a store of soft targets, with ``pipeline train``'s loss; see the module doc.

    Args:
        store: the store (path, URL or open ``data.StoreReader``).
        loss, alpha, beta, tail: as ``pipeline train``'s ``--loss``, ``--alpha``, ``--beta``, ``--tail``.
        temperature: must equal the store's labeling temperature; default: the store's.
        loss_chunk: rows per chunk of the head + loss (None: sized for 256 MiB of float32 logits; 0: the model's
            own logits, for sharded parameters).
        **kwargs: ``Trainer``'s (``model`` and ``args`` at least); no ``train_dataset`` or ``data_collator``.

    Raises:
        ValueError: a bad loss option, no ``model``, or a ``train_dataset`` / ``data_collator`` /
            ``compute_loss_func`` given.
        data.IncompatibleStoreError: a student that cannot be distilled from the store (vocabulary, task,
            temperature; its tokenizer is not checked: use the teacher's).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's positions already

    def __init__(
        self,
        *,
        store: str | data.StoreReader,
        loss: str = "forward-kl",
        alpha: float = 0.5,
        temperature: float | None = None,
        beta: float = 0.5,
        tail: str = "bin",
        loss_chunk: int | None = None,
        **kwargs: Any,
    ) -> None:
        given = [k for k in ("train_dataset", "data_collator", "compute_loss_func") if kwargs.get(k) is not None]
        if given:
            raise ValueError(f"StoreTrainer reads its batches and its loss from the store; do not pass {given}")
        model = kwargs.get("model")
        if model is None:
            raise ValueError("StoreTrainer needs model= (the student, e.g. AutoModelForCausalLM.from_pretrained(...))")
        reader = store if isinstance(store, data.StoreReader) else data.open_store(store)
        m = reader.manifest
        t = temperature if temperature is not None else m.targets.temperature
        problems = check_loss_options(loss, t, beta, tail, alpha, {"kind": "loss"})  # this class's argument names
        if loss_chunk is not None and loss_chunk < 0:
            problems.append(f"loss_chunk must be >= 0 (0: the model's own logits), got {loss_chunk}")
        if (m.targets.sampled or m.targets.hybrid) and tail == "renormalise":  # as pipeline train refuses it
            problems.append(f"tail='renormalise' needs a top-k store; a {m.targets.method} store has no tail to drop")
        if problems:
            raise ValueError("; ".join(problems))
        # the task the model's class trains for, by the end of its name (None: not checked)
        task = next((name for end, name in _ARCH_SUFFIXES.items() if type(model).__name__.endswith(end)), None)
        data.check_compatible(m, vocab_size=output_width(model), task=task, temperature=t)
        if model.config.pad_token_id is None:  # as pipeline train: HF classifiers find the last token by it
            model.config.pad_token_id = m.tokenizer.get("pad_token_id") or 0
        self._pad_id = int(model.config.pad_token_id)
        self.task = m.task
        self.head = OutputHead(model, m.task)
        chunk = rows_per_chunk(output_width(model)) if loss_chunk is None else loss_chunk
        self.loss_chunk = chunk if self.head.split else 0
        self.loss_options = {"alpha": alpha, "kind": loss, "temperature": t, "beta": beta, "tail": tail}
        self._forward_takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        args = kwargs.get("args")
        rank, world = (args.process_index, args.world_size) if args is not None else (0, 1)
        workers = args.dataloader_num_workers if args is not None else 0
        batch = args.per_device_train_batch_size if args is not None else 8
        seed = args.seed if args is not None else 42
        dataset = StoreDataset(reader, batch_size=batch, seed=seed, rank=rank, world_size=world, num_workers=workers)
        super().__init__(train_dataset=dataset, **kwargs)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        """The store's own batches (already collated and split over the ranks): not re-batched, not re-sharded."""
        assert isinstance(self.train_dataset, StoreDataset)
        return _EpochLoader(self.train_dataset, batch_size=None, num_workers=self.args.dataloader_num_workers)

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | int | None]:
        """The step's micro-batches and, as ``num_items_in_batch``, its (kd_count, ce_count) on every rank: a
        (2,) float64 tensor."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        counts = step_counts(batches, self.args.world_size, device)
        return batches, torch.tensor(counts, dtype=torch.float64)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """``pipeline train``'s loss of one collated batch: its share of the step's when ``num_items_in_batch`` holds
        the step's counts (training), else the batch's own mean."""
        select = selected(inputs)  # (B, P) bool
        rows = self._rows(model, inputs, select)  # (N, H) or (N, V)
        counts = None
        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 2:
            kd_count, ce_count = num_items_in_batch.tolist()
            counts = (float(kd_count), float(ce_count))
        head = self.head if self.loss_chunk else None  # dense: the rows are the model's own logits
        loss, _ = batch_loss(rows, inputs, select, head, self.loss_chunk, self.loss_options, counts)
        if counts is not None:
            loss = loss * self.args.world_size  # DDP averages the processes' gradients; the counts hold them all
        return (loss, None) if return_outputs else loss

    def _rows(self, model: torch.nn.Module, inputs: dict[str, Any], select: torch.Tensor) -> torch.Tensor:
        """The student's output at the selected positions, through ``model`` (which may be wrapped: DDP must see
        the forward): (N, H) final hidden states for the chunked head, else (N, V) / (N, C) logits."""
        mask = inputs["attention_mask"]
        # the loader pads with 0; the model must see its own pad id there (classifiers locate the last token by it)
        input_ids = inputs["input_ids"].masked_fill(mask == 0, self._pad_id)
        if not self.loss_chunk:
            out = model(input_ids=input_ids, attention_mask=mask).logits  # (B, L, V) or (B, C)
            return at_selected(out, self.task, select, inputs.get("positions"))
        captured: list[torch.Tensor] = []
        hook = self.head.backbone.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
        try:
            keep = {"logits_to_keep": 1} if self._forward_takes_keep else {}  # the head on one position only
            model(input_ids=input_ids, attention_mask=mask, **keep)
        finally:
            hook.remove()
        return at_selected(captured[-1], self.task, select, None)  # (N, H)


class _EpochLoader(torch.utils.data.DataLoader[Any]):
    """A DataLoader whose ``set_epoch`` (which Trainer calls before each epoch) reaches the StoreDataset."""

    def set_epoch(self, epoch: int) -> None:
        assert isinstance(self.dataset, StoreDataset)
        self.dataset.set_epoch(epoch)
