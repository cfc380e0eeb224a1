"""Store size: one store's content re-encoded with each encoding, bytes per token side by side.

    .venv/bin/python bench/store_size.py                      # /tmp/demo1/store; writes bench/results/store_size.json
    .venv/bin/python bench/store_size.py STORE --shards 4     # any store (zarr or arrow, any k), its first 4 shards
    .venv/bin/python bench/store_size.py STORE --sampled SAMPLED_STORE...   # also sampled stores, as they are

Every encoding stores the same examples with the same shard split as the source store, so the rows differ only
in how the columns are encoded:

* ``naive``: float16 values + uint16 ids, every column zstd (level 3), no shuffle, no transform.
* ``old default``: what zarr stores were before ``data/codecs.py``: Blosc(zstd 5, byte shuffle) on every column
  (keys: level 1, no shuffle), plain float16 values.
* ``new default``: the zarr writer's default now: ``delta`` encoding (lossless) + the codecs of
  ``data.codecs.zarr_codecs``. Checked to read back bit-exact.
* ``q8``: the lossy 8-bit option; its KL divergence to the source's values is measured by the writer and
  recorded in the manifest (mean and max over positions, nats, over the k+1 bins).
* ``arrow``: the arrow backend's default (plain float16, zstd IPC buffers), for reference.
* ``dense float16``: every logit in float16, ``num_classes * 2`` bytes per position, analytic (it needs the
  teacher).
* ``sampled, N draws`` (``--sampled STORE``): a store of ``label --method sample``, written again through the
  real writer to zarr and to arrow (ids and counts are stored as they are; there is no value encoding).
* ``lossless_estimate``: an *estimate* (not a bound) of what a lossless top-k store with float16 values holds,
  split into the values, the set of kept ids, their order and the rest: each part's best code tried here
  (measured), and beside it the order-0 entropy of the values and id set (measured), log2(K!) for the order
  (analytic) and the default encoding's size for the rest (copied); see :func:`lossless_estimate`.

Bytes per token are the shard files' bytes (data chunks + zarr.json metadata, as ``pipeline inspect`` counts
them) over the store's input tokens; bytes per position divide the same bytes by the labelled positions (a
causal-LM example of L tokens has L - 1). The per-column split counts data chunks only. The naive and old rows are
written by a small zarr writer here with the same layout as the store's; the others by the real ``StoreWriter``
and read back with ``open_store``. Write and read rates are wall-clock on one core: encoding (q8 includes
measuring its KL) + compression with the same small writer for every zarr row (arrow: the real writer), and
``read_shard`` + decoding (what the reader does before its checksum and count checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kd_pipeline.data import Manifest, StoreWriter, TargetSpec, open_store
from kd_pipeline.data.backends import read_shard
from kd_pipeline.data.codecs import decode_shard, encode_shard, zarr_codecs
from kd_pipeline.data.shard import NDArray, ShardData

Codecs = Callable[[str, NDArray], tuple[list[Any], list[Any]]]


def naive_codecs(name: str, arr: NDArray) -> tuple[list[Any], list[Any]]:
    from zarr.codecs import ZstdCodec

    return [], [ZstdCodec(level=3)]


def old_codecs(name: str, arr: NDArray) -> tuple[list[Any], list[Any]]:
    """The zarr backend's codecs before data/codecs.py (git history: data/backends.py ``_compressor``)."""
    from zarr.codecs import BloscCodec

    if arr.dtype == np.uint8:
        return [], [BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle", typesize=1)]
    return [], [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=arr.dtype.itemsize)]


