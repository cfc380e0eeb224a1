"""How a store's columns are encoded on disk: the log-probability encodings and each column's Zarr codecs.

The ``target_logprobs`` column is stored in one of three encodings, recorded as ``targets.encoding`` in the
manifest. Each is inverted by a few lines of numpy (:func:`decode_logprobs`), given the stored (P, K) column
and, for ``q8``, the (P,) float32 ``tail_mass``:

``plain``
    The column holds the values themselves, in ``value_dtype`` (float16 or float32). Every store written before
    the ``encoding`` field existed is ``plain``; arrow stores stay ``plain`` so that pyarrow, polars and DuckDB
    read real log-probabilities.

``delta`` (lossless; the zarr default for float16 and float32 values)
    The column holds the values' IEEE bit patterns as unsigned integers (uint16 for float16, uint32 for float32),
    delta-coded along k, modulo 2**bits::

        stored[:, 0] = bits[:, 0];  stored[:, j] = bits[:, j] - bits[:, j - 1]      (j >= 1)
        values = np.cumsum(stored, axis=1, dtype=np.uint16).view(np.float16)       # the inverse

    Why: log-probs are <= 0 and sorted in descending order, and a negative float's bit pattern grows with its
    magnitude, so the deltas are small non-negative integers whose high bits are almost always zero; with the
    (P, K) array stored k-major and byte-shuffled, zstd removes those bits (25% smaller than shuffled float16
    on a real teacher). The round trip is bit-exact for every value, -0.0 and NaN payloads included.

``q8`` (lossy, ``value_dtype="q8"``)
    Each value becomes an 8-bit code on a fixed grid of ``Q8_STEP`` = 1/16 nat below the position's largest
    log-prob, ``c = min(255, round((max_k lp - lp) / Q8_STEP))``, and the column holds the codes delta-coded
    along k modulo 256 (uint8). Decoding puts the codes back on the grid and shifts each position so that its
    kept mass is exactly ``1 - tail_mass`` (the exact float32 tail is untouched and not re-derived)::

        c = np.cumsum(stored, axis=1, dtype=np.uint8)
        offset = np.log(1 - tail) - np.log(np.exp(-Q8_STEP * c).sum(axis=1))
        values = offset[:, None] - Q8_STEP * c                        # rounded toward -inf into float32

    So the decoded k+1 bins are a distribution (kept mass + tail = 1) and keep the ranking; what is lost is
    where each kept value sits within 1/32 nat. The writer measures, on the unquantised values, the KL
    divergence this introduces (:func:`position_kl`) and records ``kl_sum``, ``kl_max`` and ``count`` in each
    shard's ``stats``.

Every other transform is a standard Zarr v3 codec recorded in the array's own ``zarr.json`` (``transpose``,
``bytes``, ``blosc``, ``zstd`` inside ``sharding_indexed``), so any Zarr v3 implementation decodes the arrays;
no numcodecs-only codec is used (zarr-python warns on those, and other implementations may not have them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import CorruptShardError
from .manifest import TargetSpec
from .shard import NDArray, ShardData

__all__ = [
    "Q8_STEP",
    "decode_logprobs",
    "decode_shard",
    "encode_logprobs",
    "encode_shard",
    "encoding_kl",
    "position_kl",
    "resolve_targets",
    "stored_logprob_dtype",
    "zarr_codecs",
]

# 1/16 nat: on SmolLM2-135M top-32 at T=1 the KL to the exact k+1 bins is 6e-5 nats per position on average
# (2.6e-4 at worst; bench/store_size.py), and 255 steps reach 16 nats below the top-1 (a probability ratio of
# 1e-7), so clipping costs nothing. A step of 1/8 saves ~3 bytes/token for ~4x the KL; 1/32 clips 8% of the
# values at T=1.
Q8_STEP = 1.0 / 16.0
_Q8_WEIGHTS = np.exp(-Q8_STEP * np.arange(256, dtype=np.float64))  # (256,) exp(-Q8_STEP * c)
# The kept mass a q8 decode assumes where the float32 tail is 1.0 (kept mass below float32's resolution): tiny,
# so that kept + tail never exceeds 1, and finite, so that no -inf reaches a loss.
_MIN_KEPT = float(np.finfo(np.float32).tiny)

_BITS = {"float16": "uint16", "float32": "uint32"}


def resolve_targets(backend: str, targets: TargetSpec, existing: TargetSpec | None = None) -> TargetSpec:
    """Replace an ``"auto"`` encoding with a concrete one.

    A store being resumed by :class:`~data.writer.StoreWriter` keeps its own encoding (so a store written
    before ``delta`` existed is finished in ``plain``); a new store gets the backend's default
    (:func:`data.manifest.default_encoding`). An explicit encoding is returned unchanged.
    """
    if targets.encoding == "auto" and existing is not None and existing.value_dtype == targets.value_dtype:
        return dataclasses.replace(targets, encoding=existing.encoding)
    return targets.resolved(backend)


def stored_logprob_dtype(targets: TargetSpec) -> str:
    """The dtype of the ``target_logprobs`` column on disk under the spec's encoding."""
    if targets.encoding == "q8":
        return "uint8"
    if targets.encoding == "delta":
        return _BITS[targets.value_dtype]
    return targets.value_dtype


