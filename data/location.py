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
can turn it into their typed errors. A *transient* failure (a timeout, a dropped connection, a 5xx or throttling
reply) is first retried with jittered exponential backoff, ``RETRY_ATTEMPTS`` tries in all; a permanent one (a
missing object, a refused permission, any other 4xx) is never retried.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["RETRY_ATTEMPTS", "RETRY_BASE_S", "Location", "is_transient", "sha256_file"]

T = TypeVar("T")

# 5 tries, 0.2 s doubling (x0.5-1.5 jitter): ~3 s of waiting in all, enough for a throttled or restarting
# endpoint, short enough that a dead one still ends the run promptly with its one-line error.
RETRY_ATTEMPTS = 5
RETRY_BASE_S = 0.2
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequests",
}
_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.EAGAIN,
    errno.EBUSY,
}
# botocore's EndpointConnectionError / ReadTimeoutError / ConnectionClosedError, aiohttp's ServerDisconnectedError,
# ClientConnectorError, ClientPayloadError: none of them is a builtin ConnectionError
_TRANSIENT_NAMES = re.compile(r"Connection|Timeout|ServerDisconnected|ClientPayload|ClientOSError")


def is_transient(error: BaseException) -> bool:
    """Whether a failed remote call may succeed if repeated: looks through the chain of causes (s3fs turns a
    botocore ClientError into an OSError caused by it) for a timeout, a lost connection, a 5xx or throttling reply,
    and stops at the first sign of a permanent error (missing object, permission, any other 4xx)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(
            e, FileNotFoundError | PermissionError | FileExistsError | IsADirectoryError | NotADirectoryError
        ):
            return False
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
                return True
            if (isinstance(status, int) and 400 <= status < 500) or code:
                return False
        if _TRANSIENT_NAMES.search(type(e).__name__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


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

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """Run one remote operation, retrying transient failures with jittered exponential backoff; the last
        failure (or the first permanent one) is raised as an OSError naming the operation and the object."""
        delay = RETRY_BASE_S
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                with self._io(what, rel):
                    return fn()
            except OSError as e:
                if attempt == RETRY_ATTEMPTS or not is_transient(e):
                    raise
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay *= 2
        raise AssertionError("unreachable")

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
        return bool(self._call("checking", "", lambda: self.fs.exists(self._rpath)))

    def root_entries(self) -> list[str]:
        """Names directly under the root (empty if it does not exist)."""
        if self.is_local:
            return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        return self._list("")

    def _list(self, rel: str) -> list[str]:
        def ls() -> list[str]:
            if not self.fs.exists(self._remote(rel)):
                return []
            # refresh: another process (a labeler, a merge) may have changed the store since fsspec last listed it
            return list(self.fs.ls(self._remote(rel), detail=False, refresh=True))

        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._call("listing", rel, ls))

    def is_dir_root(self) -> bool:
        if self.is_local:
            return self.root.is_dir()
        return bool(self._call("checking", "", lambda: self.fs.isdir(self._rpath)))

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return self.local(rel).exists()
        return bool(self._call("checking", rel, lambda: self.fs.exists(self._remote(rel))))

    def size(self, rel: str) -> int | None:
        """Size in bytes of a file, or None if it does not exist (or is not a file)."""
        if self.is_local:
            p = self.local(rel)
            return p.stat().st_size if p.is_file() else None
        try:
            info = self._call("checking", rel, lambda: self.fs.info(self._remote(rel)))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def list_shard_entries(self) -> list[str]:
        """Names directly under ``shards/`` (used by verify to find shards the manifest does not list)."""
        return self.list_entries("shards")

    def list_entries(self, rel: str) -> list[str]:
        """Names directly under the folder ``rel`` (empty if it does not exist)."""
        if self.is_local:
            d = self.local(rel)
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        return self._list(rel)

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            return self.local(rel).read_bytes()
        data: bytes = self._call("reading", rel, lambda: self.fs.cat_file(self._remote(rel)))
        return data

    def sha256(self, rel: str) -> str:
        """SHA-256 of a file, streamed (a remote file is read once, without a local copy)."""
        if self.is_local:
            return sha256_file(self.local(rel))

        def digest() -> str:
            with self.fs.open(self._remote(rel), "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()

        return self._call("reading", rel, digest)

    # ------------------------------------------------------------ writes

    def makedirs(self) -> None:
        if self.is_local:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "shards").mkdir(exist_ok=True)
        else:
            self._call("creating", "", lambda: self.fs.makedirs(self._rpath, exist_ok=True))

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace a small file atomically (temp + fsync + rename locally; a single PUT remotely)."""
        if not self.is_local:
            self._call("writing", rel, lambda: self.fs.pipe_file(self._remote(rel), data))
            return
        target = self.local(rel)
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def write_once(self, rel: str, data: bytes) -> None:
        """Write a small immutable file (a segment of shard records) under a name no committed root uses yet:
        durably before the root that will name it (temp + fsync + rename locally; one PUT remotely)."""
        self.write_atomic(rel, data)

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
                self._call("uploading", sub, lambda f=f, sub=sub: self.fs.put_file(str(f), self._remote(sub)))  # type: ignore[misc]
        else:
            self._call("uploading", rel, lambda: self.fs.put_file(str(staged), self._remote(rel)))
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
            with contextlib.suppress(FileNotFoundError):  # a retried delete may find it gone
                self._call("deleting", rel, lambda: self.fs.rm(self._remote(rel), recursive=True))

    def download(self, rel: str, dest: Path) -> None:
        """Copy a remote file to a local path."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call("downloading", rel, lambda: self.fs.get_file(self._remote(rel), str(dest)))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
