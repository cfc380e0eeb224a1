"""Export a store to one Parquet or Arrow IPC file, for teams on other stacks (HF datasets, polars, DuckDB).

    summary = export_store("stores/pydoc-top32", to="parquet", out="pydoc-top32.parquet")
    # or an fsspec URL: export_store("s3://bucket/store", to="arrow", out="store.arrow")

    import pyarrow.parquet as pq; pq.read_table("pydoc-top32.parquet")
    import polars as pl; pl.read_parquet("pydoc-top32.parquet")
    duckdb.sql("SELECT * FROM 'pydoc-top32.parquet'")
    datasets.Dataset.from_parquet("pydoc-top32.parquet")

The output is a single file: one row per example, in store order, one row group (Parquet) or record batch
(Arrow IPC file format) per shard, so the export streams shard by shard and never holds the whole store in
memory. It is written to a temporary name beside ``out``, fsynced and renamed: ``out`` is either absent or
complete. Columns (K kept ids per position, P positions and L tokens in the row; ids are uint16 or uint32 as
in the store):

======================  ====================================================  =====================================
column                  type                                                  meaning
======================  ====================================================  =====================================
``key``                 ``fixed_size_binary(16)``                             content key (BLAKE2b-128 of the ids)
``input_ids``           ``list<uint16|uint32>`` (L)                           the tokens the teacher saw
``target_ids``          ``list<fixed_size_list<uint16|uint32>[K]>`` (P, K)    kept ids, most probable first
``target_logprobs``     ``list<fixed_size_list<float16|float32>[K]>`` (P, K)  log-probs at T over the full vocabulary
``tail_mass``           ``list<float32>`` (P)                                 1 - kept mass
``label``               ``int64`` (seq-cls) or ``list<uint16|uint32>`` (P)    hard labels (seq-cls: -1 = none)
``positions``           ``list<int32>`` (P)                                   masked-lm: index of each position
======================  ====================================================  =====================================

Sampled stores (``targets.method == "sample"``) have no ``target_logprobs`` and ``tail_mass``; their
``target_ids`` is ``list<list<uint16|uint32>>`` (P lists of that position's unique ids drawn, ascending) and
``target_counts`` ``list<list<uint8|uint16>>`` beside it (how often each was drawn; each list sums to
``targets.num_samples``). Hybrid stores (``targets.method == "hybrid"``) have every top-k column, plus
``tail_ids`` ``list<list<uint16|uint32>>`` (P lists of the unique ids drawn from that position's tail, ascending)
and ``tail_counts`` ``list<list<uint8|uint16>>`` (each list sums to ``targets.num_samples``, or is empty where
``tail_mass`` is 0).

``target_logprobs`` holds the *decoded* values, exactly what ``data.open_store`` returns: float16 for float16
stores (Parquet stores float16 as its FLOAT16 logical type, which pyarrow >= 15 writes and reads), float32 for
float32 and q8 stores. Causal-LM labels are not exported: position i's label is ``input_ids[i + 1]``.

Stores labelled with ``--spans`` add ``text`` (``string``: the example's source text, its UTF-8 bytes as stored)
and ``token_spans`` (``list<fixed_size_list<int32>[2]>`` (L, 2): each input token's byte range ``[start, end)`` in
the text), and put the teacher's strings (the store's ``tokens.json``, byte for byte, so that its SHA-256 in the
embedded manifest still matches) in the schema metadata under ``"kd-token-strings"``.
The store's manifest (all of its provenance) is embedded as JSON in the schema metadata under the key
``"kd-soft-labels"``, with an added ``"export"`` object that says what the file holds (its ``targets.encoding``
describes the source store's files, not this export's values).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import CorruptShardError, StoreExistsError
from .location import is_url
from .manifest import FORMAT_NAME, Manifest
from .reader import StoreReader, open_store
from .shard import NDArray, ShardData
from .source_text import has_spans, read_token_strings, token_strings_record

__all__ = ["EXPORT_FORMATS", "TOKEN_STRINGS_KEY", "export_schema", "export_store"]

TOKEN_STRINGS_KEY = "kd-token-strings"
"""Schema metadata key of an export of a store with spans: the store's ``tokens.json``."""

EXPORT_FORMATS = ("parquet", "arrow")
# Per-row lists use 32-bit offsets (``list``, not ``large_list``): the type every reader supports; a shard's axis
# stays far below 2**31 entries.
_MAX_LIST_ENTRIES = (1 << 31) - 1


