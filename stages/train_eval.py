"""``pipeline train``'s periodic evaluation on held-out examples of the store (or of ``--eval-store``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .weighting import selected

if TYPE_CHECKING:
    import torch

    from .train_config import TrainConfig

__all__ = ["evaluate"]


def evaluate(
    model: Any,
    source: Any,
    cfg: TrainConfig,
    task: str,
    temperature: float,
    device: torch.device,
    rank: int,
    world: int,
) -> dict[str, float]:
    """Held-out metrics: hard-label loss (and perplexity for LMs, accuracy for classification) and the KD loss.

    As in training, each is a sum over all the evaluated positions of every rank divided by their number: the KD
    loss over the positions with targets, the others over those that also have a label ("positions")."""
    import torch

    from ..data.dataset import StoreDataset
    from .losses import hard_ce, kd_loss

    store, split = source
    dataset = StoreDataset(store, batch_size=cfg.batch_size, shuffle=False, rank=rank, world_size=world, **split)
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # ce_sum, kd_sum, correct, labelled, kd positions
    with torch.no_grad():
        for i, batch in enumerate(dataset):
            if i >= cfg.eval_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            select = selected(batch)
            # every rank runs the forward, also on a batch of stand-ins: under FSDP it gathers parameters together
            rows = model(batch["input_ids"], batch["attention_mask"], select, batch.get("positions"))
            if not bool(select.any()):
                continue
            mask = select.reshape(-1)
            k = batch["target_ids"].shape[-1]
            tid = batch["target_ids"].reshape(-1, k)[mask]
            tlp = batch["target_logprobs"].reshape(-1, k)[mask]
            tail = batch["tail_mass"].reshape(-1)[mask]
            tmask = batch["target_mask"].reshape(-1, k)[mask] if "target_mask" in batch else None
            labels = batch["labels"].reshape(-1)[mask]
            step = model.loss_chunk or rows.shape[0]  # as in training: (step, V) logits at a time, never (N, V)
            for c in range(0, rows.shape[0], step):
                part = slice(c, c + step)
                z = model.logits(rows[part])  # (n, V) float32
                sums[0] += hard_ce(z, labels[part], count=1.0).double()  # count 1: the sum
                kd = kd_loss(
                    z,
                    tid[part],
                    tlp[part],
                    tail[part],
                    kind=cfg.loss,
                    temperature=temperature,
                    beta=cfg.beta,
                    target_mask=tmask[part] if tmask is not None else None,
                    tail=cfg.tail,  # the KD figure measures the loss being trained, renormalised baseline included
                    count=1.0,
                )
                sums[1] += kd.double()
                sums[2] += (z.argmax(-1) == labels[part]).sum().double()  # an unlabelled row's -100 never matches
                sums[3] += (labels[part] >= 0).sum().double()
                sums[4] += z.shape[0]
    if world > 1:
        torch.distributed.all_reduce(sums)
    ce_sum, kd_sum, correct, count, kd_count = (float(x) for x in sums)
    count = max(count, 1.0)
    result = {"ce": ce_sum / count, "kd": kd_sum / max(kd_count, 1.0), "positions": count}
    if task == "seq-cls":
        result["accuracy"] = correct / count
    else:
        result["perplexity"] = math.exp(min(ce_sum / count, 50.0))
    return result