def write_zarr_shards(root: Path, shards: list[ShardData], codecs: Codecs) -> float:
    """Write each shard as a zarr group laid out like the zarr backend's; returns the seconds it took."""
    import zarr
    from zarr.storage import LocalStore

    from kd_pipeline.data.backends import _INNER_CHUNK

    t0 = time.perf_counter()
    for i, data in enumerate(shards):
        group = zarr.open_group(store=LocalStore(root / f"shard-{i:06d}"), mode="w-", zarr_format=3)
        for name, arr in data.columns().items():
            n = max(int(arr.shape[0]), 1)
            inner = min(n, _INNER_CHUNK)
            filters, compressors = codecs(name, arr)
            group.create_array(
                name=name,
                data=arr,
                chunks=(inner, *arr.shape[1:]),
                shards=(-(-n // inner) * inner, *arr.shape[1:]),
                filters=filters,
                compressors=compressors,
                fill_value=0,
            )
    return time.perf_counter() - t0


def read_shards(backend: str, root: Path, targets: TargetSpec) -> float:
    """Read and decode every shard under ``root`` as the reader does (without its checksum and count checks)."""
    t0 = time.perf_counter()
    for path in sorted(root.iterdir()):
        decode_shard(targets, read_shard(backend, path))
    return time.perf_counter() - t0


def column_bytes(files: list[tuple[str, int]]) -> dict[str, int]:
    """Bytes per column (data chunks) and of all ``zarr.json`` files ("metadata"), from shard-relative paths."""
    out: dict[str, int] = {}
    for rel, size in files:
        key = "metadata" if rel.rsplit("/", 1)[-1] == "zarr.json" else rel.split("/", 1)[0]
        out[key] = out.get(key, 0) + size
    return out


def tree_files(root: Path) -> list[tuple[str, int]]:
    """Every file under ``root/<shard>/``: its path relative to its shard, and its size."""
    return [
        (p.relative_to(root).as_posix().split("/", 1)[1], p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


def codec_write_seconds(root: Path, targets: TargetSpec, shards: list[ShardData]) -> float:
    """Encode + write with the zarr backend's codecs through the same small writer as the baselines, so that
    the write rates compare like for like (the real writer adds checksums and manifest commits)."""
    t0 = time.perf_counter()
    encoded = [encode_shard(targets, data)[0] for data in shards]
    return time.perf_counter() - t0 + write_zarr_shards(root, encoded, zarr_codecs)


def float16_shards(shards: list[ShardData]) -> list[ShardData]:
    return [dataclasses.replace(s, target_logprobs=s.target_logprobs.astype(np.float16)) for s in shards]


def profile_row(
    total: int, columns: dict[str, int], positions: int, tokens: int, write_s: float, read_s: float
) -> dict[str, Any]:
    """Sizes per token (the store's bytes over its input tokens: the figure DESIGN.md's targets use) and per
    labelled position (a causal-LM example of L tokens has L - 1 positions), and the write / read rates."""
    return {
        "bytes": total,
        "bytes_per_token": total / tokens,
        "bytes_per_position": total / positions,
        "columns_bytes_per_token": {k: v / tokens for k, v in sorted(columns.items())},
        "write_positions_per_s": positions / write_s if write_s else None,
        "read_positions_per_s": positions / read_s if read_s else None,
    }


def through_store_writer(
    path: Path, source: Manifest, shards: list[ShardData], backend: str, value_dtype: str
) -> tuple[dict[str, Any], Any]:
    """Write ``shards`` through the real StoreWriter with a re-encoded spec; read them back with open_store."""
    targets = dataclasses.replace(source.targets, value_dtype=value_dtype, encoding="auto")
    template = dataclasses.replace(source, backend=backend, targets=targets, shards=(), complete=False)
    t0 = time.perf_counter()
    with StoreWriter(path, template) as w:
        for unit, data in enumerate(shards):
            if data.target_logprobs is not None:  # top-k (sampled shards hold ids and counts only)
                values = data.target_logprobs.astype(w.manifest.targets.logprob_dtype)
                data = dataclasses.replace(data, target_logprobs=values)
            w.write_shard(unit, data)
        m = w.finish()
    write_s = time.perf_counter() - t0
    read_s = read_shards(backend, path / "shards", m.targets)
    reader = open_store(path)
    back = [reader.load_shard(s, verify=True) for s in reader.manifest.shards]
    files = [(rel, f.bytes) for s in m.shards for rel, f in s.files.items()]
    columns = column_bytes(files) if backend == "zarr" else {}
    row = profile_row(m.bytes, columns, m.positions, m.tokens, write_s, read_s)
    row["encoding"] = m.targets.encoding
    return row, (m, back)


def _entropy_bits(symbols: NDArray) -> float:
    """Zero-order empirical entropy of ``symbols`` in bits per symbol (what an ideal order-0 coder needs)."""
    _, counts = np.unique(symbols, return_counts=True)
    q = counts / counts.sum()
    return float(-(q * np.log2(q)).sum())


def lossless_estimate(
    shards: list[ShardData], num_classes: int, rest_bytes_per_token: float, tokens: int
) -> dict[str, Any]:
    """An estimate of what a lossless top-k store with float16 values holds per token, in four parts. Not a
    bound: a coder with context (the input tokens, the neighbouring positions) may go lower than any figure here.

    A top-k position is a set of K ids, the order of those ids by probability, and K float16 values. How each
    figure is made: "coded" is measured, the size of the best code tried here (zstd 19 on a transform that suits
    the part); "entropy" is the order-0 empirical entropy of the same symbols for the values and the id set
    (measured), the analytic log2(K!) bits of a uniformly random order for the order (computed, not measured),
    and, for the rest, the default encoding's measured size copied in (not re-coded). Per input token:

    * values: float16 bit patterns sorted by probability, delta-coded per rank (the ``delta`` encoding's
      symbols); entropy summed over the K ranks, each rank with its own symbol distribution.
    * id set: ids remapped to their frequency rank in these shards (a table of the ids seen, counted), sorted per
      position and gap-coded; entropy of the gaps.
    * order: which of the set's K! orderings is the probability order, as a Lehmer code (one uint8 per rank);
      log2(K!) bits is the size of a uniformly random order, and the Lehmer code's zstd size shows how close the
      data comes to it.
    * rest: tail mass, input ids, offsets, keys and metadata, as the default encoding stores them.
    """
    import numcodecs

    def zstd(a: NDArray) -> int:
        return len(numcodecs.Zstd(level=19).encode(np.ascontiguousarray(a).tobytes()))

    def shuffled(a: NDArray) -> NDArray:
        a = np.ascontiguousarray(a)
        return a.view(np.uint8).reshape(-1, a.dtype.itemsize).T.copy()

    ids = np.concatenate([s.target_ids for s in shards]).astype(np.int64)  # (P, K), most probable first
    lp = np.concatenate([s.target_logprobs for s in shards]).astype(np.float16)
    P, K = ids.shape
    bits = lp.view(np.uint16)
    deltas = bits.copy()
    deltas[:, 1:] = bits[:, 1:] - bits[:, :-1]
    counts = np.bincount(ids.ravel(), minlength=num_classes)
    by_freq = np.argsort(-counts, kind="stable")
    rank = np.empty_like(by_freq)
    rank[by_freq] = np.arange(by_freq.size)
    ranked = rank[ids]  # (P, K)
    order = np.argsort(ranked, axis=1, kind="stable")  # id-set slots in rank order
    sorted_ranks = np.take_along_axis(ranked, order, axis=1)
    gaps = sorted_ranks.copy()
    gaps[:, 1:] = sorted_ranks[:, 1:] - sorted_ranks[:, :-1]
    slot = np.argsort(order, axis=1)  # (P, K): where the j-th most probable id sits in the sorted set
    lehmer = np.zeros((P, K), dtype=np.uint8)
    for j in range(K - 1):
        lehmer[:, j] = (slot[:, j : j + 1] > slot[:, j + 1 :]).sum(axis=1)
    table = zstd(by_freq[: int((counts > 0).sum())].astype(np.uint32))
    per_position = P / tokens  # the entropies below are per position; sizes are divided by tokens directly
    parts = {
        "values": {
            "coded": zstd(shuffled(deltas.T)) / tokens,
            "entropy": per_position * sum(_entropy_bits(deltas[:, j]) for j in range(K)) / 8,
        },
        "id_set": {
            "coded": (zstd(shuffled(gaps.astype(np.uint16))) + table) / tokens,
            "entropy": per_position * (_entropy_bits(gaps[:, 0]) + (K - 1) * _entropy_bits(gaps[:, 1:])) / 8,
        },
        "order": {
            "coded": zstd(lehmer.T) / tokens,
            "entropy": per_position * float(np.log2(np.arange(1, K + 1)).sum() / 8),
            "entropy_is": "analytic: log2(K!) bits per position",
        },
        "rest": {
            "coded": rest_bytes_per_token,
            "entropy": rest_bytes_per_token,
            "entropy_is": "copied: the default encoding's measured size",
        },
    }
    return {
        "what": "an estimate, not a bound (see lossless_estimate's docstring in bench/store_size.py)",
        "parts_bytes_per_token": parts,
        "coded_total": sum(p["coded"] for p in parts.values()),
        "entropy_total": sum(p["entropy"] for p in parts.values()),
        "positions": P,
        "k": K,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", nargs="?", default="/tmp/demo1/store", help="a store (path or URL) to re-encode")
    p.add_argument("--shards", type=int, default=0, help="use only the first N shards (default: all)")
    p.add_argument("--sampled", nargs="*", default=[], help="sampled stores (label --method sample) to measure too")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "store_size.json")
    args = p.parse_args()

    # one core, as the loader benchmark: the rates are per core
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    reader = open_store(args.store)
    source = reader.manifest
    n_shards = min(args.shards or reader.num_shards, reader.num_shards)
    shards = [reader.shard(s) for s in range(n_shards)]
    source = dataclasses.replace(source, shards=source.shards[:n_shards])
    t = source.targets
    positions = sum(s.num_positions for s in shards)
    tokens = sum(s.tokens for s in shards)
    if not positions:
        raise SystemExit(f"{args.store}: no labelled positions to measure")
    tail = np.concatenate([s.tail_mass for s in shards]).astype(np.float64)
    f16 = float16_shards(shards)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kd-bench-size-") as tmp:
        for label, codecs in (("naive", naive_codecs), ("old default", old_codecs)):
            root = Path(tmp) / label.replace(" ", "-")
            write_s = write_zarr_shards(root, f16, codecs)
            files = tree_files(root)
            total = sum(size for _, size in files)
            plain = dataclasses.replace(t, value_dtype="float16", encoding="plain")
            results[label] = profile_row(
                total, column_bytes(files), positions, tokens, write_s, read_shards("zarr", root, plain)
            )
            results[label]["encoding"] = "plain"

        row, (m_new, back) = through_store_writer(Path(tmp) / "new", source, f16, "zarr", "float16")
        for a, b in zip(back, f16, strict=True):  # lossless: every bit of every column
            for name, col in b.columns().items():
                got = getattr(a, name)
                assert got.dtype == col.dtype and np.array_equal(got.view(np.uint8), col.view(np.uint8)), name
        row["lossless"] = True
        results["new default"] = row

        results["new default"]["write_positions_per_s"] = positions / codec_write_seconds(
            Path(tmp) / "new-codecs", m_new.targets, f16
        )

        row, (m_q8, back) = through_store_writer(Path(tmp) / "q8", source, shards, "zarr", "q8")
        kl_sum = sum(s.stats["kl_sum"] for s in m_q8.shards)
        row["kl_mean"] = kl_sum / sum(s.stats["count"] for s in m_q8.shards)
        row["kl_max"] = max(s.stats["kl_max"] for s in m_q8.shards)
        decoded = np.concatenate([b.target_logprobs for b in back]).astype(np.float64)
        row["max_kept_plus_tail"] = float((np.exp(decoded).sum(axis=1) + tail).max())
        row["tail_unchanged"] = bool(
            all(np.array_equal(a.tail_mass, b.tail_mass) for a, b in zip(back, shards, strict=True))
        )
        results["q8"] = row
        results["q8"]["write_positions_per_s"] = positions / codec_write_seconds(
            Path(tmp) / "q8-codecs",
            m_q8.targets,
            [dataclasses.replace(s, target_logprobs=s.target_logprobs.astype(np.float32)) for s in shards],
        )

        row, _ = through_store_writer(Path(tmp) / "arrow", source, f16, "arrow", "float16")
        results["arrow"] = row

        for i, path in enumerate(args.sampled):
            sreader = open_store(path)
            sm = sreader.manifest
            if not sm.targets.sampled:
                raise SystemExit(f"{path}: --sampled wants a sampled store; its targets.method is {sm.targets.method}")
            sshards = [sreader.shard(j) for j in range(min(args.shards or sreader.num_shards, sreader.num_shards))]
            sm = dataclasses.replace(sm, shards=sm.shards[: len(sshards)])
            entries = sum(int(x.num_entries or 0) for x in sshards)
            spos = sum(x.num_positions for x in sshards)
            name = f"sampled, {sm.targets.num_samples} draws, T={sm.targets.temperature:g}"
            for backend in ("zarr", "arrow"):
                row, _ = through_store_writer(Path(tmp) / f"sampled-{i}-{backend}", sm, sshards, backend, "float16")
                row.update(store=str(path), unique_ids_per_position=entries / spos, positions=spos)
                row["teacher_kept_mass"] = sm.kept_mass_mean
                results[f"{name} ({backend})"] = row

    dense = t.num_classes * 2
    results["dense float16"] = {
        "bytes_per_token": float(dense) * positions / tokens,
        "bytes_per_position": float(dense),
        "analytic": True,
    }
    kept_mass = float(1.0 - tail.mean())
    new_cols = results["new default"]["columns_bytes_per_token"]
    rest = results["new default"]["bytes_per_token"] - new_cols["target_ids"] - new_cols["target_logprobs"]
    floor = lossless_estimate(f16, t.num_classes, rest, tokens)

    print(
        f"store {args.store}: {n_shards} shards, {tokens:,} tokens, {positions:,} positions, k={t.k}, "
        f"T={t.temperature}, "
        f"{t.num_classes:,} ids, source values {t.value_dtype} ({source.targets.encoding}); "
        f"mean kept mass {kept_mass:.3f}"
    )
    cols = sorted({c for r in results.values() for c in r.get("columns_bytes_per_token", {})})
    print()
    print("| encoding | bytes/token | bytes/position | vs old | " + " | ".join(cols) + " | write pos/s | read pos/s |")
    print("|---|---:|---:|---:|" + "---:|" * len(cols) + "---:|---:|")
    old = results["old default"]["bytes_per_token"]
    for label, r in results.items():
        c = r.get("columns_bytes_per_token", {})

        def rate(x: float | None) -> str:
            return f"{x:,.0f}" if x else "-"

        print(
            f"| {label} | {r['bytes_per_token']:,.1f} | {r['bytes_per_position']:,.1f} | "
            f"{r['bytes_per_token'] / old:.2f}x | "
            + " | ".join(f"{c[k]:.2f}" if k in c else "-" for k in cols)
            + f" | {rate(r.get('write_positions_per_s'))} | {rate(r.get('read_positions_per_s'))} |"
        )
    q8 = results["q8"]
    print(
        f"\nq8: KL(exact || decoded) over the k+1 bins: mean {q8['kl_mean']:.2e} nats, max {q8['kl_max']:.2e} nats; "
        f"tail unchanged: {q8['tail_unchanged']}; max(kept + tail) = {q8['max_kept_plus_tail']:.7f}"
    )
    for label, r in results.items():
        if "unique_ids_per_position" in r:
            print(
                f"{label}: {r['unique_ids_per_position']:.1f} unique ids per position, teacher mass on them "
                f"{r['teacher_kept_mass']:.3f}"
            )
    print(
        f"\nlossless top-{t.k} with float16 values, an estimate in bytes/token (coded: best code tried here, "
        "measured; entropy: order-0 entropy of values and id set, log2(K!) for the order, rest copied):\n"
    )
    print("| part | coded | entropy |\n|---|---:|---:|")
    for part, v in floor["parts_bytes_per_token"].items():
        print(f"| {part} | {v['coded']:.2f} | {v['entropy']:.2f} |")
    print(f"| **total** | **{floor['coded_total']:.2f}** | **{floor['entropy_total']:.2f}** |")

    report = {
        "benchmark": "store_size",
        "what": "bytes per input token (and per labelled position) of one store's content under each encoding",
        "device": "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "store": str(args.store),
        "config": {
            "shards": n_shards,
            "positions": positions,
            "tokens": tokens,
            "task": source.task,
            "k": t.k,
            "temperature": t.temperature,
            "num_classes": t.num_classes,
            "source_value_dtype": t.value_dtype,
            "source_encoding": t.encoding,
            "teacher": source.teacher.get("name_or_path"),
        },
        "mean_kept_mass": kept_mass,
        "lossless_estimate": floor,
        "versions": {"numpy": np.__version__, "python": sys.version.split()[0], **_versions()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


def _versions() -> dict[str, str]:
    import numcodecs
    import zarr

    return {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__}


if __name__ == "__main__":
    main()
