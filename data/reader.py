"""Reading a store: ``data.open_store(path_or_url)``.

    store = data.open_store("stores/pydoc-top32")      # or "s3://bucket/stores/pydoc-top32"
    len(store)                                         # examples
    store.manifest.targets.k, store.manifest.teacher   # provenance
    ex = store[0]                                      # dict of numpy arrays, see ShardData.example
    for ex in store: ...

Shards are loaded whole, on first use, and kept in a small LRU cache. Before a shard is decoded its files
are checked against the sizes in the manifest (a truncated or missing file is refused before any read);
with ``verify=True`` their SHA-256 too. Remote shards are downloaded into a local cache, checksummed on the
way, and read from there; a second read of the same shard (another process, another run) downloads nothing.

A store is untrusted input. Besides the manifest's own checks (data/manifest.py), before a shard is decoded:
its counts must be plausible for the bytes its files hold (no absurd allocation from a tiny file); every file
must resolve inside the store (no symlink out of it) and a zarr shard's folder must hold only the files the
manifest lists; and each column's metadata (zarr array metadata or arrow schema) must match the data type and
shape the manifest implies (data/backends.py), so nothing larger than promised is ever decoded and no pickle
or object codec ever runs.
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

from .backends import Column, decoded_bytes, read_keys, read_shard, shard_files, stored_columns
from .codecs import decode_shard
from .errors import (
    CorruptShardError,
    IncompatibleStoreError,
    IncompleteStoreError,
    ManifestError,
    NotAStoreError,
    StoreError,
    StoreNotFoundError,
    StoreReadError,
)
from .location import Location, sha256_file
from .manifest import FileRecord, Manifest, ShardRecord
from .segments import LazyShards, RowIndex, parse_root
from .shard import NDArray, ShardData

__all__ = [
    "StoreReadError",
    "StoreReader",
    "check_compatible",
    "check_files",
    "default_cache_dir",
    "open_store",
    "read_manifest",
]

# A version-1 manifest is a few KB per shard (a version-2 root ~170 KB at 1,000,000 shards); anything far larger
# is not one.
_MAX_MANIFEST_BYTES = 256 << 20
# A real shard's columns compress a few times over (~3x on a real teacher). Counts that imply more decoded bytes
# than this many per stored byte, beyond a fixed allowance, are refused before anything is read or allocated.
_MAX_EXPANSION = 1024
_EXPANSION_ALLOWANCE = 256 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("KD_PIPELINE_CACHE", Path.home() / ".cache" / "kd-pipeline"))


def read_manifest(location: Location) -> Manifest:
    """Read and check ``manifest.json``: a version-1 manifest whole, a version-2 root alone (its shard records
    are read from their segments when first used, data/segments.py).

    Raises StoreNotFoundError, NotAStoreError, ManifestError, and StoreReadError when the store cannot be reached.
    """
    try:
        if not location.root_exists():
            raise StoreNotFoundError(f"{location}: no such store (nothing exists at that path)")
        size = location.size("manifest.json")
        if size is None:
            raise NotAStoreError(f"{location} is not a soft-label store: it has no manifest.json")
        if size > _MAX_MANIFEST_BYTES:
            raise ManifestError(f"{location}: manifest.json is {size} bytes, larger than any real manifest")
        text = location.read_bytes("manifest.json")
    except StoreError:
        raise
    except OSError as e:
        raise StoreReadError(
            f"{location}: reading manifest.json failed ({e}); check that the store is reachable and retry"
        ) from e
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotAStoreError(f"{location}: manifest.json is not valid JSON ({e})") from e
    if isinstance(raw, dict) and raw.get("format_version") == 2 and "segments" in raw:
        return parse_root(raw, location)
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
        self._rows = RowIndex(manifest.shards)  # reads no shard record up front (version 2: segment by segment)
        self._keys: dict[int, NDArray] = {}  # shard -> (rows, 16) uint8: 16 bytes per example, kept
        # shards whose local files this process has hashed: checksums on first read, not on every epoch's read
        self._verified: set[str] = set()
        self._remote_cache = None
        if not location.is_local:
            url_digest = hashlib.sha256(location.url.encode()).hexdigest()[:16]
            self._remote_cache = Path(cache_dir or default_cache_dir()) / "stores" / url_digest
            if isinstance(manifest.shards, LazyShards):
                manifest.shards.cache_dir = self._remote_cache / "records"

    def __len__(self) -> int:
        return self._rows.total

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    def __getitem__(self, index: int) -> dict[str, NDArray]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} is out of range for a store of {n} examples")
        index %= n
        s, row = self._rows.find(index)
        return self.shard(s).example(row, self.manifest.task)

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
        """Check a shard's files, decode it, and check its content against the manifest.

        Raises:
            CorruptShardError: the files or their content do not match the manifest.
            StoreReadError: the store could not be read (nothing is cached from a failed download).
        """
        m = self.manifest
        files = shard_files(m.backend, record)
        expected = stored_columns(
            m.task, m.targets, record.rows, record.tokens, record.positions, record.entries, record.text_bytes
        )
        _check_plausible(record, expected)
        try:
            if self.location.is_local:
                first = verify and record.name not in self._verified
                check_files(self.location, record.name, files, verify=first)
                if first:
                    self._verified.add(record.name)
                path = self.location.local(record.path)
            else:
                path = self._fetch(record, files)
            if m.backend == "zarr":
                _check_only_listed(record, path)
            stored = read_shard(m.backend, path, expected)
        except StoreError:
            raise
        except OSError as e:
            raise StoreReadError(
                f"{self.location}: reading {record.name} failed ({e}); the store is unchanged: check that it is "
                "reachable and retry (files already downloaded are reused)"
            ) from e
        # the one place a stored log-prob encoding is inverted (data/codecs.py); it checks the stored dtype first
        data = decode_shard(m.targets, stored, record.name)
        counts = (data.rows, data.tokens, data.num_positions)
        if counts != (record.rows, record.tokens, record.positions):
            raise CorruptShardError(
                f"{record.name}: holds rows/tokens/positions {counts}, the manifest says "
                f"{(record.rows, record.tokens, record.positions)}"
            )
        data.validate(m.task, m.targets, m.vocab_size, record.name)
        return data

    def _fetch(self, record: ShardRecord, files: dict[str, FileRecord]) -> Path:
        """Download a remote shard's files into the local cache, checking each one's size before and SHA-256
        after the download; files already there are reused. Returns the local path of the shard.

        The cache holds one folder per shard *version* (the name plus a digest of every file's SHA-256), so a
        folder only ever holds files of that manifest record, each checked when it was downloaded, and nothing
        else (a zarr reader reads whatever the folder holds).
        """
        assert self._remote_cache is not None
        digests = json.dumps(sorted((rel, rec.sha256) for rel, rec in files.items()))
        folder = self._remote_cache / f"{record.name}-{hashlib.sha256(digests.encode()).hexdigest()[:16]}"
        for rel, rec in files.items():
            dest = folder / rel.removeprefix("shards/")
            if dest.is_file() and dest.stat().st_size == rec.bytes:
                continue
            check_files(self.location, record.name, {rel: rec}, verify=False)  # a HEAD: no download of a wrong size
            # unique per process: DataLoader workers may fetch the same shard at once; outside the shard folder
            # so that a download cut short never sits among the shard's files
            tmp = self._remote_cache / ".partial" / f"{record.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
            try:
                self.location.download(rel, tmp)
                if tmp.stat().st_size != rec.bytes or sha256_file(tmp) != rec.sha256:
                    raise CorruptShardError(
                        f"{record.name}: downloaded file {rel} does not match its manifest checksum"
                    )
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return folder / record.path.removeprefix("shards/")

    def shard_keys(self, s: int) -> NDArray:
        """The content keys of shard ``s``, (rows, 16) uint8, read without decoding the rest of the shard (its
        other files are not read locally; a remote shard is downloaded whole into the cache, as for a read);
        kept for the reader's lifetime.

        Raises:
            CorruptShardError: the keys' files or values do not match the manifest.
            StoreReadError: the store could not be read.
        """
        if s in self._keys:
            return self._keys[s]
        m, record = self.manifest, self.manifest.shards[s]
        files = shard_files(m.backend, record)
        expected = stored_columns(
            m.task, m.targets, record.rows, record.tokens, record.positions, record.entries, record.text_bytes
        )
        _check_plausible(record, expected)
        try:
            if self.location.is_local:
                if m.backend == "zarr":
                    files = {rel: f for rel, f in files.items() if rel.startswith(f"{record.path}/keys/")}
                # a shard whose files were all hashed already (by load_shard) is not hashed again
                verify = self.verify and record.name not in self._verified
                check_files(self.location, record.name, files, verify=verify)
                path = self.location.local(record.path)
            else:
                path = self._fetch(record, files)
        except StoreError:
            raise
        except OSError as e:
            raise StoreReadError(f"{self.location}: reading {record.name} failed ({e}); retry") from e
        self._keys[s] = read_keys(m.backend, path, record.rows, expected["keys"])
        return self._keys[s]

    def check_compatible(self, **kwargs: Any) -> None:
        """See :func:`check_compatible`."""
        check_compatible(self.manifest, **kwargs)


def _check_plausible(record: ShardRecord, expected: dict[str, Column]) -> None:
    """Refuse counts that no honest shard of this size could hold, before any file is read."""
    stored = sum(f.bytes for f in record.files.values())
    decoded = decoded_bytes(expected)
    if decoded > _MAX_EXPANSION * stored + _EXPANSION_ALLOWANCE:
        raise CorruptShardError(
            f"{record.name}: the manifest's counts (rows {record.rows}, tokens {record.tokens}, positions "
            f"{record.positions}) need {decoded} bytes once decoded, but its files hold only {stored} bytes; "
            "refusing to decode it"
        )


def _check_only_listed(record: ShardRecord, shard_dir: Path) -> None:
    """A zarr reader reads whatever a shard's folder holds, so it must hold exactly the listed (size-checked)
    files, and no symlink that could lead elsewhere."""
    if not shard_dir.is_dir():
        raise CorruptShardError(f"{record.name}: {record.path} is not a folder")
    for folder, dirs, names in os.walk(shard_dir):
        for entry in (*dirs, *names):
            path = Path(folder) / entry
            rel = path.relative_to(shard_dir).as_posix()
            if path.is_symlink():
                raise CorruptShardError(f"{record.name}: {rel} is a symlink; a shard holds only plain files")
            if entry in names and rel not in record.files:
                raise CorruptShardError(f"{record.name}: file {rel} is not listed in the manifest; refusing the shard")


def check_files(location: Location, name: str, files: dict[str, Any], *, verify: bool) -> None:
    """Refuse a shard with a missing or wrongly sized file, or (local stores) a file that resolves outside the
    store through a symlink; with ``verify``, also a wrong checksum. Sizes come from a stat (or a HEAD): a file
    is never read to find out that it has the wrong size.

    Raises:
        CorruptShardError: a file is missing, outside the store, or does not match the manifest.
        StoreReadError: the store could not be read.
    """
    try:
        for rel, rec in files.items():
            if not location.resolves_inside(rel):
                raise CorruptShardError(f"{name}: file {rel} leads outside the store through a symlink; refusing it")
            size = location.size(rel)
            if size is None:
                raise CorruptShardError(f"{name}: file {rel} is missing")
            if size != rec.bytes:
                raise CorruptShardError(f"{name}: file {rel} has {size} bytes, the manifest says {rec.bytes}")
            if verify and location.sha256(rel) != rec.sha256:
                raise CorruptShardError(f"{name}: file {rel} does not match its SHA-256 in the manifest")
    except StoreError:
        raise
    except OSError as e:
        raise StoreReadError(f"{location}: reading {name} failed ({e}); check that the store is reachable") from e


def check_compatible(
    manifest: Manifest,
    *,
    vocab_size: int | None = None,
    tokenizer_digest: str | None = None,
    task: str | None = None,
    temperature: float | None = None,
) -> None:
    """Accept or refuse a store for a student, before any training work.

    Args:
        manifest: the store's manifest.
        vocab_size: the student's output width (its embedding / LM-head rows, or number of classes), if known
            (None: checked later, once the student is loaded).
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
    if vocab_size is not None and vocab_size < t.num_classes:
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
            "use a student that shares the teacher's tokenizer, or train it on purpose with --cross-tokenizer (from a "
            "store labelled with --spans)"
        )
    if temperature is not None and abs(temperature - t.temperature) > 1e-6:
        problems.append(
            f"--temperature {temperature} differs from the store's labeling temperature {t.temperature}; the "
            f"cached log-probs are at T={t.temperature}: train with --temperature {t.temperature} or re-label"
        )
    if problems:
        raise IncompatibleStoreError("store is incompatible with the student: " + "; ".join(problems))