def export_store(
    store: str | os.PathLike[str],
    to: Literal["parquet", "arrow"],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    compression: str | None = "zstd",
    allow_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write every example of ``store`` to the single local file ``out`` (see the module docstring).

    Args:
        store: a store path or fsspec URL; read through :func:`data.open_store`, so every shard is checked.
        to: "parquet" or "arrow" (an Arrow IPC file, the format of the arrow backend's shards).
        out: the local file to write.
        overwrite: replace an existing ``out`` (atomically); otherwise an existing ``out`` is refused.
        compression: Parquet column / Arrow IPC buffer compression ("zstd", "lz4", or None; an uncompressed
            Arrow file can be memory-mapped without a copy).
        allow_incomplete: export the shards committed so far by an unfinished labeling run.
        storage_options, cache_dir: as for :func:`data.open_store`.

    Returns:
        ``{"path", "format", "rows", "tokens", "positions", "shards", "files", "bytes"}``: the file written, its
        format, what it holds, the number of files (1) and its size in bytes.

    Raises:
        ValueError: ``to`` is not a known format, or ``out`` is a URL.
        StoreExistsError: ``out`` exists and ``overwrite`` is False.
        StoreError: the store cannot be read (as :func:`data.open_store` and its reads raise).
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    if is_url(os.fspath(out)):
        raise ValueError(f"export writes a local file; got the URL {os.fspath(out)!r} (export, then upload it)")
    target = Path(os.fspath(out).removeprefix("file://")).expanduser()
    if target.exists() and not overwrite:
        raise StoreExistsError(f"{target} already exists; pass overwrite=True to replace it or choose another path")
    reader = open_store(store, allow_incomplete=allow_incomplete, storage_options=storage_options, cache_dir=cache_dir)
    schema = export_schema(reader.manifest, source=str(reader.location))
    if has_spans(reader.manifest):  # checked against its SHA-256 in the manifest, then written as recorded
        body, _ = token_strings_record(read_token_strings(reader.location, reader.manifest))
        schema = schema.with_metadata({**schema.metadata, TOKEN_STRINGS_KEY.encode(): body})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write(reader, schema, to, tmp, compression)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    m = reader.manifest
    return {
        "path": str(target),
        "format": to,
        "rows": m.rows,
        "tokens": m.tokens,
        "positions": m.positions,
        "shards": len(m.shards),
        "files": 1,
        "bytes": target.stat().st_size,
    }


def export_schema(manifest: Manifest, source: str = "") -> Any:
    """The ``pyarrow.Schema`` of an export of a store with this manifest (metadata included)."""
    import pyarrow as pa

    t = manifest.targets
    ids = pa.from_numpy_dtype(np.dtype(t.id_dtype))
    fields = [pa.field("key", pa.binary(16), nullable=False), pa.field("input_ids", pa.list_(ids), nullable=False)]
    if t.sampled:  # ragged per position: the unique ids drawn (ascending) and how often each was drawn
        counts = pa.from_numpy_dtype(np.dtype(t.count_dtype))
        fields.append(pa.field("target_ids", pa.list_(pa.list_(ids)), nullable=False))
        fields.append(pa.field("target_counts", pa.list_(pa.list_(counts)), nullable=False))
    else:
        lp = pa.from_numpy_dtype(np.dtype(t.logprob_dtype))
        fields.append(pa.field("target_ids", pa.list_(pa.list_(ids, t.k)), nullable=False))
        fields.append(pa.field("target_logprobs", pa.list_(pa.list_(lp, t.k)), nullable=False))
        fields.append(pa.field("tail_mass", pa.list_(pa.float32()), nullable=False))
    if t.hybrid:  # ragged per position, as a sampled store's targets: the tail's unique ids drawn and their counts
        counts = pa.from_numpy_dtype(np.dtype(t.count_dtype))
        fields.append(pa.field("tail_ids", pa.list_(pa.list_(ids)), nullable=False))
        fields.append(pa.field("tail_counts", pa.list_(pa.list_(counts)), nullable=False))
    if manifest.task == "seq-cls":
        fields.append(pa.field("label", pa.int64(), nullable=False))  # -1: no label
    elif manifest.task == "masked-lm":
        fields.append(pa.field("label", pa.list_(ids), nullable=False))
        fields.append(pa.field("positions", pa.list_(pa.int32()), nullable=False))
    if has_spans(manifest):
        fields.append(pa.field("text", pa.string(), nullable=False))
        fields.append(pa.field("token_spans", pa.list_(pa.list_(pa.int32(), 2)), nullable=False))
    about = {
        "source": source,
        "targets": f"{t.num_samples} draws per position at T={t.temperature:g}: unique ids drawn, their counts"
        if t.sampled
        else f"decoded log-probabilities in {t.logprob_dtype} (targets.encoding describes the source store's "
        "files, not this export)"
        + (f"; tail_ids/tail_counts: {t.num_samples} draws from the tail per position" if t.hybrid else ""),
        "label": "causal-lm: not exported; position i's label is input_ids[i + 1]"
        if manifest.task == "causal-lm"
        else "as stored",
    }
    meta = {**manifest.to_dict(), "export": about}
    return pa.schema(fields, metadata={FORMAT_NAME: json.dumps(meta)})


def _write(reader: StoreReader, schema: Any, to: str, path: Path, compression: str | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if to == "parquet":
        writer: Any = pq.ParquetWriter(str(path), schema, compression=compression or "none")
    else:
        writer = pa.ipc.new_file(str(path), schema, options=pa.ipc.IpcWriteOptions(compression=compression))
    with writer:
        for s in range(reader.num_shards):
            data = reader.shard(s)
            if data.rows:
                batch = _batch(data, schema)
                writer.write_table(pa.Table.from_batches([batch])) if to == "parquet" else writer.write_batch(batch)


def _batch(data: ShardData, schema: Any) -> Any:
    """One shard as a record batch of the export schema: the flat columns wrapped in per-row lists."""
    import pyarrow as pa

    def rows(values: NDArray, offsets: NDArray) -> Any:
        if int(offsets[-1]) > _MAX_LIST_ENTRIES:
            raise ValueError(f"a shard with {int(offsets[-1])} entries is too large for list<> columns")
        flat: Any = pa.array(values.reshape(-1))
        if values.ndim == 2:
            flat = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)

    to, po = data.token_offsets, data.position_offsets
    cols: dict[str, Any] = {
        "key": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), data.rows, [None, pa.py_buffer(np.ascontiguousarray(data.keys).tobytes())]
        ),
        "input_ids": rows(data.input_ids, to),
    }
    if data.target_offsets is not None and data.target_counts is not None:  # sampled: lists of per-position lists
        inner, outer = data.target_offsets, pa.array(po.astype(np.int32))
        cols["target_ids"] = pa.ListArray.from_arrays(outer, rows(data.target_ids, inner))
        cols["target_counts"] = pa.ListArray.from_arrays(outer, rows(data.target_counts, inner))
    else:
        assert data.target_logprobs is not None  # top-k: (P, K) columns
        cols["target_ids"] = rows(data.target_ids, po)
        cols["target_logprobs"] = rows(data.target_logprobs, po)
        cols["tail_mass"] = rows(data.tail_mass, po)
    if data.tail_offsets is not None and data.tail_ids is not None and data.tail_counts is not None:  # hybrid
        inner, outer = data.tail_offsets, pa.array(po.astype(np.int32))
        cols["tail_ids"] = pa.ListArray.from_arrays(outer, rows(data.tail_ids, inner))
        cols["tail_counts"] = pa.ListArray.from_arrays(outer, rows(data.tail_counts, inner))
    if "positions" in schema.names:
        assert data.positions is not None and data.labels is not None  # checked against the task by the reader
        cols["positions"] = rows(data.positions, po)
        cols["label"] = rows(data.labels, po)
    elif "label" in schema.names:  # seq-cls: a shard written without labels has none (-1)
        labels = data.labels if data.labels is not None else np.full(data.rows, -1, dtype=np.int64)
        cols["label"] = pa.array(labels, pa.int64())
    if "text" in schema.names:
        assert data.text is not None and data.text_offsets is not None and data.token_spans is not None
        if int(data.text_offsets[-1]) > _MAX_LIST_ENTRIES:
            raise ValueError(f"a shard with {int(data.text_offsets[-1])} bytes of text is too large for string columns")
        text = pa.StringArray.from_buffers(
            data.rows, pa.py_buffer(data.text_offsets.astype(np.int32)), pa.py_buffer(data.text.tobytes())
        )
        try:
            text.validate(full=True)  # the stored bytes are UTF-8 (a corrupt shard's need not be)
        except pa.ArrowInvalid as e:
            raise CorruptShardError(f"a shard's source text is not valid UTF-8 ({e}); it cannot be exported") from None
        cols["text"] = text
        cols["token_spans"] = rows(data.token_spans, to)
    return pa.RecordBatch.from_arrays([cols[name] for name in schema.names], schema=schema)
