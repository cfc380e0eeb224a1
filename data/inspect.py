"""``pipeline inspect``: what a store holds, what it cost on disk, and how much of the teacher it kept."""

from __future__ import annotations

from typing import Any

import numpy as np

from .manifest import Manifest
from .reader import StoreReader
from .shard import ShardData

__all__ = ["summarize"]


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


def _column_bytes(m: Manifest, positions: int) -> dict[str, float] | None:
    """Zarr stores: bytes of each column's data files, and of all ``zarr.json`` files ("metadata"), per position."""
    if m.backend != "zarr" or not positions:
        return None
    out: dict[str, float] = {}
    for shard in m.shards:
        for rel, rec in shard.files.items():
            key = "metadata" if rel.rsplit("/", 1)[-1] == "zarr.json" else rel.split("/", 1)[0]
            out[key] = out.get(key, 0.0) + rec.bytes
    return {k: v / positions for k, v in sorted(out.items())}


def summarize(reader: StoreReader, max_shards: int | None = None) -> dict[str, Any]:
    """Provenance, counts, bytes per token, and the distribution of kept mass and entropy.

    Args:
        reader: an open store.
        max_shards: read at most this many shards for the distributions (all by default); counts and bytes
            always come from the manifest.
    """
    m = reader.manifest
    kept: list[np.ndarray[Any, Any]] = []
    entropy: list[np.ndarray[Any, Any]] = []
    unique: list[np.ndarray[Any, Any]] = []  # sampled stores: unique ids per position; hybrid: unique tail ids
    for s in range(min(reader.num_shards, max_shards or reader.num_shards)):
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
    exact = [s.stats for s in m.shards if "entropy_sum" in s.stats]
    lossy = [s.stats for s in m.shards if "kl_sum" in s.stats]
    lossy_count = sum(s.get("count", 0.0) for s in lossy)

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
        f"column_bytes_per_{unit}": _column_bytes(m, m.positions),
        # q8 stores: KL(exact || stored) over the k+1 bins, measured by the writer on the unquantised values
        "encoding_kl": (
            {"mean": sum(s["kl_sum"] for s in lossy) / lossy_count, "max": max(s["kl_max"] for s in lossy)}
            if lossy and lossy_count and all("kl_max" in s for s in lossy)
            else None
        ),
        "sampled": sampled,
        "hybrid": hybrid,
        "kept_mass": dist(kept_all),
        "bin_entropy": dist(ent_all),
        "teacher_entropy_mean": (
            # labelers measure the exact entropy on a sample of rows ("entropy_count"), or on all ("count")
            sum(s["entropy_sum"] for s in exact) / sum(s.get("entropy_count", s.get("count", 0)) for s in exact)
            if exact and sum(s.get("entropy_count", s.get("count", 0)) for s in exact)
            else None
        ),
    }
