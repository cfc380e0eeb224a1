"""``pipeline inspect``: what a store holds, what it cost on disk, and how much of the teacher it kept."""

from __future__ import annotations

from typing import Any

import numpy as np

from data.manifest import Manifest
from data.reader import StoreReader

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
    for s in range(min(reader.num_shards, max_shards or reader.num_shards)):
        data = reader.shard(s)
        kept.append(1.0 - data.tail_mass.astype(np.float64))
        entropy.append(_bin_entropy(data.target_logprobs, data.tail_mass))
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

    unit = "token" if m.granularity == "token" else "example"
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
        "kept_mass": dist(kept_all),
        "bin_entropy": dist(ent_all),
        "teacher_entropy_mean": (
            # labelers measure the exact entropy on a sample of rows ("entropy_count"), or on all ("count")
            sum(s["entropy_sum"] for s in exact) / sum(s.get("entropy_count", s.get("count", 0)) for s in exact)
            if exact and sum(s.get("entropy_count", s.get("count", 0)) for s in exact)
            else None
        ),
    }
