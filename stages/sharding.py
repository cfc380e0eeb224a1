"""FSDP for ``pipeline train --fsdp``: the student's parameters, gradients and optimizer state sharded over torchrun's
ranks with PyTorch's ``fully_shard`` (FSDP2), optionally in bfloat16 mixed precision.

    torchrun --nproc-per-node 8 -m kd_pipeline train --fsdp --store STORE --student PATH --out RUN

Each transformer block (the classes a Hugging Face model names in ``_no_split_modules``) is one FSDP unit, gathered
for its own forward and backward only; the rest (embeddings, final norm, output head) is the root unit, a wrapper
around ``at_positions``' module. Outside a unit's forward, FSDP2 parameters are sharded DTensors: a (V, H) head
weight is one (V / world, H) shard per rank. The chunked head-and-loss reads the head's weight outside the head's own
forward, so the whole loss function runs inside the root wrapper's forward (``in_forward``): there the root's
parameters are the gathered, unsharded tensors (bfloat16 under mixed precision), the loss's autograd graph reaches
them, and FSDP reduce-scatters their gradients after backward like any other (a tied embedding gets the sum of the
lookup's gradient and the head's). Evaluation runs inside it too.

Mixed precision (``--fsdp-dtype bfloat16``): parameters are kept, reduced and updated in float32 and gathered in
bfloat16 for compute (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``). The root does not cast
its inputs: the teacher's log-probabilities in the batch stay float32; the chunked loss upcasts each chunk itself.

Checkpoints keep the format of an unsharded run (``run_dir``): every rank takes part in gathering the full tensors
(collectives), rank 0 writes them; on resume every rank reads the files and keeps its own shard. So a checkpoint
written with FSDP resumes without it and the other way round, and ``RUN_DIR/final`` loads with ``from_pretrained``.
Gathering the full state to rank 0's memory bounds the student to what one host's memory holds; a student larger
than that needs torch.distributed.checkpoint's sharded files (not done here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "FSDP_DTYPES",
    "full_model_state",
    "full_optimizer_state",
    "in_forward",
    "load_model_state",
    "place_optimizer_state",
    "shard_student",
]

FSDP_DTYPES = ("bfloat16", "float32")
"""``--fsdp-dtype``: the dtype FSDP gathers the parameters in for forward and backward (float32: no mixed
precision). Master weights, gradient reduction and the optimizer stay float32 either way."""


def shard_student(net: Any, param_dtype: str) -> Any:
    """``fully_shard`` every transformer block of ``net``'s student, then a root wrapper around ``net``.

    Args:
        net: ``batch_loss.at_positions``' module (its ``model`` is the Hugging Face student, already on its device).
        param_dtype: one of :data:`FSDP_DTYPES`.

    Returns:
        The root: an ``nn.Module`` whose ``module`` is ``net``; ``in_forward(root, fn, ...)`` runs ``fn(net, ...)``
        inside its forward. Build the optimizer after this call: ``fully_shard`` replaces the parameters with
        sharded DTensors.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = torch.bfloat16 if param_dtype == "bfloat16" else None
    blocks = set(getattr(net.model, "_no_split_modules", None) or ())
    # the blocks receive hidden states only: cast them to the compute dtype; the root receives the batch, whose
    # float targets (log-probabilities, tail mass) must stay float32
    inner = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    outer = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for module in net.model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=inner)

    class _Root(torch.nn.Module):
        """The root FSDP unit: its forward runs a function of ``net`` while the root's parameters are gathered."""

        def __init__(self) -> None:
            super().__init__()
            self.module = net

        def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
            return fn(self.module, *args)

        def no_sync(self) -> contextlib.AbstractContextManager[None]:
            """The training loop's DDP hook for accumulation micro-steps: FSDP reduce-scatters every micro-step
            anyway, so that no rank ever holds an unsharded gradient of the whole student (the point of FSDP);
            FSDP2's ``set_requires_gradient_sync(False)`` would trade that memory for less communication."""
            return contextlib.nullcontext()

    root = _Root()
    fully_shard(root, mp_policy=outer)
    return root


def in_forward(model: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(module, *args)``, inside the FSDP root's forward when ``model`` is ``shard_student``'s root (its
    parameters gathered), else ``fn(model, *args)`` as it is (a plain or DDP module)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        root: Any = model
        return root(fn, *args)
    return fn(model, *args)


# ---------------------------------------------------------------------------------------------------- checkpoints


def _aliases(model: Any) -> list[tuple[list[str], torch.Tensor]]:
    """The model's state as (names, tensor) groups: a tied parameter is one tensor under several names."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # keep_vars: the Parameter objects themselves
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (a collective), or a plain tensor; detached, contiguous, on the CPU."""
    from torch.distributed.tensor import DTensor

    t = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return t.detach().contiguous().cpu()


def full_model_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's whole state, every shard gathered: every rank must call this (it runs collectives).

    A tied tensor is kept once, under the name safetensors' ``save_model`` keeps (the first in sorted order), so
    that the file is the one an unsharded run writes.
    """
    return {sorted(names)[0]: _full(tensor) for names, tensor in _aliases(model)}


def load_model_state(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (``full_model_state``'s, or an unsharded run's checkpoint) into the model's own shards."""
    import torch

    with torch.no_grad():
        for names, target in _aliases(model):
            found = [n for n in names if n in tensors]
            if not found:
                raise KeyError(f"the checkpoint has no tensor for {' / '.join(names)}")
            _place(tensors[found[0]], target, copy=True)


def full_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """``optimizer.state_dict()`` with each sharded state tensor (AdamW's moments) gathered whole (collective)."""
    sd = optimizer.state_dict()
    state = {pid: {key: _full(value) for key, value in s.items()} for pid, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def place_optimizer_state(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict with each per-parameter tensor cut to this rank's shard of its parameter, for
    ``optimizer.load_state_dict`` (which would otherwise keep the full tensors beside sharded parameters)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's integer ids
    state = {
        pid: {key: _place(value, params[int(pid)], copy=False) for key, value in s.items()}
        for pid, s in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def _place(full: torch.Tensor, like: torch.Tensor, *, copy: bool) -> torch.Tensor:
    """``full`` cut as ``like`` is sharded (each rank keeps its own piece of the same full tensor, which every rank
    has read: no communication); copied into ``like`` when ``copy``. A tensor of another shape than the
    parameter (AdamW's scalar step) stays whole."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and tuple(full.shape) == tuple(like.shape):
        piece = distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        if copy:
            like.to_local().copy_(piece.to_local())
            return like
        return piece
    if copy:
        like.copy_(full)
        return like
    return full
