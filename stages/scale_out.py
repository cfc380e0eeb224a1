"""Labeling split over processes: independent ``--num-shards`` jobs, or torchrun ranks merged at the end.

Each part labels the work units ``u`` with ``u % parts == index``; torchrun ranks write ``OUT/.ranks/rank-NNNNN``
and rank 0 merges them into ``OUT`` once every rank is done (``pipeline merge`` does the same for jobs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import data
from ..data.location import Location

__all__ = ["COUNTS", "already_merged", "job_lock", "merge_ranks", "with_counts", "with_part"]


COUNTS = ("records", "units")
"""The dataset's size, in the manifest's ``dataset``: known only once the streamed input has been read to its
end, so recorded when a store (or part) finishes, and left out when a run compares its template to a store."""


def with_part(template: data.Manifest, part: int, parts: int, target: str) -> data.Manifest:
    """The template of a part of a split run (``dataset.part``), carrying the counts of a finished store already
    at ``target`` (a re-run of a finished store, or of a finished rank of an interrupted job, then resumes it:
    the counts follow from the input's fingerprint and the configuration, which the writer still compares)."""
    dataset = dict(template.dataset)
    if parts > 1:
        dataset["part"] = {"index": part, "of": parts}
    try:
        existing = data.read_manifest(Location(target))
    except data.StoreError:
        existing = None
    if existing is not None:
        dataset.update({k: existing.dataset[k] for k in COUNTS if k in existing.dataset})
    return dataclasses.replace(template, dataset=dataset)


def with_counts(manifest: data.Manifest, records: int, units: int) -> data.Manifest:
    """``manifest`` with the dataset's size, once the input has been read to its end; the merge of a split run
    reads ``units`` to know that every unit is present."""
    recorded = {k: manifest.dataset[k] for k in COUNTS if k in manifest.dataset}
    if recorded and recorded != {"records": records, "units": units}:
        raise data.StoreError(
            f"the input gives {records} records in {units} units, but the store records {recorded}: "
            "the input changed under the same fingerprint"
        )
    return dataclasses.replace(manifest, dataset={**manifest.dataset, "records": records, "units": units})


def already_merged(out: str, template: data.Manifest, overwrite: bool = False) -> tuple[set[int], bool]:
    """Units already in the merged store of an earlier, interrupted torchrun job with the same configuration, and
    whether ``out`` holds a store of another configuration that ``overwrite`` replaces at the merge.

    A store of another configuration at ``out`` is refused here, before any rank labels anything (its merge into
    ``out`` would be refused only once every rank had labelled the whole input), unless ``overwrite``: then it
    stays readable until every rank has finished, and :func:`merge_ranks` replaces it."""
    from ..data.merge import without_part
    from ..data.writer import differences

    try:
        existing = data.read_manifest(Location(out))
    except data.StoreError:
        return set(), False
    ours, theirs = without_part(template).provenance_key(), existing.provenance_key()
    for key in (ours, theirs):
        key["dataset"] = {k: v for k, v in key["dataset"].items() if k not in COUNTS}
    diff = differences(theirs, ours)
    if diff and not overwrite:
        raise data.StoreExistsError(
            f"{out} already holds a store labelled with a different configuration (differs in: {', '.join(diff)}); "
            "pass --overwrite to start over, or choose another output path"
        )
    return (set(), True) if diff else ({s.unit for s in existing.shards}, False)


def merge_ranks(out: str, world: int, rank: int, say: Any, replace: bool = False) -> data.Manifest:
    """Wait for every rank, merge their stores into ``out`` on rank 0, and wait for the merge. ``replace``: first
    remove the store of another configuration that ``out`` holds (everything but the ranks' own stores)."""
    from datetime import timedelta

    import torch.distributed as dist

    from ..data.errors import StoreWriteError
    from ..data.merge import merge_stores
    from ..data.writer import own_entries
    from . import process_group

    process_group.init("gloo", timeout=timedelta(hours=24))  # ranks finish hours apart
    dist.barrier()
    ranks = [f"{out.rstrip('/')}/.ranks/rank-{r:05d}" for r in range(world)]
    failure: list[str | None] = [None]  # rank 0's error, sent to every rank (a bare barrier left them gloo's
    # "Connection closed by peer" traceback when rank 0 exited with its error)
    error: Exception | None = None
    try:
        if rank == 0:
            location = Location(out)
            if replace:
                for name in own_entries(location.root_entries(), keep=frozenset({".ranks", ".lock"})):
                    location.remove(name)
                say(f"--overwrite: removed the store of another configuration at {out}")
            merge_stores(out, ranks, move=location.is_local, log=say)
            location.remove(".ranks")
            say(f"merged {world} ranks into {out}")
    except Exception as e:
        error, failure[0] = e, str(e) or type(e).__name__
    dist.broadcast_object_list(failure, src=0)
    if error is not None:  # rank 0: its own error, as before
        raise error
    if failure[0] is not None:
        raise StoreWriteError(
            f"rank {dist.get_rank()} stops: rank 0 could not merge the ranks' stores into {out}: {failure[0]}"
        )
    manifest = data.read_manifest(Location(out))
    process_group.teardown()  # the group pipeline started, destroyed while the interpreter is alive
    return manifest


def job_lock(out: str) -> int | None:
    """Ranks of one torchrun job share the store's lock, so an unrelated writer of the same store is refused."""
    from ..data.writer import lock_store

    location = Location(out)
    if not location.is_local:
        return None
    location.root.mkdir(parents=True, exist_ok=True)
    return lock_store(location, shared=True)
