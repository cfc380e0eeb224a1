"""Reading a store: ``data.open_store(path_or_url)``.

    store = data.open_store("stores/pydoc-top32")      # or "s3://bucket/stores/pydoc-top32"
    len(store)                                         # examples
    store.manifest.targets.k, store.manifest.teacher   # provenance
    ex = store[0]                                      # dict of numpy arrays, see ShardData.example
    for ex in store: ...

Shards are loaded whole, on first use, and kept in a small LRU cache. Before a shard is decoded its files
are checked against the sizes in the manifest (a truncated or missing file is refused before any read);
with ``verify=True`` their SHA-256 too. Remote shards are downloaded into a local cache, checksummed on the
way, and read from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data.backends import read_shard, shard_files
from data.codecs import decode_shard
from data.errors import (
    CorruptShardError,
    IncompatibleStoreError,
    IncompleteStoreError,
    ManifestError,
    NotAStoreError,
    StoreNotFoundError,
)
from data.location import Location, sha256_file
from data.manifest import Manifest, ShardRecord
from data.shard import NDArray, ShardData

__all__ = ["StoreReader", "check_compatible", "default_cache_dir", "open_store", "read_manifest"]

# A manifest is small (a few hundred bytes per shard); anything far larger is not one.
_MAX_MANIFEST_BYTES = 256 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("KD_PIPELINE_CACHE", Path.home() / ".cache" / "kd-pipeline"))


def read_manifest(location: Location) -> Manifest:
    """Read and check ``manifest.json``. Raises StoreNotFoundError, NotAStoreError, ManifestError."""
    if not location.root_exists():
        raise StoreNotFoundError(f"{location}: no such store (nothing exists at that path)")
    size = location.size("manifest.json")
    if size is None:
        raise NotAStoreError(f"{location} is not a soft-label store: it has no manifest.json")
    if size > _MAX_MANIFEST_BYTES:
        raise ManifestError(f"{location}: manifest.json is {size} bytes, larger than any real manifest")
    try:
        raw = json.loads(location.read_bytes("manifest.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotAStoreError(f"{location}: manifest.json is not valid JSON ({e})") from e
    return Manifest.from_dict(raw)


def open_store(
    path_or_url: str | os.PathLike[str],
    *,
    allow_incomplete: bool = False,
    verify: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StoreReader:
    """Open a store for reading.

    Args:
        path_or_url: a local directory or an fsspec URL.
        allow_incomplete: read the shards committed so far by a run that has not finished.
        verify: check every shard's SHA-256 when it is first loaded (remote shards are always checked).
        cache_dir: where remote shards are cached (default ``$KD_PIPELINE_CACHE`` or ``~/.cache/kd-pipeline``).
        storage_options: fsspec options for URLs.

    Raises:
        StoreNotFoundError, NotAStoreError, ManifestError, UnsupportedFormatError, IncompleteStoreError.
    """
    location = Location(path_or_url, storage_options)
    manifest = read_manifest(location)
    if not manifest.complete and not allow_incomplete:
        raise IncompleteStoreError(
            f"{location}: the labeling run that writes this store has not finished "
            f"({len(manifest.shards)} shards committed so far); re-run `pipeline label` with the same arguments "
            "to finish it"
        )
    return StoreReader(location, manifest, verify=verify, cache_dir=cache_dir)


class StoreReader:
    """Random access and iteration over a store's examples. Build with :func:`open_store`."""

    def __init__(
        self,
        location: Location,
        manifest: Manifest,
        *,
        verify: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        max_cached_shards: int = 2,
    ) -> None:
        self.location = location
        self.manifest = manifest
        self.verify = verify
        self._cache: OrderedDict[int, ShardData] = OrderedDict()
        self._max_cached = max_cached_shards
        self._row_starts = np.cumsum([0] + [s.rows for s in manifest.shards])
        self._remote_cache = None
        if not location.is_local:
            url_digest = hashlib.sha256(location.url.encode()).hexdigest()[:16]
            self._remote_cache = Path(cache_dir or default_cache_dir()) / "stores" / url_digest

    def __len__(self) -> int:
        return int(self._row_starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    def __getitem__(self, index: int) -> dict[str, NDArray]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} is out of range for a store of {n} examples")
        index %= n
        s = int(np.searchsorted(self._row_starts, index, side="right")) - 1
        return self.shard(s).example(index - int(self._row_starts[s]), self.manifest.task)

    def __iter__(self) -> Iterator[dict[str, NDArray]]:
        for s in range(self.num_shards):
            data = self.shard(s)
            for r in range(data.rows):
                yield data.example(r, self.manifest.task)

    def shard(self, s: int) -> ShardData:
        """Shard ``s`` (in manifest order), loaded, checked and cached."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        data = self.load_shard(self.manifest.shards[s], verify=self.verify)
        self._cache[s] = data
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return data

    def load_shard(self, record: ShardRecord, *, verify: bool) -> ShardData:
        """Check a shard's files, decode it, and check its content against the manifest."""
        m = self.manifest
        files = shard_files(m.backend, record)
        if self.location.is_local:
            root = self.location.root
            check_files(self.location, record.name, files, verify=verify)
        else:
            root = self._fetch(record.name, files)
        # the one place a stored log-prob encoding is inverted (data/codecs.py); it checks the stored dtype first
        data = decode_shard(m.targets, read_shard(m.backend, root / record.path), record.name)
        counts = (data.rows, data.tokens, data.num_positions)
        if counts != (record.rows, record.tokens, record.positions):
            raise CorruptShardError(
                f"{record.name}: holds rows/tokens/positions {counts}, the manifest says "
                f"{(record.rows, record.tokens, record.positions)}"
            )
        data.validate(m.task, m.targets, m.vocab_size, record.name)
        return data

    def _fetch(self, name: str, files: dict[str, Any]) -> Path:
        """Download a remote shard's files into the local cache, checking each SHA-256 (cached files are reused)."""
        assert self._remote_cache is not None
        root = self._remote_cache
        for rel, rec in files.items():
            dest = root / rel
            if dest.is_file() and dest.stat().st_size == rec.bytes and _cached_ok(dest, rec.sha256):
                continue
            # unique per process: DataLoader workers may fetch the same shard at once
            tmp = dest.with_name(f"{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
            self.location.download(rel, tmp)
            if tmp.stat().st_size != rec.bytes or sha256_file(tmp) != rec.sha256:
                tmp.unlink()
                raise CorruptShardError(f"{name}: downloaded file {rel} does not match its manifest checksum")
            os.replace(tmp, dest)
            dest.with_name(dest.name + ".sha256").write_text(rec.sha256)
        return root

    def check_compatible(self, **kwargs: Any) -> None:
        """See :func:`check_compatible`."""
        check_compatible(self.manifest, **kwargs)


def _cached_ok(path: Path, sha256: str) -> bool:
    marker = path.with_name(path.name + ".sha256")
    return marker.is_file() and marker.read_text() == sha256


def check_files(location: Location, name: str, files: dict[str, Any], *, verify: bool) -> None:
    """Refuse a shard with a missing or wrongly sized file (and, with ``verify``, a wrong checksum)."""
    for rel, rec in files.items():
        size = location.size(rel)
        if size is None:
            raise CorruptShardError(f"{name}: file {rel} is missing")
        if size != rec.bytes:
            raise CorruptShardError(f"{name}: file {rel} has {size} bytes, the manifest says {rec.bytes}")
        if verify:
            h = hashlib.sha256()
            for block in location.iter_file(rel):
                h.update(block)
            if h.hexdigest() != rec.sha256:
                raise CorruptShardError(f"{name}: file {rel} does not match its SHA-256 in the manifest")


def check_compatible(
    manifest: Manifest,
    *,
    vocab_size: int,
    tokenizer_digest: str | None = None,
    task: str | None = None,
    temperature: float | None = None,
) -> None:
    """Accept or refuse a store for a student, before any training work.

    Args:
        manifest: the store's manifest.
        vocab_size: the student's output width (its embedding / LM-head rows, or number of classes).
        tokenizer_digest: the student tokenizer's digest, if it has one; must equal the store's.
        task: the student's task, if known; must equal the store's.
        temperature: the training temperature, if given; must equal the labeling temperature.

    Raises:
        IncompatibleStoreError: with every reason, and what to do about each.
    """
    problems: list[str] = []
    t = manifest.targets
    if task is not None and task != manifest.task:
        problems.append(
            f"the store holds {manifest.task} targets ({manifest.granularity}-level), the student is {task}; "
            "label a store for this task or pick a matching student"
        )
    if vocab_size < t.num_classes:
        what = "classes" if manifest.task == "seq-cls" else "vocabulary rows"
        problems.append(
            f"the student has {vocab_size} {what} but the store's ids go up to {t.num_classes - 1}; "
            f"use a student with at least {t.num_classes} {what} (resize its embeddings)"
        )
    store_digest = manifest.tokenizer.get("digest")
    if tokenizer_digest is not None and store_digest and tokenizer_digest != store_digest:
        problems.append(
            "the student's tokenizer differs from the teacher's (vocabulary digests "
            f"{tokenizer_digest[:12]} vs {str(store_digest)[:12]}), so the same id means different tokens; "
            "use a student that shares the teacher's tokenizer"
        )
    if temperature is not None and abs(temperature - t.temperature) > 1e-6:
        problems.append(
            f"--temperature {temperature} differs from the store's labeling temperature {t.temperature}; the "
            f"cached log-probs are at T={t.temperature}: train with --temperature {t.temperature} or re-label"
        )
    if problems:
        raise IncompatibleStoreError("store is incompatible with the student: " + "; ".join(problems))
