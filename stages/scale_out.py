"""Labeling split over processes: independent ``--num-shards`` jobs, or torchrun ranks merged at the end.

Each part labels the work units ``u`` with ``u % parts == index``; torchrun ranks write ``OUT/.ranks/rank-NNNNN``
and rank 0 merges them into ``OUT`` once every rank is done (``pipeline merge`` does the same for jobs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import data
from ..data.location import Location

__all__ = ["already_merged", "job_lock", "merge_ranks", "with_part"]


def with_part(template: data.Manifest, examples: int, units: int, part: int, parts: int) -> data.Manifest:
    """Record the dataset's size in units (for merging) and, for a part of a split run, which part it is."""
    dataset = {**template.dataset, "examples": examples, "units": units}
    if parts > 1:
        dataset["part"] = {"index": part, "of": parts}
    return dataclasses.replace(template, dataset=dataset)


def already_merged(out: str, template: data.Manifest) -> set[int]:
    """Units already in the merged store of an earlier, interrupted torchrun job with the same configuration."""
    from ..data.merge import without_part
    from ..data.writer import differences

    try:
        existing = data.read_manifest(Location(out))
    except data.StoreError:
        return set()
    if differences(existing.provenance_key(), without_part(template).provenance_key()):
        return set()
    return {s.unit for s in existing.shards}


def merge_ranks(out: str, world: int, rank: int, say: Any) -> data.Manifest:
    """Wait for every rank, merge their stores into ``out`` on rank 0, and wait for the merge."""
    from datetime import timedelta

    import torch.distributed as dist

    from ..data.merge import merge_stores

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=timedelta(hours=24))  # ranks finish hours apart
    dist.barrier()
    ranks = [f"{out.rstrip('/')}/.ranks/rank-{r:05d}" for r in range(world)]
    if rank == 0:
        location = Location(out)
        merge_stores(out, ranks, move=location.is_local, log=say)
        location.remove(".ranks")
        say(f"merged {world} ranks into {out}")
    dist.barrier()
    return data.read_manifest(Location(out))


def job_lock(out: str) -> int | None:
    """Ranks of one torchrun job share the store's lock, so an unrelated writer of the same store is refused."""
    from ..data.writer import lock_store

    location = Location(out)
    if not location.is_local:
        return None
    location.root.mkdir(parents=True, exist_ok=True)
    return lock_store(location, shared=True)
