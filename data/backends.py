"""The two on-disk shard encodings: Zarr v3 (the default) and Arrow IPC (interchange).

Both write one shard, in full, into a local staging path, once: no append, no resize, no partial chunk
writes, so there is never a read-modify-write that a second writer could race (one writer per shard).

Zarr: a shard is a Zarr v3 group; each column is one array stored with the sharding codec, so each column is
a single object on disk (cheap to checksum, to upload, and to list) that still holds inner chunks a reader
can fetch alone. Each column's codecs are chosen in ``data.codecs.zarr_codecs`` (zstd for ids; k-major
transpose + byte-shuffled blosc/zstd for the delta-coded log-probs) and are all Zarr v3 codecs recorded in the
array's ``zarr.json``; the log-prob column's encoding itself is recorded in the manifest (``targets.encoding``).

Arrow: a shard is one IPC file with one row per example and list columns (``input_ids: large_list<uint16>``,
``target_ids: large_list<fixed_size_list<uint16>[K]>``, ...), readable by pyarrow, polars, DuckDB and HF
datasets without this code. Buffers are zstd-compressed by default; such a file cannot be memory-mapped
without a copy (write with ``compression=None`` for zero-copy memory-mapping).

Reading untrusted bytes: given the columns the manifest's counts imply (:func:`stored_columns`), a reader checks
each zarr array's ``zarr.json`` (data type, shape, chunk shapes, and that every codec is one of the standard
Zarr v3 codecs the writer uses: never pickle or an object dtype) and an arrow file's schema before any chunk or
record batch is decoded, so a shard that declares more data than the manifest promises is refused before it is
allocated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .codecs import stored_logprob_dtype, zarr_codecs
from .errors import CorruptShardError, ManifestError
from .manifest import FileRecord, ShardRecord, TargetSpec
from .shard import COLUMNS, NDArray, ShardData

__all__ = ["Column", "read_shard", "shard_files", "shard_relpath", "stored_columns", "write_shard"]

# Rows per inner zarr chunk along the first axis: ~1-4 MB raw for K=32, small enough for random access.
_INNER_CHUNK = 32768
# The Zarr v3 codecs a shard may name (those data.codecs.zarr_codecs and the sharding index use); anything else,
# a numcodecs pickle or object codec above all, is refused before zarr is asked to decode it.
_ZARR_CODECS = frozenset({"sharding_indexed", "bytes", "transpose", "blosc", "zstd", "crc32c"})
# A zarr.json is a few hundred bytes.
_MAX_ZARR_JSON = 1 << 20
# Arrow field names of the columns whose name differs from the shard column's.
_ARROW_FIELD = {"keys": "key", "labels": "label"}


class Column(NamedTuple):
    """A column as a shard stores it: its shape, dtype (``target_logprobs`` in its stored encoding), whether
    every shard must have it, and where its dtype comes from when that is not obvious (for error messages)."""

    shape: tuple[int, ...]
    dtype: str
    required: bool = True
    why: str = ""
    ragged: bool = False  # a sampled or hybrid store's (U,) column: in arrow, a list per example of a list per position


def stored_columns(
    task: str,
    targets: TargetSpec,
    rows: int,
    tokens: int,
    positions: int,
    entries: int | None = None,
    text_bytes: int | None = None,
) -> dict[str, Column]:
    """The columns a shard of these manifest counts holds on disk (R rows, T tokens, P positions, K kept ids;
    U ``entries`` (position, unique id) for a sampled store, (position, unique tail id) for a hybrid one; X
    ``text_bytes`` of source text for a shard labelled with spans)."""
    R, T, P, K, ids = rows, tokens, positions, targets.k, targets.id_dtype
    cols = {
        "input_ids": Column((T,), ids),
        "token_offsets": Column((R + 1,), "int64"),
        "position_offsets": Column((R + 1,), "int64"),
        "target_ids": Column((P, K), ids),
        "target_logprobs": Column(
            (P, K),
            stored_logprob_dtype(targets),
            why=f"encoding {targets.encoding!r} stores {stored_logprob_dtype(targets)}",
        ),
        "tail_mass": Column((P,), "float32"),
        "keys": Column((R, 16), "uint8"),
    }
    if task == "masked-lm":
        cols["labels"] = Column((P,), ids)
        cols["positions"] = Column((P,), "int32")
    elif task == "seq-cls":
        cols["labels"] = Column((R,), "int64", required=False)  # a classification store may hold no labels
    if targets.sampled:
        if entries is None:
            raise ManifestError("manifest: a shard of a sampled store must record its 'entries'")
        del cols["target_logprobs"]
        cols["target_ids"] = Column((entries,), ids, ragged=True)
        cols["target_counts"] = Column((entries,), targets.count_dtype, ragged=True)
        cols["target_offsets"] = Column((P + 1,), "int64")
    if targets.hybrid:
        if entries is None:
            raise ManifestError("manifest: a shard of a hybrid store must record its 'entries'")
        cols["tail_ids"] = Column((entries,), ids, ragged=True)
        cols["tail_counts"] = Column((entries,), targets.count_dtype, ragged=True)
        cols["tail_offsets"] = Column((P + 1,), "int64")
    if text_bytes is not None:
        cols["text"] = Column((text_bytes,), "uint8")
        cols["text_offsets"] = Column((R + 1,), "int64")
        cols["token_spans"] = Column((T, 2), "int32")
    return cols


def decoded_bytes(columns: dict[str, Column]) -> int:
    """Bytes the columns take once decoded (every optional column counted)."""
    return sum(math.prod(c.shape) * np.dtype(c.dtype).itemsize for c in columns.values())


def shard_relpath(backend: str, name: str) -> str:
    """Where a shard lives inside the store."""
    return f"shards/{name}.arrow" if backend == "arrow" else f"shards/{name}"


def shard_files(backend: str, record: ShardRecord) -> dict[str, FileRecord]:
    """Every file of a shard by its path relative to the store root.

    A zarr shard is a directory and its files are listed relative to it; an arrow shard is a single file,
    listed under its own name.
    """
    if backend == "arrow":
        base = record.path.rsplit("/", 1)[-1]
        if set(record.files) != {base}:
            raise ManifestError(f"manifest: arrow shard {record.name} must list exactly its own file {base!r}")
        return {record.path: record.files[base]}
    return {f"{record.path}/{rel}": rec for rel, rec in record.files.items()}


def write_shard(backend: str, path: Path, data: ShardData, attrs: dict[str, Any]) -> None:
    """Write ``data`` to the local ``path`` (a directory for zarr, a file for arrow), which must not exist."""
    if backend == "zarr":
        _write_zarr(path, data, attrs)
    else:
        _write_arrow(path, data, attrs)


def read_shard(backend: str, path: Path, expected: dict[str, Column] | None = None) -> ShardData:
    """Read a whole shard from a local path. Raises CorruptShardError if it cannot be decoded.

    Args:
        backend: "zarr" or "arrow".
        path: the shard's directory (zarr) or file (arrow).
        expected: the columns the manifest implies (:func:`stored_columns`); when given, the shard's metadata
            (zarr array metadata, arrow schema) is checked against them before any data is decoded.
    """
    try:
        return _read_zarr(path, expected) if backend == "zarr" else _read_arrow(path, expected)
    except CorruptShardError:
        raise
    except Exception as e:  # any decoder failure on untrusted bytes is a corrupt shard, not a crash
        raise CorruptShardError(f"{path.name}: cannot be decoded as a {backend} shard ({type(e).__name__}: {e})") from e


def read_keys(backend: str, path: Path, rows: int, spec: Column) -> NDArray:
    """Only the content keys of a local shard, (rows, 16) uint8, without decoding the other columns: zarr opens
    the one ``keys`` array (its metadata checked first), arrow reads only the ``key`` field's buffers. What a
    held-out split by content key needs from every shard, at 16 bytes per example.

    Raises:
        CorruptShardError: the keys cannot be read, or are not (rows, 16) uint8.
    """
    import pyarrow as pa

    try:
        if backend == "zarr":
            import zarr
            from zarr.storage import LocalStore

            _check_zarr_array(f"{path.name}: array 'keys'", _read_json(path / "keys" / "zarr.json"), spec)
            keys = np.asarray(zarr.open_array(store=LocalStore(path / "keys", read_only=True), mode="r")[...])
        else:
            with pa.OSFile(str(path), "rb") as source:
                schema = pa.ipc.open_file(source).schema
                options = pa.ipc.IpcReadOptions(included_fields=[schema.get_field_index("key")])
                column = pa.ipc.open_file(source, options=options).read_all().column("key").combine_chunks()
            if column.type != pa.binary(16) or column.null_count:
                raise CorruptShardError(f"{path.name}: column 'key' is not a non-null fixed_size_binary(16)")
            keys = np.frombuffer(column.buffers()[1], dtype=np.uint8)[column.offset * 16 :][: len(column) * 16]
            keys = keys.reshape(-1, 16)
    except CorruptShardError:
        raise
    except Exception as e:  # a decoder failure on untrusted bytes is a corrupt shard, not a crash
        raise CorruptShardError(f"{path.name}: cannot read its keys ({type(e).__name__}: {e})") from e
    if keys.shape != (rows, 16) or keys.dtype != np.uint8:
        raise CorruptShardError(f"{path.name}: keys of shape {keys.shape} {keys.dtype}, expected ({rows}, 16) uint8")
    return keys


# ---------------------------------------------------------------- zarr


def _write_zarr(path: Path, data: ShardData, attrs: dict[str, Any]) -> None:
    import zarr
    from zarr.storage import LocalStore

    group = zarr.open_group(store=LocalStore(path), mode="w-", zarr_format=3, attributes=attrs)
    for name, arr in data.columns().items():
        n = max(int(arr.shape[0]), 1)
        inner = min(n, _INNER_CHUNK)
        outer = -(-n // inner) * inner  # the sharding codec wants whole inner chunks per shard
        filters, compressors = zarr_codecs(name, arr)
        group.create_array(
            name=name,
            data=arr,
            chunks=(inner, *arr.shape[1:]),
            shards=(outer, *arr.shape[1:]),
            filters=filters,
            compressors=compressors,
            fill_value=0,
        )


def _read_zarr(path: Path, expected: dict[str, Column] | None) -> ShardData:
    import zarr
    from zarr.storage import LocalStore

    meta = path / "zarr.json"
    group_meta = _read_json(meta) if meta.is_file() else None
    if not isinstance(group_meta, dict) or group_meta.get("node_type") != "group":
        raise CorruptShardError(f"{path.name}: no zarr group metadata")
    if group_meta.get("consolidated_metadata") is not None:
        # zarr would take the arrays' metadata from here instead of the zarr.json files checked below
        raise CorruptShardError(f"{path.name}: consolidated zarr metadata is not part of the format")
    names = sorted(p.name for p in path.iterdir() if p.name != "zarr.json")
    unknown = set(names) - set(COLUMNS)
    if unknown:
        raise CorruptShardError(f"{path.name}: unexpected arrays {sorted(unknown)}")
    if expected is not None:
        missing = [c for c, spec in expected.items() if spec.required and c not in names]
        if missing:
            raise CorruptShardError(f"{path.name}: missing columns {missing}")
        for name in names:
            if name not in expected:
                raise CorruptShardError(f"{path.name}: array '{name}' does not belong in a shard of this task")
            _check_zarr_array(f"{path.name}: array '{name}'", _read_json(path / name / "zarr.json"), expected[name])
    group = zarr.open_group(store=LocalStore(path, read_only=True), mode="r", use_consolidated=False)
    cols: dict[str, NDArray | None] = dict.fromkeys(COLUMNS)
    for name in names:
        array = group[name]
        if not isinstance(array, zarr.Array):
            raise CorruptShardError(f"{path.name}: '{name}' is not a zarr array")
        cols[name] = np.asarray(array[...])
    return _from_columns(path.name, cols)


def _read_json(path: Path) -> Any:
    if path.stat().st_size > _MAX_ZARR_JSON:
        raise CorruptShardError(f"{path.parent.name}/{path.name}: {path.stat().st_size} bytes, too large for metadata")
    return json.loads(path.read_bytes())


def _check_zarr_array(where: str, meta: Any, spec: Column) -> None:
    """Refuse array metadata that does not match the manifest, before zarr allocates or decodes anything."""
    if not isinstance(meta, dict) or meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
        raise CorruptShardError(f"{where}: not Zarr v3 array metadata")
    if meta.get("data_type") != spec.dtype:
        why = f"; {spec.why}" if spec.why else ""
        raise CorruptShardError(
            f"{where}: data_type {meta.get('data_type')!r}, the manifest says {spec.dtype!r}{why} (no object, "
            "string or pickled data types are read)"
        )
    shape = meta.get("shape")
    if not isinstance(shape, list) or tuple(shape) != spec.shape:
        raise CorruptShardError(
            f"{where}: declares shape {shape}, the manifest says {list(spec.shape)} (from its counts)"
        )
    if meta.get("storage_transformers"):
        raise CorruptShardError(f"{where}: storage transformers are not part of the format")
    grid = meta.get("chunk_grid")
    if not isinstance(grid, dict) or grid.get("name") != "regular":
        raise CorruptShardError(f"{where}: chunk grid {grid!r} is not a regular grid")
    _check_chunk_shape(where, grid.get("configuration", {}).get("chunk_shape"), spec.shape)
    _check_codecs(where, meta.get("codecs"), spec.shape)


def _check_chunk_shape(where: str, chunk: Any, shape: tuple[int, ...]) -> None:
    """A chunk spans at most the array plus one inner chunk along the first axis, and the array elsewhere (as
    the writer makes them), so that no chunk buffer can be larger than the data the manifest promises."""
    ok = (
        isinstance(chunk, list)
        and len(chunk) == len(shape)
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in chunk)
        and chunk[0] <= shape[0] + _INNER_CHUNK
        and all(c <= max(n, 1) for c, n in zip(chunk[1:], shape[1:], strict=True))
    )
    if not ok:
        raise CorruptShardError(f"{where}: chunk shape {chunk!r} does not fit the array's shape {list(shape)}")


def _check_codecs(where: str, codecs: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(codecs, list) or not codecs:
        raise CorruptShardError(f"{where}: no codec list")
    for codec in codecs:
        name = codec.get("name") if isinstance(codec, dict) else None
        if name not in _ZARR_CODECS:
            allowed = ", ".join(sorted(_ZARR_CODECS))
            raise CorruptShardError(
                f"{where}: codec {name!r} is not one of the Zarr v3 codecs a store uses ({allowed})"
            )
        if name == "sharding_indexed":
            config = codec.get("configuration")
            if not isinstance(config, dict):
                raise CorruptShardError(f"{where}: sharding codec without configuration")
            _check_chunk_shape(where, config.get("chunk_shape"), shape)
            _check_codecs(where, config.get("codecs"), shape)
            _check_codecs(where, config.get("index_codecs"), shape)


def _from_columns(where: str, cols: dict[str, NDArray | None]) -> ShardData:
    required = (
        "input_ids",
        "token_offsets",
        "position_offsets",
        "target_ids",
        "tail_mass",
        "keys",
    )  # target_logprobs (top-k) or target_counts/target_offsets (sampled): checked by ShardData.validate
    missing = [c for c in required if cols.get(c) is None]
    if missing:
        raise CorruptShardError(f"{where}: missing columns {missing}")
    return ShardData(**cols)  # type: ignore[arg-type]


# ---------------------------------------------------------------- arrow


def _write_arrow(path: Path, data: ShardData, attrs: dict[str, Any], compression: str | None = "zstd") -> None:
    import pyarrow as pa

    def nested(values: NDArray, offsets: NDArray) -> Any:
        flat: Any = pa.array(values.reshape(-1))
        if values.ndim == 2:
            flat = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat)

    to, po = data.token_offsets, data.position_offsets
    cols: dict[str, Any] = {
        "key": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), data.rows, [None, pa.py_buffer(data.keys.tobytes())]
        ),
        "input_ids": nested(data.input_ids, to),
        "tail_mass": nested(data.tail_mass, po),
    }
    if data.target_offsets is not None and data.target_counts is not None:
        # sampled: large_list (example) of large_list (position) of the position's unique ids / counts
        for name, values in (("target_ids", data.target_ids), ("target_counts", data.target_counts)):
            cols[name] = pa.LargeListArray.from_arrays(pa.array(po, pa.int64()), nested(values, data.target_offsets))
    else:
        assert data.target_logprobs is not None
        cols["target_ids"] = nested(data.target_ids, po)
        cols["target_logprobs"] = nested(data.target_logprobs, po)
    if data.tail_offsets is not None and data.tail_ids is not None and data.tail_counts is not None:
        # hybrid: the tail's draws nest as a sampled store's targets do (example -> position -> unique ids)
        for name, values in (("tail_ids", data.tail_ids), ("tail_counts", data.tail_counts)):
            cols[name] = pa.LargeListArray.from_arrays(pa.array(po, pa.int64()), nested(values, data.tail_offsets))
    if data.text is not None and data.text_offsets is not None and data.token_spans is not None:
        cols["text"] = nested(data.text, data.text_offsets)
        cols["token_spans"] = nested(data.token_spans, to)
    if data.positions is not None:
        cols["positions"] = nested(data.positions, po)
    if data.labels is not None:
        # per-position labels (masked-lm, which also has positions) nest like the targets; per-example ones don't
        cols["label"] = nested(data.labels, po) if data.positions is not None else pa.array(data.labels)
    table = pa.table(cols)
    table = table.replace_schema_metadata({"kd-soft-labels": json.dumps(attrs)})
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)


def arrow_type(spec: Column, per_example: bool) -> Any:
    """The Arrow type of a shard column in an arrow shard, one row per example: a per-example column (``key``,
    a classification ``label``) holds one value per row, every other column a ``large_list`` of the row's values
    (of ``fixed_size_list[K]`` for the (P, K) columns)."""
    import pyarrow as pa

    value = pa.from_numpy_dtype(np.dtype(spec.dtype))
    if spec.ragged:  # (U,) sampled entries: a list per position inside the list per example
        return pa.large_list(pa.large_list(value))
    if per_example:  # (R,) values, or (R, 16) uint8 keys as fixed_size_binary(16)
        return pa.binary(spec.shape[1]) if len(spec.shape) == 2 else value
    return pa.large_list(pa.list_(value, spec.shape[1]) if len(spec.shape) == 2 else value)


def _check_arrow_schema(where: str, schema: Any, expected: dict[str, Column]) -> None:
    """Refuse a schema whose columns or types differ from the manifest's, before any record batch is read."""
    fields = {_ARROW_FIELD.get(c, c): (c, spec) for c, spec in expected.items() if not c.endswith("_offsets")}
    names = list(schema.names)
    if len(set(names)) != len(names):
        raise CorruptShardError(f"{where}: two columns share a name")
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise CorruptShardError(f"{where}: unexpected columns {unknown}")
    missing = [n for n, (_, spec) in fields.items() if spec.required and n not in names]
    if missing:
        raise CorruptShardError(f"{where}: missing columns {missing}")
    for n in names:
        column, spec = fields[n]
        # labels are per position where the task has positions (masked-lm), else per example (seq-cls)
        per_example = column == "keys" or (column == "labels" and "positions" not in expected)
        want = arrow_type(spec, per_example)
        got = schema.field(n).type
        if not got.equals(want):
            why = f" ({spec.why})" if spec.why else ""
            raise CorruptShardError(f"{where}: column '{n}' has type {got}, the manifest says {want}{why}")


