"""The torch.distributed default process group that ``pipeline`` itself starts under torchrun, and its teardown.

A group that this process started is destroyed when the command has finished its work, on every rank, while the
interpreter is fully alive: left to the interpreter's finalisation, gloo's worker threads were torn down with it
and a rank could die of SIGABRT ("terminate called without an active exception") after the run had finished and
saved everything (seen under load in CI, `pipeline train --fsdp` on 2 CPU ranks), turning a finished run into a
failed exit. A group that the caller started (a trainer that owns torch.distributed) is left alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["init", "teardown"]

_started = False


def init(backend: str, **kwargs: Any) -> None:
    """``init_process_group(backend, **kwargs)`` unless a group exists; remembers that this process started it."""
    global _started
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **kwargs)
        _started = True


def teardown() -> None:
    """On every rank, after the barrier that ends its last collective (both callers end with one): destroy the
    group this process started."""
    global _started
    import torch.distributed as dist

    if _started and dist.is_initialized():
        dist.destroy_process_group()
    _started = False
