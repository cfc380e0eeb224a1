"""Editing a store's manifest as raw JSON, as a hostile or careless author would, whatever its format version.

``load`` returns the manifest with every shard record inline (a version-2 root's segments read and
concatenated); ``save`` writes such a dict back as a version-1 manifest (records inline, no ``records/``), the
format every reader still accepts, so that a test can forge any field of any record. ``strip_counts`` turns a
version-2 root into one as the writer wrote it before the per-shard counts (the loader's slow path).

Standard library only, no pytest: bench/loader_startup.py imports it too (with the repository root on sys.path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def load(store: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((store / "manifest.json").read_text())
    if "segments" in raw:
        raw["shards"] = [s for ref in raw["segments"] for s in json.loads((store / ref["path"]).read_text())["shards"]]
    return raw


def save(store: Path, raw: dict[str, Any]) -> None:
    raw = {k: v for k, v in raw.items() if k != "segments"}
    if raw.get("format_version") == 2:
        raw["format_version"] = 1
    (store / "manifest.json").write_text(json.dumps(raw))
    shutil.rmtree(store / "records", ignore_errors=True)


def strip_counts(store: Path) -> None:
    """Remove the per-shard example counts from a version-2 root (``segment_counts`` and each segment's
    ``shard_rows`` / ``summary``): the root the writer wrote before them. Segments and shards are unchanged."""
    root = json.loads((store / "manifest.json").read_text())
    root.pop("segment_counts")
    for ref in root["segments"]:
        ref.pop("shard_rows", None)
        ref.pop("summary", None)
    (store / "manifest.json").write_text(json.dumps(root))
