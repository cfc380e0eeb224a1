"""Typed errors of the store.

Every error names what was expected, what was found and what to do. Each also subclasses the matching
builtin (as zarr does: ``StoreNotFoundError(StoreError, FileNotFoundError)``) so callers that only know the
builtins still catch them. The CLI turns any ``StoreError`` into a one-line message and exit code 1.
"""

from __future__ import annotations

__all__ = [
    "CorruptShardError",
    "IncompatibleStoreError",
    "IncompleteStoreError",
    "ManifestError",
    "NotAStoreError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreReadError",
    "StoreWriteError",
    "UnsupportedFormatError",
]


class StoreError(Exception):
    """Base class of every error raised about a soft-label store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path or URL holds nothing at all."""


class NotAStoreError(StoreError, ValueError):
    """Something exists at the path, but it is not a soft-label store (no valid ``manifest.json``)."""


class StoreExistsError(StoreError, FileExistsError):
    """A writer was asked to create a store where one (or something else) already exists."""


class StoreLockedError(StoreError, BlockingIOError):
    """Another process holds the store's write lock."""


class ManifestError(StoreError, ValueError):
    """The manifest is malformed or untrustworthy (bad types, sizes, dtypes, or paths leaving the store)."""


class UnsupportedFormatError(StoreError, ValueError):
    """The store was written in a format version this code cannot read."""


class IncompleteStoreError(StoreError, RuntimeError):
    """The store's labeling run has not finished (its manifest is not marked complete)."""


class CorruptShardError(StoreError, OSError):
    """A shard's files do not match the sizes, checksums or shapes recorded in the manifest."""


class IncompatibleStoreError(StoreError, ValueError):
    """The store cannot be used with the given student (vocabulary, tokenizer, task or temperature)."""


class StoreReadError(StoreError, OSError):
    """Reading the store failed (an unreachable server, a local I/O error); the store itself is unchanged."""


class StoreWriteError(StoreError, OSError):
    """Writing to the store failed (disk full, a remote write error); committed shards and the manifest are intact."""
