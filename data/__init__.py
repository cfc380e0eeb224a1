"""The soft-label store: the on-disk contract between ``pipeline label``, ``pipeline train`` and other teams.

Public API::

    from kd_pipeline import data
    store = data.open_store("path/or/s3://url")
    len(store); store.manifest; store[i]; iter(store)
    data.check_compatible(store.manifest, vocab_size=..., tokenizer_digest=...)
    data.verify_store(path).ok

No model code and no transformers here; torch is imported only by ``data.dataset`` (the streaming loader) and
``data.collate``.
"""

from . import source_text
from .errors import (
    CorruptShardError,
    IncompatibleStoreError,
    IncompleteStoreError,
    ManifestError,
    NotAStoreError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedFormatError,
)
from .manifest import FORMAT_VERSION, Manifest, ShardRecord, TargetSpec, id_dtype_for
from .reader import StoreReader, check_compatible, open_store, read_manifest
from .shard import ShardBuilder, ShardData, example_key
from .verify import VerifyReport, verify_store
from .writer import StoreWriter, shard_name

__all__ = [
    "FORMAT_VERSION",
    "CorruptShardError",
    "IncompatibleStoreError",
    "IncompleteStoreError",
    "Manifest",
    "ManifestError",
    "NotAStoreError",
    "ShardBuilder",
    "ShardData",
    "ShardRecord",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreReader",
    "StoreWriter",
    "TargetSpec",
    "UnsupportedFormatError",
    "VerifyReport",
    "check_compatible",
    "example_key",
    "id_dtype_for",
    "open_store",
    "read_manifest",
    "shard_name",
    "source_text",
    "verify_store",
]
