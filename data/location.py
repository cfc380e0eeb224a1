"""Where a store lives: a local directory, or any fsspec URL (s3://, gs://, memory://, ...).

Local commits use temp-then-rename, which is atomic on POSIX filesystems. Object stores have no atomic
rename (it is copy + delete), so there a shard's objects are written once under their final names and the
manifest, a single object, is replaced by one PUT (atomic per object): readers see the old or the new
manifest, never a mix, and never a shard the manifest does not list. The writer's lock is local-only: two
processes writing one remote store are not stopped, so remote writers must be coordinated by the job (one
writer per store, or ``--num-shards`` parts merged at the end).

fsspec's own configuration reaches every URL: ``FSSPEC_S3_ENDPOINT_URL=http://host:port`` (read by fsspec
when it is imported; or the botocore variables ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``) points s3://
URLs at an S3-compatible server, ``storage_options={"endpoint_url": ...}`` (or ``{"client_kwargs":
{"endpoint_url": ...}}``) does the same from Python. A failing remote call (an unreachable server, a refused
request) surfaces as an ``OSError`` that names the object and the operation, so that the writer and the reader
can turn it into their typed errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Location", "sha256_file"]


def sha256_file(path: Path) -> str:
    """SHA-256 of a local file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_url(path_or_url: str) -> bool:
    return "://" in path_or_url and not path_or_url.startswith("file://")


class Location:
    """A store root. Relative paths use '/' and never leave the root (the manifest parser guarantees it).

    Args:
        path_or_url: a local path, ``file://`` URL, or an fsspec URL.
        storage_options: passed to fsspec for URLs (credentials, ``endpoint_url``, ...).
    """

    def __init__(self, path_or_url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        text = os.fspath(path_or_url)
        self.url = text
        self.is_local = not is_url(text)
        if self.is_local:
            self.root = Path(text.removeprefix("file://")).expanduser()
            self.fs: Any = None
            self._rpath = ""
        else:
            import fsspec

            self.fs, self._rpath = fsspec.core.url_to_fs(text, **(storage_options or {}))
            self._rpath = self._rpath.rstrip("/")
            self.root = Path()

    def __str__(self) -> str:
        return self.url

    def local(self, rel: str) -> Path:
        """The local path of ``rel`` (local stores only)."""
        assert self.is_local
        return self.root / rel

    def _remote(self, rel: str) -> str:
        return f"{self._rpath}/{rel}" if rel else self._rpath

    @contextlib.contextmanager
    def _io(self, what: str, rel: str = "") -> Iterator[None]:
        """Turn an fsspec backend's own exceptions (botocore's EndpointConnectionError is no OSError) into one."""
        try:
            yield
        except OSError:
            raise
        except Exception as e:
            where = f"{self.url.rstrip('/')}/{rel}" if rel else self.url
            raise OSError(f"{what} {where} failed ({type(e).__name__}: {e})") from e

    def resolves_inside(self, rel: str) -> bool:
        """Whether a local ``rel``, with every symlink followed, stays inside the root (remote paths always do)."""
        if not self.is_local:
            return True
        return self.local(rel).resolve().is_relative_to(self.root.resolve())

    # ------------------------------------------------------------ queries

    def root_exists(self) -> bool:
        if self.is_local:
            return self.root.exists()
        with self._io("checking"):
            return bool(self.fs.exists(self._rpath))

    def root_entries(self) -> list[str]:
        """Names directly under the root (empty if it does not exist)."""
        if self.is_local:
            return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        return self._list("")

    def _list(self, rel: str) -> list[str]:
        with self._io("listing", rel):
            if not self.fs.exists(self._remote(rel)):
                return []
            # refresh: another process (a labeler, a merge) may have changed the store since fsspec last listed it
            paths = self.fs.ls(self._remote(rel), detail=False, refresh=True)
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths)

    def is_dir_root(self) -> bool:
        if self.is_local:
            return self.root.is_dir()
        with self._io("checking"):
            return bool(self.fs.isdir(self._rpath))

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return self.local(rel).exists()
        with self._io("checking", rel):
            return bool(self.fs.exists(self._remote(rel)))

    def size(self, rel: str) -> int | None:
        """Size in bytes of a file, or None if it does not exist (or is not a file)."""
        if self.is_local:
            p = self.local(rel)
            return p.stat().st_size if p.is_file() else None
        try:
            with self._io("checking", rel):
                info = self.fs.info(self._remote(rel))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def list_shard_entries(self) -> list[str]:
        """Names directly under ``shards/`` (used by verify to find shards the manifest does not list)."""
        if self.is_local:
            d = self.local("shards")
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        return self._list("shards")

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            return self.local(rel).read_bytes()
        with self._io("reading", rel):
            data: bytes = self.fs.cat_file(self._remote(rel))
        return data

    def sha256(self, rel: str) -> str:
        """SHA-256 of a file, streamed (a remote file is read once, without a local copy)."""
        if self.is_local:
            return sha256_file(self.local(rel))
        with self._io("reading", rel), self.fs.open(self._remote(rel), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    # ------------------------------------------------------------ writes

    def makedirs(self) -> None:
        if self.is_local:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "shards").mkdir(exist_ok=True)
        else:
            with self._io("creating"):
                self.fs.makedirs(self._rpath, exist_ok=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace a small file atomically (temp + fsync + rename locally; a single PUT remotely)."""
        if not self.is_local:
            with self._io("writing", rel):
                self.fs.pipe_file(self._remote(rel), data)
            return
        target = self.local(rel)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def publish(self, staged: Path, rel: str) -> None:
        """Move a fully written local file or directory to ``rel``, replacing any leftover of a crashed run."""
        if self.is_local:
            target = self.local(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.remove(rel)
            os.replace(staged, target)
            _fsync_dir(target.parent)
            return
        # Remote: no rename. A leftover of a crashed run (never listed in the manifest) is deleted, then every file
        # is PUT once under its final name; the caller lists the shard in the manifest only after all succeeded.
        self.remove(rel)
        if staged.is_dir():
            for f in sorted(p for p in staged.rglob("*") if p.is_file()):
                sub = f"{rel}/{f.relative_to(staged).as_posix()}"
                with self._io("uploading", sub):
                    self.fs.put_file(str(f), self._remote(sub))
        else:
            with self._io("uploading", rel):
                self.fs.put_file(str(staged), self._remote(rel))
        shutil.rmtree(staged) if staged.is_dir() else staged.unlink()

    def remove(self, rel: str) -> None:
        """Delete a file or directory tree if it exists."""
        if self.is_local:
            p = self.local(rel)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        elif self.exists(rel):
            with self._io("deleting", rel):
                self.fs.rm(self._remote(rel), recursive=True)

    def download(self, rel: str, dest: Path) -> None:
        """Copy a remote file to a local path."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._io("downloading", rel):
            self.fs.get_file(self._remote(rel), str(dest))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