# ---------------------------------------------------------------- encode / decode


def encode_logprobs(targets: TargetSpec, logprobs: NDArray, tail: NDArray) -> NDArray:
    """The stored form of a (P, K) log-prob block (in ``targets.logprob_dtype``) under ``targets.encoding``.

    ``tail`` (P,) is unused by the encoders (q8's decoder reads it); it is taken so that every encoding has
    one signature.
    """
    enc = targets.encoding
    if enc == "plain":
        return np.ascontiguousarray(logprobs, dtype=targets.value_dtype)
    if enc == "delta":
        bits = np.ascontiguousarray(logprobs, dtype=targets.value_dtype).view(_BITS[targets.value_dtype])
        out = bits.copy()
        np.subtract(bits[:, 1:], bits[:, :-1], out=out[:, 1:])  # unsigned: wraps modulo 2**bits
        return out
    if enc == "q8":
        lp = np.asarray(logprobs, dtype=np.float64)
        with np.errstate(invalid="ignore"):  # an all -inf row gives nan: coded as 255 below
            top = lp.max(axis=1, keepdims=True)  # k >= 1
            steps = np.rint((top - lp) / Q8_STEP)  # (P, K) >= 0; -inf values give +inf
        codes = np.where(np.isfinite(steps), steps, 255.0).clip(0, 255).astype(np.uint8)
        out = codes.copy()
        np.subtract(codes[:, 1:], codes[:, :-1], out=out[:, 1:])  # uint8 wraps: unsorted rows still invert
        return out
    raise ValueError(f"no encoder for targets.encoding={enc!r} (resolve 'auto' first)")


def decode_logprobs(targets: TargetSpec, stored: NDArray, tail: NDArray, where: str = "shard") -> NDArray:
    """Invert :func:`encode_logprobs`: (P, K) stored column -> (P, K) ``targets.logprob_dtype`` log-probs.

    Raises:
        CorruptShardError: the stored column's dtype or shape does not fit the manifest's encoding.
    """
    expect = stored_logprob_dtype(targets)
    if stored.dtype != np.dtype(expect) or stored.ndim != 2 or stored.shape[1] != targets.k:
        raise CorruptShardError(
            f"{where}: column 'target_logprobs' is {stored.dtype}{tuple(stored.shape)}, but encoding "
            f"{targets.encoding!r} stores {expect}(P, {targets.k})"
        )
    enc = targets.encoding
    if enc == "plain":
        return stored
    if enc == "delta":
        decoded: NDArray = np.cumsum(stored, axis=1, dtype=stored.dtype).view(targets.value_dtype)
        return decoded
    if enc != "q8":
        raise ValueError(f"no decoder for targets.encoding={enc!r} (resolve 'auto' first)")
    if tail.dtype != np.float32 or tail.shape != (stored.shape[0],):
        raise CorruptShardError(f"{where}: q8 values need a (P,) float32 tail_mass, got {tail.dtype}{tail.shape}")
    codes = np.cumsum(stored, axis=1, dtype=np.uint8)
    kept = np.clip(1.0 - tail.astype(np.float64), _MIN_KEPT, 1.0)
    offset = np.log(kept) - np.log(_Q8_WEIGHTS[codes].sum(axis=1))  # the sum is >= exp(-255/16) > 0
    exact = offset[:, None] - Q8_STEP * codes  # (P, K) float64
    out: NDArray = exact.astype(np.float32)
    up = out.astype(np.float64) > exact  # round toward -inf, so that sum(exp(out)) <= 1 - tail
    out[up] = np.nextafter(out[up], np.float32(-np.inf))
    return out


def encode_shard(targets: TargetSpec, data: ShardData) -> tuple[ShardData, dict[str, float]]:
    """The shard as stored, and the statistics of a lossy encoding measured on ``data``'s exact values.

    Returns:
        ``data`` with ``target_logprobs`` in its stored form, and for q8 ``{"kl_sum", "kl_max", "count"}``:
        the summed and largest KL(exact || decoded) over the k+1 bins, and the number of positions (empty
        for the lossless encodings).
    """
    if targets.sampled or data.target_logprobs is None:  # ids and counts are stored as they are
        return data, {}
    stored = encode_logprobs(targets, data.target_logprobs, data.tail_mass)
    stats: dict[str, float] = {}
    if targets.encoding == "q8":
        decoded = decode_logprobs(targets, stored, data.tail_mass)
        kl = position_kl(data.target_logprobs, data.tail_mass, decoded)
        stats = {"kl_sum": float(kl.sum()), "kl_max": float(kl.max(initial=0.0)), "count": float(kl.shape[0])}
    return dataclasses.replace(data, target_logprobs=stored), stats


