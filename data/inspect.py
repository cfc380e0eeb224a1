"""``pipeline inspect``: what a store holds, what it cost on disk, and how much of the teacher it kept."""

from __future__ import annotations

from typing import Any

import numpy as np

from .manifest import Manifest, ShardRecord
from .reader import StoreReader
from .shard import ShardData

__all__ = ["DEFAULT_SHARDS", "sampled_shards", "summarize"]


def _bin_entropy(logprobs: np.ndarray[Any, Any], tail: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Entropy (nats) of the k+1-bin distribution: a lower bound on the teacher's entropy at T."""
    lp = logprobs.astype(np.float64)
    p = np.exp(lp)
    t = tail.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_term = np.where(t > 0, -t * np.log(np.where(t > 0, t, 1.0)), 0.0)
    entropy: np.ndarray[Any, Any] = -(p * lp).sum(axis=1) + tail_term
    return entropy


def _sampled_entropy(data: ShardData) -> np.ndarray[Any, Any]:
    """Entropy (nats) of each position's empirical distribution count / num_samples: (P,) float64."""
    assert data.target_counts is not None and data.target_offsets is not None
    c = data.target_counts.astype(np.float64)
    n = np.diff(data.target_offsets)
    total = np.repeat(np.add.reduceat(c, data.target_offsets[:-1]), n) if n.size else c
    p = c / total
    terms: np.ndarray[Any, Any] = -p * np.log(p)
    return np.add.reduceat(terms, data.target_offsets[:-1]) if n.size else np.zeros(0)


DEFAULT_SHARDS = 16
"""Shards read for the distributions and column sizes unless asked otherwise (evenly spaced over the store)."""


def _column_bytes(m: Manifest, shards: list[ShardRecord]) -> dict[str, float] | None:
    """Zarr stores: bytes of each column's data files, and of all ``zarr.json`` files ("metadata"), per position
    of ``shards``."""
    positions = sum(s.positions for s in shards)
    if m.backend != "zarr" or not positions:
        return None
    out: dict[str, float] = {}
    for shard in shards:
        for rel, rec in shard.files.items():
            key = "metadata" if rel.rsplit("/", 1)[-1] == "zarr.json" else rel.split("/", 1)[0]
            out[key] = out.get(key, 0.0) + rec.bytes
    return {k: v / positions for k, v in sorted(out.items())}


def _teacher_entropy(m: Manifest) -> float | None:
    """The teacher's mean entropy at T, from the labeler's shard stats: measured on a sample of rows
    (``entropy_count``; every labeler since before format version 2) or, by older labelers, on all (``count``)."""
    stats = m.totals.stats
    if "entropy_sum" not in stats:
        return None
    if m.format_version >= 2 and "entropy_count" in stats:
        return stats["entropy_sum"] / stats["entropy_count"] if stats["entropy_count"] else None
    # version 1 (records inline, already in memory), where one store may hold shards of both kinds
    exact = [s.stats for s in m.shards if "entropy_sum" in s.stats]
    count = sum(s.get("entropy_count", s.get("count", 0)) for s in exact)
    return sum(s["entropy_sum"] for s in exact) / count if count else None


def sampled_shards(n: int, most: int | None) -> list[int]:
    """Indices of at most ``most`` of ``n`` shards, evenly spaced from the first to the last (all: ``None``)."""
    if most is None or most >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(1, most - 1)) for i in range(most)})


def summarize(reader: StoreReader, max_shards: int | None = DEFAULT_SHARDS) -> dict[str, Any]:
    """Provenance, counts, bytes per token, and the distribution of kept mass and entropy.

    Bounded in the store's size: counts, bytes, the mean kept mass, the teacher's entropy and the encoding's KL
    come from the manifest's totals (a version-2 root; no shard record is read); the distributions and the bytes
    per column from ``max_shards`` shards spread evenly over the store (``None``: every shard).
    """
    m = reader.manifest
    kept: list[np.ndarray[Any, Any]] = []
    entropy: list[np.ndarray[Any, Any]] = []
    unique: list[np.ndarray[Any, Any]] = []  # sampled stores: unique ids per position; hybrid: unique tail ids
    read = sampled_shards(reader.num_shards, max_shards)
    for s in read:
        data = reader.shard(s)
        if data.target_logprobs is not None:
            kept.append(1.0 - data.tail_mass.astype(np.float64))
            entropy.append(_bin_entropy(data.target_logprobs, data.tail_mass))
            if data.tail_offsets is not None:
                unique.append(np.diff(data.tail_offsets).astype(np.float64))
        elif data.target_offsets is not None:
            unique.append(np.diff(data.target_offsets).astype(np.float64))
            entropy.append(_sampled_entropy(data))
    kept_all = np.concatenate(kept) if kept else np.zeros(0)
    ent_all = np.concatenate(entropy) if entropy else np.zeros(0)
    stats = m.totals.stats

    def dist(x: np.ndarray[Any, Any]) -> dict[str, float | None]:
        if not x.size:
            return {"mean": None, "p5": None, "p50": None, "p95": None}
        return {
            "mean": float(x.mean()),
            "p5": float(np.percentile(x, 5)),
            "p50": float(np.percentile(x, 50)),
            "p95": float(np.percentile(x, 95)),
        }

    unit = "position" if m.granularity == "token" else "example"  # what carries one distribution
    sampled: dict[str, Any] | None = None
    if m.targets.sampled:
        sampled = {
            "num_samples": m.targets.num_samples,
            "unique_per_position": dist(np.concatenate(unique) if unique else np.zeros(0)),
            # the teacher's probability mass on the ids drawn, as the labeler measured it
            "teacher_mass_on_sampled_ids": m.kept_mass_mean,
        }
    hybrid: dict[str, Any] | None = None
    if m.targets.hybrid:
        hybrid = {
            "k": m.targets.k,
            "num_samples": m.targets.num_samples,
            # over every position, those with a zero tail (no draws) included
            "unique_tail_ids_per_position": dist(np.concatenate(unique) if unique else np.zeros(0)),
        }
    return {
        "store": str(reader.location),
        "format_version": m.format_version,
        "complete": m.complete,
        "backend": m.backend,
        "task": m.task,
        "granularity": m.granularity,
        "targets": m.targets.to_dict(),
        "vocab_size": m.vocab_size,
        "teacher": m.teacher,
        "tokenizer": m.tokenizer,
        "dataset": m.dataset,
        "created": m.created,
        "versions": m.versions,
        "shards": len(m.shards),
        "rows": m.rows,
        "tokens": m.tokens,
        "positions": m.positions,
        "bytes": m.bytes,
        f"bytes_per_{unit}": (m.bytes / m.positions) if m.positions else None,
        "bytes_per_input_token": (m.bytes / m.tokens) if m.tokens else None,
        "summary_shards": len(read),
        f"column_bytes_per_{unit}": _column_bytes(m, [m.shards[s] for s in read]),
        # q8 stores: KL(exact || stored) over the k+1 bins, measured by the writer on the unquantised values of
        # every shard (each q8 shard records kl_sum, kl_max and its count)
        "encoding_kl": (
            {"mean": stats["kl_sum"] / stats["count"], "max": stats["kl_max"]}
            if "kl_sum" in stats and "kl_max" in stats and stats.get("count")
            else None
        ),
        "sampled": sampled,
        "hybrid": hybrid,
        "kept_mass": dist(kept_all),
        "bin_entropy": dist(ent_all),
        "teacher_entropy_mean": _teacher_entropy(m),
    }
