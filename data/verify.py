"""``pipeline verify``: recompute every checksum and count of a store and name each bad shard.

Catches a flipped byte (checksum), a truncated or missing file (size), a missing shard, a shard directory
that the manifest does not list, content whose counts or shapes disagree with the manifest, insane values
(data/values.py: NaN or positive log-probs, a wrong tail, repeated ids, bad sampled counts), a store with spans
whose ``tokens.json`` is missing or does not match its size and SHA-256 in the manifest, and a manifest whose paths
leave the store (rejected when the manifest is parsed, before any file is opened).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import shard_files
from .errors import StoreError
from .location import Location
from .reader import StoreReader, check_files, read_manifest
from .source_text import TOKEN_STRINGS_FILE, has_spans, read_token_strings

__all__ = ["VerifyReport", "verify_store"]


@dataclass
class VerifyReport:
    """What verify found. ``ok`` is True when the store is intact and complete."""

    store: str
    shards_checked: int = 0
    files_checked: int = 0
    bytes_checked: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.complete

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "ok": self.ok,
            "complete": self.complete,
            "shards_checked": self.shards_checked,
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "problems": self.problems,
        }


def verify_store(path_or_url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Check a whole store. A malformed manifest raises (a StoreError); shard problems are collected."""
    location = Location(path_or_url, storage_options)
    manifest = read_manifest(location)
    report = VerifyReport(store=str(location), complete=manifest.complete)
    if not manifest.complete:
        report.problems.append("the store is incomplete: its labeling run has not finished")
    if has_spans(manifest):  # the teacher's strings, checked against the manifest's record
        try:
            read_token_strings(location, manifest)
        except StoreError as e:
            report.problems.append(str(e))
        report.files_checked += 1
        report.bytes_checked += int(manifest.tokenizer["token_strings"].get("bytes") or 0)
    elif (location.size(TOKEN_STRINGS_FILE) if location.resolves_inside(TOKEN_STRINGS_FILE) else None) is not None:
        report.problems.append(f"{TOKEN_STRINGS_FILE}: present in the store but the manifest records no spans")
    listed = {s.path.removeprefix("shards/") for s in manifest.shards}
    for entry in location.list_shard_entries():
        if entry not in listed:
            report.problems.append(f"shards/{entry}: present in the store but not listed in the manifest")
    # A remote store is checked one shard at a time: its files are downloaded once, into a folder of this call's
    # own (never a cache a reader filled earlier, which would check the copy instead of the store), hashed there,
    # decoded, and deleted before the next shard, so the disk holds at most one shard, not a copy of the store.
    with tempfile.TemporaryDirectory(prefix="kd-verify-") as tmp:
        reader = StoreReader(location, manifest, cache_dir=None if location.is_local else tmp)
        for record in manifest.shards:
            files = shard_files(manifest.backend, record)
            try:
                if location.is_local:
                    check_files(location, record.name, files, verify=True)
                reader.load_shard(record, verify=False)
            except StoreError as e:
                report.problems.append(str(e))
            finally:
                if not location.is_local:
                    shutil.rmtree(Path(tmp) / "stores", ignore_errors=True)
            report.shards_checked += 1
            report.files_checked += len(files)
            report.bytes_checked += sum(f.bytes for f in files.values())
    return report
