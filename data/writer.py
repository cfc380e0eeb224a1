"""Writing a store: one shard per work unit, each committed by replacing the manifest's root.

    with StoreWriter(path, manifest_template) as w:
        for unit in range(n_units):
            if unit in w.committed_units:   # resume: done by an earlier run
                continue
            w.write_shard(unit, shard_data, stats)
        w.finish()                          # marks the manifest complete

Commit protocol: the shard is written in full into a staging path, checksummed, moved to its final name,
and only then listed: its record goes into a new immutable segment file (data/segments.py) and
``manifest.json``, the root that names the segments, is replaced atomically. A crash at any point leaves the
previous root valid and every listed shard intact; an unlisted leftover (shard or segment) is overwritten on
resume. New stores are format version 2; a version-1 store resumes as version 1 (every record inline in the
manifest, rewritten at each commit), so that the code that wrote it can still read it.

On an object store (an fsspec URL) there is no rename: the staged files are PUT once under their final names,
then the manifest is replaced by one PUT (data/location.py). A failed write (a full disk, a server that went
away) raises StoreWriteError naming the store and what failed; re-running resumes after the last commit. The
write lock is a local file lock: it cannot stop two processes writing one *remote* store, so remote writers
must be coordinated by the job (one writer per store, or ``--num-shards`` parts merged at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from .backends import shard_files, shard_relpath, write_shard
from .codecs import encode_shard, resolve_targets
from .errors import (
    CorruptShardError,
    NotAStoreError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreWriteError,
)
from .location import Location, sha256_file
from .manifest import FileRecord, Manifest, ShardRecord, Totals
from .reader import check_files, read_manifest
from .record_log import RecordLog
from .segments import SEGMENT_SHARDS, LazyShards
from .shard import ShardData

__all__ = ["OWN_ENTRIES", "StoreWriter", "differences", "own_entries", "shard_name"]

# Entries a store directory may hold besides its shards and manifest (ours, so an --overwrite may remove them).
OWN_ENTRIES = frozenset({"manifest.json", "shards", "records", ".staging", ".lock", ".ranks", "tokens.json"})
"""The names a store keeps at its root: what --overwrite removes (never other files a user put there)."""


def own_entries(entries: list[str], keep: frozenset[str] = frozenset({".lock"})) -> list[str]:
    """The store's own names among a root's ``entries`` but ``keep``, in the order --overwrite removes them: the
    manifest last, so that a crash half-way leaves a store that --overwrite still recognises as one."""
    return sorted(set(entries) & OWN_ENTRIES - keep, key=lambda n: (n == "manifest.json", n))


def shard_name(unit: int) -> str:
    """Zero-padded, so that names sort in unit order: ``shard-000012``."""
    return f"shard-{unit:06d}"


class StoreWriter:
    """Creates a store, or resumes one written with the same configuration.

    Args:
        path_or_url: where the store lives.
        template: the manifest to start from (provenance filled, no shards). Its ``provenance_key`` must equal
            that of an existing store to resume it.
        overwrite: delete an existing *store* at the path and start over. Never deletes something that is not
            a store.
        storage_options: fsspec options for URLs.

    Raises:
        StoreExistsError: the path holds something that is not a store, or a store of another configuration.
        StoreLockedError: another process is writing this store.
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike[str],
        template: Manifest,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.location = Location(path_or_url, storage_options)
        self._lock_fd: int | None = None
        self._log: RecordLog | None = None  # version 2; None: a version-1 store, whole in self._v1
        self._v1 = template
        self._view: Manifest | None = None
        self._units: set[int] | None = None
        try:
            self._start(self._open(template, overwrite))
        except StoreError:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise StoreWriteError(
                f"opening {self.location} for writing failed ({type(e).__name__}: {e}); nothing was changed: fix "
                "the cause (reachability, permissions) and re-run the same command"
            ) from e
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ setup

    def _open(self, template: Manifest, overwrite: bool) -> Manifest:
        loc = self.location
        entries = loc.root_entries()
        if loc.root_exists() and not loc.is_dir_root():
            raise StoreExistsError(f"{loc} exists and is a file, not a store; choose another output path")
        if entries and "manifest.json" not in entries:
            if set(entries) <= {".staging", ".lock", "shards", "records", ".ranks"} and not loc.list_shard_entries():
                entries = []  # an interrupted create of our own, before its first manifest
            else:
                raise StoreExistsError(
                    f"{loc} exists and is not a store (no manifest.json; it holds {', '.join(entries[:5])}); "
                    "choose an empty or new output path"
                )
        loc.makedirs()
        self._acquire_lock()
        if entries:
            try:
                existing = read_manifest(loc)
            except NotAStoreError as e:
                if not overwrite:
                    raise StoreExistsError(f"{e}; pass --overwrite to replace it") from e
                existing = None
            if overwrite:
                for name in own_entries(entries):
                    loc.remove(name)
                loc.makedirs()
            elif existing is not None:
                # an "auto" encoding resumes in the store's own (a store from before "delta" stays "plain")
                targets = resolve_targets(template.backend, template.targets, existing.targets)
                template = replace(template, targets=targets)
                diff = differences(existing.provenance_key(), template.provenance_key())
                if diff:
                    raise StoreExistsError(
                        f"{loc} already holds a store labelled with a different configuration "
                        f"(differs in: {', '.join(diff)}); re-run with the same settings to resume it, "
                        "pass --overwrite to start over, or choose another output path"
                    )
                return existing
        targets = resolve_targets(template.backend, template.targets)
        manifest = replace(template, targets=targets, shards=(), complete=False)
        if manifest.format_version == 1:
            self._write_manifest(manifest)
        else:
            RecordLog(loc, [], [], Totals()).write_root(manifest)
        return manifest

    def _start(self, manifest: Manifest) -> None:
        """Keep a version-1 manifest whole; keep a version-2 one as its provenance plus the log of its records."""
        if manifest.format_version == 1:
            self._v1 = manifest
            return
        shards = manifest.shards
        self._log = (
            RecordLog.resume(self.location, shards)
            if isinstance(shards, LazyShards)
            else RecordLog(self.location, [], [], Totals())
        )
        self._v1 = replace(manifest, shards=())

    @property
    def manifest(self) -> Manifest:
        """The committed manifest (version 2: shard records read back from their segments when used)."""
        if self._log is None:
            return self._v1
        if self._view is None:
            self._view = replace(self._v1, shards=self._log.view(self._v1.targets))
        return self._view

    def _acquire_lock(self) -> None:
        """One writing process per store (ranks of one job write their own stores and are merged)."""
        if not self.location.is_local:
            return
        fd = lock_store(self.location, shared=False)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def close(self) -> None:
        """Release the write lock (the store stays as committed)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ commits

    @property
    def committed_units(self) -> set[int]:
        """Units committed so far (built once from the records, then kept up to date: a merge asks per shard)."""
        if self._units is None:
            self._units = {s.unit for s in self.manifest.shards}
        return self._units

    def _commit(self, records: list[ShardRecord], name: str) -> None:
        """List published shards: version 2 appends them to the log and writes one root; version 1 rewrites
        the whole manifest per record."""
        with self._write_errors(name):
            if self._log is None:
                for record in records:
                    self._write_manifest(self._v1.with_shard(record))
                    self._v1 = self._v1.with_shard(record)
            else:
                saved = self._log.state()
                self._view = None
                try:
                    for record in records:
                        self._log.append(record)
                    self._log.flush(self._v1)
                except BaseException:
                    self._log.restore(saved)  # the previous root stands: so must the log that wrote it
                    raise
        if self._units is not None:
            self._units.update(r.unit for r in records)

    def write_shard(self, unit: int, data: ShardData, stats: dict[str, float] | None = None) -> ShardRecord:
        """Write and commit one shard. Returns its manifest record.

        ``data`` holds exact values (log-probs in ``targets.logprob_dtype``); they are encoded here
        (data/codecs.py), and a lossy encoding adds the KL divergence it measured to ``stats``.
        """
        m = self._v1
        name = shard_name(unit)
        if self._log is not None and unit <= self._log.last_unit:
            raise ValueError(
                f"{name}: units are committed in rising order; the last committed is {self._log.last_unit}"
            )
        data.validate(m.task, m.targets, m.vocab_size, name)
        rel = shard_relpath(m.backend, name)
        staging_root = self.location.local(".staging") if self.location.is_local else None
        with self._write_errors(name):
            if staging_root is not None:
                staging_root.mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=staging_root, prefix=f"{name}-") as tmp:
                staged = Path(tmp) / rel.rsplit("/", 1)[-1]
                stored, codec_stats = encode_shard(m.targets, data)
                write_shard(m.backend, staged, stored, {"format": "kd-soft-labels", "shard": name, "unit": unit})
                files = _file_records(staged)
                self.location.publish(staged, rel)
        record = ShardRecord(
            name=name,
            path=rel,
            unit=unit,
            rows=data.rows,
            tokens=data.tokens,
            positions=data.num_positions,
            files=files,
            stats={**(stats or {}), **codec_stats},
            entries=data.num_entries,
            text_bytes=data.text_bytes,
        )
        self._commit([record], name)
        return record

    @contextlib.contextmanager
    def _write_errors(self, name: str) -> Iterator[None]:
        """Turn an OSError while writing (disk full, a remote error) into a StoreWriteError that says what to do."""
        try:
            yield
        except StoreError:
            raise
        except OSError as e:
            raise StoreWriteError(
                f"writing {name} to {self.location} failed ({type(e).__name__}: {e}); the {len(self.manifest.shards)} "
                "shards committed before it are intact and the manifest is valid: fix the cause (free space, "
                "reachability) and re-run the same command to resume"
            ) from e

    def adopt_shard(self, source: Location, record: ShardRecord, *, move: bool = False) -> ShardRecord:
        """Commit one shard of another store; see :meth:`adopt_shards`."""
        self.adopt_shards([(source, record)], move=move)
        return record

    def adopt_shards(self, items: Sequence[tuple[Location, ShardRecord]], *, move: bool = False) -> None:
        """Commit shards of other stores (each with the store it comes from) under the same names and units, in
        rising unit order.

        Each shard's files are hashed once: moved local files at the source before the move (a rename keeps
        them), copied or downloaded ones in staging, after the copy (what is checked is what gets published).
        Version 2 commits once per ``SEGMENT_SHARDS`` shards and once at the end, so that merging n shards
        writes O(n / SEGMENT_SHARDS) roots. A moved shard whose commit was cut short by a crash is found at its
        destination on the next run and adopted there, after its checksums are checked.

        Raises:
            CorruptShardError: a file does not match the record's size or SHA-256.
        """
        batch: list[ShardRecord] = []
        for source, record in items:
            self._adopt_files(source, record, move)
            batch.append(record)
            if self._log is None or len(batch) >= SEGMENT_SHARDS:
                self._commit(batch, record.name)
                batch = []
        if batch:
            self._commit(batch, batch[-1].name)

    def _adopt_files(self, source: Location, record: ShardRecord, move: bool) -> None:
        m = self._v1
        if record.path != shard_relpath(m.backend, record.name):
            raise ValueError(f"{record.name}: path {record.path} does not follow the {m.backend} layout")
        files = shard_files(m.backend, record)
        if (
            source.is_local
            and move
            and self.location.is_local
            and not source.local(record.path).exists()
            and self.location.local(record.path).exists()
        ):
            check_files(self.location, record.name, files, verify=True)  # moved by a merge that then crashed
            return
        staging_root = self.location.local(".staging") if self.location.is_local else None
        if staging_root is not None:
            staging_root.mkdir(exist_ok=True)
        with (
            self._write_errors(record.name),
            tempfile.TemporaryDirectory(dir=staging_root, prefix=f"{record.name}-") as tmp,
        ):
            staged = Path(tmp) / record.path.rsplit("/", 1)[-1]
            if source.is_local and move:
                check_files(source, record.name, files, verify=True)
                os.replace(source.local(record.path), staged)
            else:
                check_files(source, record.name, files, verify=False)  # sizes: fail before copying a wrong file
                if source.is_local:
                    src = source.local(record.path)
                    shutil.copytree(src, staged) if src.is_dir() else shutil.copy2(src, staged)
                else:
                    for rel in files:
                        source.download(rel, Path(tmp) / rel.removeprefix("shards/"))
                if _file_records(staged) != record.files:
                    raise CorruptShardError(f"{record.name}: a file does not match its SHA-256 in {source}")
            self.location.publish(staged, record.path)

    def finish(self, dataset: dict[str, Any] | None = None) -> Manifest:
        """Mark the store complete and end the writing. Readers refuse an incomplete store unless asked to read
        one. A finished store keeps no ``.lock``: the next writer (say, ``--overwrite``) may start at once.

        Args:
            dataset: entries to add to the manifest's ``dataset`` provenance in the same commit, for what is known
                only at the end (a streamed input's record and unit counts).
        """
        if dataset:
            self._v1 = replace(self._v1, dataset={**self._v1.dataset, **dataset})
            self._view = None
        with self._write_errors("manifest.json"):
            if self._log is None:
                self._write_manifest(replace(self._v1, complete=True))
            else:
                self._log.write_root(replace(self._v1, complete=True))
                self._log.sweep()  # superseded segments and a crashed run's leftovers
        self._v1 = replace(self._v1, complete=True)
        self._view = None
        if self.location.is_local:
            self.location.remove(".staging")
            if self._lock_fd is not None:  # a finished store keeps no lock file; we hold the lock as we unlink it
                self.location.local(".lock").unlink(missing_ok=True)
        return self.manifest

    def _write_manifest(self, manifest: Manifest) -> None:
        text = json.dumps(manifest.to_dict(), indent=1, sort_keys=False) + "\n"
        self.location.write_atomic("manifest.json", text.encode())


def _file_records(staged: Path) -> dict[str, FileRecord]:
    """Size and SHA-256 of every file of a staged shard, keyed by path relative to the shard."""
    if staged.is_file():
        return {staged.name: _record(staged)}
    return {p.relative_to(staged).as_posix(): _record(p) for p in sorted(staged.rglob("*")) if p.is_file()}


def _record(path: Path) -> FileRecord:
    return FileRecord(bytes=path.stat().st_size, sha256=sha256_file(path))


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields where two nested dicts differ."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def lock_store(location: Location, *, shared: bool) -> int:
    """Take the ``.lock`` of a local store without waiting: exclusive for a writer, shared by the ranks of one
    torchrun job. Returns the open descriptor that holds it (close it to release).

    A finished store's lock file is unlinked by its holder, so a process that opened the old file may lock a
    file no longer in the store: the lock counts only if the path still names the file we locked; else retry.

    Raises:
        StoreLockedError: another process holds the lock.
    """
    import fcntl

    path = location.local(".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{location} is being written by another process; wait for it to finish or stop it"
            ) from None
        try:
            same = path.stat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
