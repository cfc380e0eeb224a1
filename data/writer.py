"""Writing a store: one shard per work unit, each committed by rewriting the manifest.

    with StoreWriter(path, manifest_template) as w:
        for unit in range(n_units):
            if unit in w.committed_units:   # resume: done by an earlier run
                continue
            w.write_shard(unit, shard_data, stats)
        w.finish()                          # marks the manifest complete

Commit protocol: the shard is written in full into a staging path, checksummed, moved to its final name,
and only then listed in ``manifest.json``, which is replaced atomically. A crash at any point leaves the
previous manifest valid and every listed shard intact; an unlisted leftover shard is overwritten on resume.

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
from collections.abc import Iterator
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
from .manifest import FileRecord, Manifest, ShardRecord
from .reader import read_manifest
from .shard import ShardData

__all__ = ["StoreWriter", "differences", "shard_name"]

# Entries a store directory may hold besides its shards and manifest (ours, so an --overwrite may remove them).
_OWN_ENTRIES = {"manifest.json", "shards", ".staging", ".lock", ".ranks"}


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
        try:
            self.manifest = self._open(template, overwrite)
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
            if set(entries) <= {".staging", ".lock", "shards", ".ranks"} and not loc.list_shard_entries():
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
                for name in sorted(set(entries) & _OWN_ENTRIES - {".lock"}):
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
        self._write_manifest(manifest)
        return manifest

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
        return {s.unit for s in self.manifest.shards}

    def write_shard(self, unit: int, data: ShardData, stats: dict[str, float] | None = None) -> ShardRecord:
        """Write and commit one shard. Returns its manifest record.

        ``data`` holds exact values (log-probs in ``targets.logprob_dtype``); they are encoded here
        (data/codecs.py), and a lossy encoding adds the KL divergence it measured to ``stats``.
        """
        m = self.manifest
        name = shard_name(unit)
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
        )
        with self._write_errors(name):
            self._write_manifest(m.with_shard(record))
        self.manifest = m.with_shard(record)
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
        """Commit a shard of another store (already checked by the caller) under the same name and unit.

        Local to local, the files are copied (or moved) into staging and published like a new shard; any other
        combination downloads them through a local staging folder.
        """
        m = self.manifest
        if record.path != shard_relpath(m.backend, record.name):
            raise ValueError(f"{record.name}: path {record.path} does not follow the {m.backend} layout")
        staging_root = self.location.local(".staging") if self.location.is_local else None
        if staging_root is not None:
            staging_root.mkdir(exist_ok=True)
        with (
            self._write_errors(record.name),
            tempfile.TemporaryDirectory(dir=staging_root, prefix=f"{record.name}-") as tmp,
        ):
            staged = Path(tmp) / record.path.rsplit("/", 1)[-1]
            if source.is_local and move:
                os.replace(source.local(record.path), staged)
            elif source.is_local:
                src = source.local(record.path)
                shutil.copytree(src, staged) if src.is_dir() else shutil.copy2(src, staged)
            else:
                for rel in shard_files(m.backend, record):
                    source.download(rel, Path(tmp) / rel.removeprefix("shards/"))
            if _file_records(staged) != record.files:
                raise CorruptShardError(f"{record.name}: files changed while being merged")
            self.location.publish(staged, record.path)
        with self._write_errors(record.name):
            self._write_manifest(m.with_shard(record))
        self.manifest = m.with_shard(record)
        return record

    def finish(self) -> Manifest:
        """Mark the store complete and end the writing. Readers refuse an incomplete store unless asked to read
        one. A finished store keeps no ``.lock``: the next writer (say, ``--overwrite``) may start at once."""
        with self._write_errors("manifest.json"):
            self._write_manifest(replace(self.manifest, complete=True))
        self.manifest = replace(self.manifest, complete=True)
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