def _read_arrow(path: Path, expected: dict[str, Column] | None) -> ShardData:
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)  # reads the footer and schema only
        if expected is not None:
            _check_arrow_schema(path.name, reader.schema, expected)
        table = reader.read_all().combine_chunks()
    names = set(table.column_names)
    known = {"key", "input_ids", "target_ids", "target_logprobs", "target_counts", "tail_mass", "positions", "label"}
    known |= {"tail_ids", "tail_counts", "text", "token_spans"}
    if names - known:
        raise CorruptShardError(f"{path.name}: unexpected columns {sorted(names - known)}")
    nulls = [n for n in table.column_names if table.column(n).null_count]
    if nulls:
        raise CorruptShardError(f"{path.name}: columns {nulls} hold nulls")

    def column(name: str) -> Any:
        return table.column(name).chunk(0) if table.num_rows else table.column(name).combine_chunks()

    def flat(name: str) -> tuple[NDArray, NDArray]:
        arr = column(name)
        offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
        values = arr.flatten()
        if pa.types.is_fixed_size_list(values.type):
            width = values.type.list_size
            return values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width), offsets - offsets[0]
        return values.to_numpy(zero_copy_only=False), offsets - offsets[0]

    def ragged(name: str) -> tuple[NDArray, NDArray, NDArray]:
        """A sampled column: (U,) values, (P + 1,) per-position offsets, (R + 1,) per-example offsets."""
        outer = column(name)
        per_example = np.asarray(outer.offsets.to_numpy(), dtype=np.int64)
        inner = outer.flatten()  # large_list per position, sliced to this column's rows
        per_position = np.asarray(inner.offsets.to_numpy(), dtype=np.int64)
        values = inner.flatten().to_numpy(zero_copy_only=False)
        return values, per_position - per_position[0], per_example - per_example[0]

    input_ids, token_offsets = flat("input_ids")
    target_counts = target_offsets = None
    if "target_counts" in names:
        target_ids, target_offsets, position_offsets = ragged("target_ids")
        target_counts, counts_offsets, counts_rows = ragged("target_counts")
        if not (np.array_equal(counts_offsets, target_offsets) and np.array_equal(counts_rows, position_offsets)):
            raise CorruptShardError(f"{path.name}: 'target_counts' and 'target_ids' are not laid out alike")
    else:
        target_ids, position_offsets = flat("target_ids")
    tail_ids = tail_counts = tail_offsets = None
    if "tail_counts" in names or "tail_ids" in names:
        tail_ids, tail_offsets, ids_rows = ragged("tail_ids")
        tail_counts, counts_offsets, counts_rows = ragged("tail_counts")
        laid_out = np.array_equal(counts_offsets, tail_offsets) and np.array_equal(counts_rows, ids_rows)
        if not (laid_out and np.array_equal(ids_rows, position_offsets)):
            raise CorruptShardError(f"{path.name}: 'tail_ids', 'tail_counts' and 'target_ids' are not laid out alike")
    text = text_offsets = token_spans = None
    if "text" in names or "token_spans" in names:
        text, text_offsets = flat("text")
        token_spans, spans_rows = flat("token_spans")
        if not np.array_equal(spans_rows, token_offsets):
            raise CorruptShardError(f"{path.name}: 'token_spans' and 'input_ids' are not laid out alike")
    keys = np.frombuffer(column("key").buffers()[1], dtype=np.uint8)[column("key").offset * 16 :][: table.num_rows * 16]
    cols: dict[str, NDArray | None] = {
        "input_ids": input_ids,
        "token_offsets": token_offsets,
        "position_offsets": position_offsets,
        "target_ids": target_ids,
        "target_logprobs": flat("target_logprobs")[0] if "target_logprobs" in names else None,
        "target_counts": target_counts,
        "target_offsets": target_offsets,
        "tail_ids": tail_ids,
        "tail_counts": tail_counts,
        "tail_offsets": tail_offsets,
        "tail_mass": flat("tail_mass")[0],
        "keys": keys.reshape(-1, 16).copy(),
        "positions": flat("positions")[0] if "positions" in names else None,
        "labels": None,
        "text": text,
        "text_offsets": text_offsets,
        "token_spans": token_spans,
    }
    if "label" in names:
        lab = column("label")
        cols["labels"] = flat("label")[0] if pa.types.is_large_list(lab.type) else lab.to_numpy(zero_copy_only=False)
    return _from_columns(path.name, cols)
