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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from data.codecs import zarr_codecs
from data.errors import CorruptShardError, ManifestError
from data.manifest import FileRecord, ShardRecord
from data.shard import COLUMNS, NDArray, ShardData

__all__ = ["read_shard", "shard_files", "shard_relpath", "write_shard"]

# Rows per inner zarr chunk along the first axis: ~1-4 MB raw for K=32, small enough for random access.
_INNER_CHUNK = 32768


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


def read_shard(backend: str, path: Path) -> ShardData:
    """Read a whole shard from a local path. Raises CorruptShardError if it cannot be decoded."""
    try:
        return _read_zarr(path) if backend == "zarr" else _read_arrow(path)
    except CorruptShardError:
        raise
    except Exception as e:  # any decoder failure on untrusted bytes is a corrupt shard, not a crash
        raise CorruptShardError(f"{path.name}: cannot be decoded as a {backend} shard ({type(e).__name__}: {e})") from e


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


def _read_zarr(path: Path) -> ShardData:
    import zarr
    from zarr.storage import LocalStore

    meta = path / "zarr.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("node_type") != "group":
        raise CorruptShardError(f"{path.name}: no zarr group metadata")
    group = zarr.open_group(store=LocalStore(path, read_only=True), mode="r")
    names = set(group.array_keys())
    unknown = names - set(COLUMNS)
    if unknown:
        raise CorruptShardError(f"{path.name}: unexpected arrays {sorted(unknown)}")
    cols: dict[str, NDArray | None] = dict.fromkeys(COLUMNS)
    for name, array in group.arrays():
        cols[name] = np.asarray(array[...])
    return _from_columns(path.name, cols)


def _from_columns(where: str, cols: dict[str, NDArray | None]) -> ShardData:
    required = (
        "input_ids",
        "token_offsets",
        "position_offsets",
        "target_ids",
        "target_logprobs",
        "tail_mass",
        "keys",
    )
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
        "target_ids": nested(data.target_ids, po),
        "target_logprobs": nested(data.target_logprobs, po),
        "tail_mass": nested(data.tail_mass, po),
    }
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


def _read_arrow(path: Path) -> ShardData:
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        table = pa.ipc.open_file(source).read_all().combine_chunks()
    names = set(table.column_names)
    known = {"key", "input_ids", "target_ids", "target_logprobs", "tail_mass", "positions", "label"}
    if names - known:
        raise CorruptShardError(f"{path.name}: unexpected columns {sorted(names - known)}")

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

    input_ids, token_offsets = flat("input_ids")
    target_ids, position_offsets = flat("target_ids")
    keys = np.frombuffer(column("key").buffers()[1], dtype=np.uint8)[column("key").offset * 16 :][: table.num_rows * 16]
    cols: dict[str, NDArray | None] = {
        "input_ids": input_ids,
        "token_offsets": token_offsets,
        "position_offsets": position_offsets,
        "target_ids": target_ids,
        "target_logprobs": flat("target_logprobs")[0],
        "tail_mass": flat("tail_mass")[0],
        "keys": keys.reshape(-1, 16).copy(),
        "positions": flat("positions")[0] if "positions" in names else None,
        "labels": None,
    }
    if "label" in names:
        lab = column("label")
        cols["labels"] = flat("label")[0] if pa.types.is_large_list(lab.type) else lab.to_numpy(zero_copy_only=False)
    return _from_columns(path.name, cols)
