"""Checks of the tensors handed to the losses: shapes, dtypes, id and label ranges, each with a message that says
what was expected and what came. (The options are checked by ``options.check_loss_options``.)"""

from __future__ import annotations

import torch
from torch import Tensor

__all__: list[str] = []  # package-private


def _check_shapes(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    tail_mass: Tensor,
    position_mask: Tensor | None,
    target_mask: Tensor | None,
) -> None:
    if student_logits.dim() != 2 or not student_logits.dtype.is_floating_point:
        raise ValueError(
            f"student_logits must be an (N, V) float tensor, got {tuple(student_logits.shape)} {student_logits.dtype}"
        )
    n = student_logits.shape[0]
    if target_ids.dim() != 2 or target_ids.shape[0] != n:
        raise ValueError(f"target_ids must be (N, K) with N={n} (student_logits rows), got {tuple(target_ids.shape)}")
    if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    expected = (n, target_ids.shape[1])
    if target_logprobs.shape != expected or not target_logprobs.dtype.is_floating_point:
        raise ValueError(
            f"target_logprobs must be a float tensor of shape {expected} like target_ids, "
            f"got {tuple(target_logprobs.shape)} {target_logprobs.dtype}"
        )
    if tail_mass.shape != (n,) or not tail_mass.dtype.is_floating_point:
        raise ValueError(
            f"tail_mass must be a float tensor of shape ({n},), got {tuple(tail_mass.shape)} {tail_mass.dtype}"
        )
    if position_mask is not None and (position_mask.shape != (n,) or position_mask.dtype != torch.bool):
        raise ValueError(
            f"position_mask must be a bool tensor of shape ({n},), "
            f"got {tuple(position_mask.shape)} {position_mask.dtype}"
        )
    if target_mask is not None and (target_mask.shape != expected or target_mask.dtype != torch.bool):
        raise ValueError(
            f"target_mask must be a bool tensor of shape {expected} like target_ids, "
            f"got {tuple(target_mask.shape)} {target_mask.dtype}"
        )


def _labelled(labels: Tensor, logits_shape: tuple[int, ...], position_mask: Tensor | None) -> Tensor:
    """(N,) bool: the positions whose hard label counts (label >= 0, not masked), after checking the labels.

    Raises:
        ValueError: labels that are not an (N,) integer tensor, a bad position_mask, or a label >= C.
    """
    n, c = logits_shape
    if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an ({n},) integer tensor, got {tuple(labels.shape)} {labels.dtype}")
    if position_mask is not None and (position_mask.shape != (n,) or position_mask.dtype != torch.bool):
        raise ValueError(
            f"position_mask must be an ({n},) bool tensor, got {tuple(position_mask.shape)} {position_mask.dtype}"
        )
    valid = labels >= 0
    if position_mask is not None:
        valid = valid & position_mask
    if bool((labels[valid] >= c).any()):
        raise ValueError(f"labels must be < the number of classes {c}, got max {int(labels[valid].max())}")
    return valid


def _check_id_range(target_ids: Tensor, target_mask: Tensor | None, vocab: int) -> None:
    bad = (target_ids < 0) | (target_ids >= vocab)
    if target_mask is not None:
        bad = bad & target_mask
    if bool(bad.any()):
        raise ValueError(
            f"target ids must lie in [0, {vocab}) (the student's vocabulary), got {target_ids[bad][:8].tolist()}; "
            "a student with a smaller vocabulary than the store's teacher cannot be distilled from it"
        )
