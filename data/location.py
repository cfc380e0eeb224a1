"""Where a store lives: a local directory, or any fsspec URL (s3://, gs://, memory://, ...).

Local commits use temp-then-rename, which is atomic on POSIX filesystems. Object stores have no atomic
rename (it is copy + delete), so there a shard's objects are written once under their final names and the
manifest, a single object, is replaced by one PUT (atomic per object): readers see the old or the new
manifest, never a mix, and never a shard the manifest does not list.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Location", "sha256_file"]

_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """SHA-256 of a local file, streamed in 4 MiB reads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


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

    # ------------------------------------------------------------ queries

    def root_exists(self) -> bool:
        return self.root.exists() if self.is_local else bool(self.fs.exists(self._rpath))

    def root_entries(self) -> list[str]:
        """Names directly under the root (empty if it does not exist)."""
        if self.is_local:
            return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        if not self.fs.exists(self._rpath):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._rpath, detail=False))

    def is_dir_root(self) -> bool:
        return self.root.is_dir() if self.is_local else bool(self.fs.isdir(self._rpath))

    def exists(self, rel: str) -> bool:
        return self.local(rel).exists() if self.is_local else bool(self.fs.exists(self._remote(rel)))

    def size(self, rel: str) -> int | None:
        """Size in bytes of a file, or None if it does not exist (or is not a file)."""
        if self.is_local:
            p = self.local(rel)
            return p.stat().st_size if p.is_file() else None
        try:
            info = self.fs.info(self._remote(rel))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def list_shard_entries(self) -> list[str]:
        """Names directly under ``shards/`` (used by verify to find shards the manifest does not list)."""
        if self.is_local:
            d = self.local("shards")
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        if not self.fs.exists(self._remote("shards")):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._remote("shards"), detail=False))

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            return self.local(rel).read_bytes()
        data: bytes = self.fs.cat_file(self._remote(rel))
        return data

    def iter_file(self, rel: str) -> Iterator[bytes]:
        """Stream a file's bytes in 4 MiB blocks (for checksums of remote files without a local copy)."""
        with open(self.local(rel), "rb") if self.is_local else self.fs.open(self._remote(rel), "rb") as f:
            while block := f.read(_CHUNK):
                yield block

    # ------------------------------------------------------------ writes

    def makedirs(self) -> None:
        if self.is_local:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "shards").mkdir(exist_ok=True)
        else:
            self.fs.makedirs(self._rpath, exist_ok=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace a small file atomically (temp + fsync + rename locally; a single PUT remotely)."""
        if not self.is_local:
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
        self.remove(rel)
        if staged.is_dir():
            for f in sorted(p for p in staged.rglob("*") if p.is_file()):
                self.fs.put_file(str(f), self._remote(f"{rel}/{f.relative_to(staged).as_posix()}"))
        else:
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
        elif self.fs.exists(self._remote(rel)):
            self.fs.rm(self._remote(rel), recursive=True)

    def download(self, rel: str, dest: Path) -> None:
        """Copy a remote file to a local path."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._remote(rel), str(dest))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