def decode_shard(targets: TargetSpec, data: ShardData, where: str = "shard") -> ShardData:
    """A shard as read from disk -> the same shard with log-probs decoded (``targets.logprob_dtype``).

    Sampled shards have no log-probs and are returned as they are.
    """
    if targets.sampled:
        return data
    if data.target_logprobs is None:
        raise CorruptShardError(f"{where}: column 'target_logprobs' is missing")
    values = decode_logprobs(targets, data.target_logprobs, data.tail_mass, where)
    return dataclasses.replace(data, target_logprobs=values)


# ---------------------------------------------------------------- KL of a lossy encoding


def position_kl(exact_logprobs: npt.ArrayLike, tail: npt.ArrayLike, decoded_logprobs: npt.ArrayLike) -> NDArray:
    """KL(exact || decoded) in nats per position, over the k+1 bins (the kept ids plus the tail bin).

    Both distributions share the tail mass; each is normalised over its k+1 bins first (the exact values sum
    to 1 - tail only to rounding), so the result is a true KL divergence, >= 0.

    Args:
        exact_logprobs: (P, K) the unquantised log-probs.
        tail: (P,) the exact tail mass.
        decoded_logprobs: (P, K) what a reader gets back.

    Returns:
        (P,) float64.
    """
    x = np.asarray(exact_logprobs, dtype=np.float64)
    q = np.asarray(decoded_logprobs, dtype=np.float64)
    t = np.asarray(tail, dtype=np.float64)
    p = np.exp(x)
    zp, zq = p.sum(axis=1) + t, np.exp(q).sum(axis=1) + t
    with np.errstate(invalid="ignore", divide="ignore"):
        # KL = sum_j (p_j / zp) (x_j - q_j) + log(zq / zp): the tail bin's term folds into the log
        kept = np.where(p > 0, p * (x - q), 0.0).sum(axis=1) / zp
        kl: NDArray = np.where(zp > 0, kept + np.log(zq / zp), 0.0)
    return kl


def encoding_kl(
    exact_logprobs: npt.ArrayLike, tail: npt.ArrayLike, decoded_logprobs: npt.ArrayLike
) -> tuple[float, float]:
    """Mean and max over positions of :func:`position_kl` (nats); (0.0, 0.0) for no positions."""
    kl = position_kl(exact_logprobs, tail, decoded_logprobs)
    if not kl.size:
        return 0.0, 0.0
    return float(kl.mean()), float(kl.max())


# ---------------------------------------------------------------- zarr codecs

# Levels measured on a real store (SmolLM2-135M, top-32, 8,160 positions per shard; bench/store_size.py), one
# core: zstd 17 is where the id column stops shrinking (48.8 bytes/token vs 52.5 at blosc level 5; 16 gives 52.8,
# 19 the same 48.8 at 0.8x the speed), and decoding stays ~800 MB/s. Blosc level 7 on the values is within
# 0.5 bytes/token of level 9 and writes ~2x faster, so a shard encodes at ~175k positions/s per core (the old
# default: ~300k) in the labeler's writer thread, beside the teacher's forward passes.
_ID_ZSTD_LEVEL = 17
_VALUE_BLOSC_LEVEL = 7


def zarr_codecs(name: str, arr: NDArray) -> tuple[list[Any], list[Any]]:
    """The ``filters`` and ``compressors`` (``create_array`` arguments) of one column of a zarr shard.

    All are Zarr v3 codecs recorded in the array's ``zarr.json``:

    * ``target_logprobs`` in a delta/q8 encoding (unsigned ints, (P, K)): ``transpose`` to k-major, so that
      each rank's deltas lie together, then blosc(zstd 7, byte shuffle).
    * ids (``input_ids``, ``target_ids``, a hybrid store's ``tail_ids``, masked-lm ``labels``): zstd 17 without
      shuffle: a BPE id's high byte depends on its low byte, which shuffling splits apart.
    * other floats (``tail_mass``, plain log-probs): blosc(zstd 7, byte shuffle): sign and exponent bytes repeat.
    * ``keys`` (random bytes): blosc(zstd 1), no shuffle; offsets, positions and counts (``target_counts``,
      ``tail_counts``): blosc(zstd 5, byte shuffle).
    """
    from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

    size = arr.dtype.itemsize
    if name == "keys":
        return [], [BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle", typesize=1)]
    if name == "target_logprobs" and arr.dtype.kind == "u" and arr.ndim == 2:
        return [TransposeCodec(order=(1, 0))], [
            BloscCodec(cname="zstd", clevel=_VALUE_BLOSC_LEVEL, shuffle="shuffle", typesize=size)
        ]
    if name in ("input_ids", "target_ids", "tail_ids", "labels", "text") and arr.dtype.kind == "u":
        return [], [ZstdCodec(level=_ID_ZSTD_LEVEL)]
    if arr.dtype.kind == "f":
        return [], [BloscCodec(cname="zstd", clevel=_VALUE_BLOSC_LEVEL, shuffle="shuffle", typesize=size)]
    return [], [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=size)]
