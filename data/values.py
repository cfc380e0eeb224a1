"""Value checks of a decoded shard: what a checksum cannot prove (that the writer was sane).

A checksum proves a store is what its writer wrote. These checks prove that what it wrote can be trained on:
log-probs finite, <= 0 and non-increasing along each top-k row; kept mass + tail within a stated tolerance of 1;
tail in [0, 1]; ids below their bounds and distinct within a position; sampled counts >= 1 summing to N; a hybrid
store's tail draws as sampled ones, none of them among the position's top-k ids, and none where the tail is 0.
:meth:`data.shard.ShardData.validate` runs them after the shape and offset checks, so every reader (verify,
``StoreReader.shard``, the training loader, export) and the writer run them on every shard.

Every check is vectorised over the whole shard and answers pass/fail first with the cheapest test that decides
it (a max, a comparison of neighbours on the raw bit patterns); only a failing shard pays for finding the first
bad example and position, so a healthy shard costs a few passes over its (P, K) columns
(BENCHMARKS.md, section 3).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .errors import CorruptShardError

if TYPE_CHECKING:
    from .manifest import TargetSpec
    from .shard import NDArray, ShardData

__all__ = ["MASS_SLACK", "MAX_LOGPROB", "UNIT_ROUNDOFF", "check_values", "kept_mass_tolerance"]

# No epsilon above 0: log softmax computes x_max - logsumexp(x) with logsumexp >= x_max in float32 (the max term
# alone contributes exp(0) = 1 to the sum), so the labeler's values are <= 0, and rounding to float16 keeps the
# sign (a tiny negative value becomes -0.0, never positive). q8 decodes round toward -inf. A positive log-prob is
# therefore never rounding, always a bug.
MAX_LOGPROB = 0.0

# Unit roundoff of each decoded value dtype (half an ulp, relative). q8 decodes to float32 (rounded down).
UNIT_ROUNDOFF: dict[str, float] = {"float16": 2.0**-11, "float32": 2.0**-24}

# Absolute slack on |kept + tail - 1| beyond the rounding of the stored values: the labeler's float32
# log-softmax over a vocabulary of up to ~2**17 ids shifts every value by the rounding of one logsumexp (a few
# float32 ulps of a value ~20, ~1e-6 relative), and the float32 sums here add ~k * 6e-8. 1e-4 covers both with
# a wide margin and still refuses any tail that is wrong by more than a hundredth of a percent of the mass.
MASS_SLACK = 1e-4

_SIGN = {"float16": 0x8000, "float32": 0x80000000}  # bit pattern of -0.0
_NEG_INF = {"float16": 0xFC00, "float32": 0xFF800000}  # bit pattern of -inf; negative NaNs lie above it
_BITS = {"float16": np.uint16, "float32": np.uint32}
# exp() of every float16 bit pattern, so that a float16 shard's kept mass is one gather and a row sum, with no
# float16 -> float32 conversion pass (numpy's float16 arithmetic is several times slower than float32's).
with np.errstate(over="ignore", invalid="ignore"):
    _EXP_FLOAT16 = np.exp(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32))

# Private switch for bench/loader.py only (measures what these checks cost); never turned off elsewhere.
_ENABLED = True


def kept_mass_tolerance(dtype: str, k: int) -> float:
    """Largest |sum(exp(logprobs)) + tail - 1| a sane shard of decoded ``dtype`` values shows at ``k`` kept ids.

    The tail is exact float32, from the unquantised values. Each kept value lp_j is rounded with a relative error
    of at most u (:data:`UNIT_ROUNDOFF`), so its probability p_j = exp(lp_j) moves by at most p_j * |lp_j| * u,
    and the kept mass by at most u * sum_j p_j |ln p_j| <= u * ln(k) (the entropy of k bins holding at most mass
    1, maximal when they are uniform, for k >= 3). float16 at k = 32: 4.9e-4 * 3.47 + 1e-4 = 1.8e-3. The float16
    bound is used for every dtype: float32 and q8 values may have been float16 once (a store re-encoded).
    """
    # float32 (and q8) values may be float16 values widened, e.g. a float16 store re-encoded to q8 or float32
    # (bench/store_size.py does exactly that): they carry float16 rounding, which the bound must admit.
    u = max(UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF["float16"])
    return u * math.log(max(k, 3)) + MASS_SLACK


def check_values(data: ShardData, task: str, targets: TargetSpec, vocab_size: int, where: str) -> None:
    """Raise CorruptShardError naming the first bad example and position if a shard's values are not sane.

    Expects a shard whose shapes, dtypes and token/position offsets :meth:`ShardData.validate` has checked.

    Raises:
        CorruptShardError: ``"<where>: example r, position i: <found>; expected <what>"``.
    """
    if not _ENABLED:
        return
    ids = data.input_ids
    if ids.size and int(ids.max()) >= vocab_size:
        t = int(np.argmax(ids >= vocab_size))
        r, i = _locate(data.token_offsets, t)
        raise CorruptShardError(
            f"{where}: example {r}, token {i}: input id {int(ids[t])}; expected < vocab_size {vocab_size}"
        )
    if data.token_spans is not None:
        _check_spans(data, where)
    tail = data.tail_mass
    if not np.all((tail >= 0.0) & (tail <= 1.0)):  # NaN fails both comparisons
        p = int(np.argmax(~((tail >= 0.0) & (tail <= 1.0))))
        raise CorruptShardError(f"{_at(data, where, p)}: tail_mass {float(tail[p])!r}; expected a mass in [0, 1]")
    if targets.sampled:
        _check_sampled(data, targets, where)
        return
    _check_topk(data, targets, where)
    if targets.hybrid:
        _check_hybrid_tail(data, targets, where)


def _check_topk(data: ShardData, targets: TargetSpec, where: str) -> None:
    """Top-k ids below num_classes and distinct within a position; their log-probs sane (see the checks below)."""
    tid, lp, tail = data.target_ids, data.target_logprobs, data.tail_mass
    assert lp is not None  # validate checked the columns against the spec
    if tid.size and int(tid.max()) >= targets.num_classes:
        p, j = divmod(int(np.argmax(tid >= targets.num_classes)), tid.shape[1])
        raise CorruptShardError(
            f"{_at(data, where, p)}: target id {int(tid[p, j])} at rank {j}; "
            f"expected < num_classes {targets.num_classes}"
        )
    if not lp.size:
        return
    _check_logprobs(data, lp, where)
    _check_kept_mass(data, lp, tail, targets, where)
    if tid.shape[1] > 1:
        s = np.sort(tid, axis=1)
        if np.count_nonzero(s[:, 1:] == s[:, :-1]):
            p = int(np.argmax((s[:, 1:] == s[:, :-1]).any(axis=1)))
            row = s[p]
            dup = int(row[1:][row[1:] == row[:-1]][0])
            raise CorruptShardError(
                f"{_at(data, where, p)}: target id {dup} appears more than once among the top-{tid.shape[1]} "
                f"ids {tid[p].tolist()}; expected distinct ids"
            )


def _check_logprobs(data: ShardData, lp: NDArray, where: str) -> None:
    """Finite, <= MAX_LOGPROB and non-increasing along each row, decided on the IEEE bit patterns.

    For non-positive floats the bit pattern grows with the magnitude (+0.0 = 0, then -0.0, ..., the most negative
    finite value, -inf, negative NaNs), so a row of sane values is exactly a row whose bits never decrease, whose
    first value is +0.0 or negative and finite, whose second is not +0.0 or positive (those sort below -0.0) and
    whose last is below -inf's pattern: one comparison of neighbours and three columns, with no float
    conversion. The slow path below only runs on a failing shard, to name what it found.
    """
    dtype = str(lp.dtype)
    sign, neg_inf = _SIGN[dtype], _NEG_INF[dtype]
    bits = lp.view(_BITS[dtype])
    first = bits[:, 0]
    ok = bool(np.all((first == 0) | ((first >= sign) & (first < neg_inf))))
    ok = ok and bool(np.all(bits[:, -1] < neg_inf))
    if ok and bits.shape[1] > 1:
        ok = bool(np.all(bits[:, 1] >= sign)) and not np.count_nonzero(bits[:, 1:] < bits[:, :-1])
    if ok:
        return
    # the first position whose row breaks any of the rules, element by element
    valid = (bits >= sign) & (bits < neg_inf)
    valid[:, 0] |= first == 0
    rises = np.zeros_like(valid)
    rises[:, 1:] = bits[:, 1:] < bits[:, :-1]
    bad = ~valid | rises
    p = int(np.argmax(bad.any(axis=1)))
    j = int(np.argmax(bad[p]))
    v = float(lp[p, j])
    if valid[p, j]:
        found = f"log-prob {v!r} at rank {j} is above {float(lp[p, j - 1])!r} at rank {j - 1}"
        expected = "log-probs non-increasing along the top-k (most probable first)"
    else:
        what = "NaN" if math.isnan(v) else "infinite" if math.isinf(v) else "positive" if v > 0 else "+0.0 below rank 0"
        found = f"log-prob {v!r} at rank {j} ({what})"
        expected = f"finite log-probs <= {MAX_LOGPROB}"
    raise CorruptShardError(f"{_at(data, where, p)}: {found}; expected {expected}")


def _check_kept_mass(data: ShardData, lp: NDArray, tail: NDArray, targets: TargetSpec, where: str) -> None:
    """sum(exp(logprobs)) + tail_mass within :func:`kept_mass_tolerance` of 1 at every position."""
    dtype = str(lp.dtype)
    kept = _EXP_FLOAT16[lp.view(np.uint16)].sum(axis=1) if dtype == "float16" else np.exp(lp).sum(axis=1)
    err = np.abs(kept + tail - 1.0)
    tol = kept_mass_tolerance(dtype, lp.shape[1])
    if np.all(err <= tol):
        return
    p = int(np.argmax(err > tol))
    raise CorruptShardError(
        f"{_at(data, where, p)}: kept mass {float(kept[p]):.6g} + tail_mass {float(tail[p]):.6g} = "
        f"{float(kept[p] + tail[p]):.6g}; expected 1 within {tol:.2g} ({dtype} rounding at k={lp.shape[1]})"
    )


def _check_sampled(data: ShardData, targets: TargetSpec, where: str) -> None:
    """Ragged sampled targets: every position holds 1..k ids, checked as :func:`_check_draws`; no tail."""
    assert data.target_offsets is not None and data.target_counts is not None
    P = data.num_positions
    _check_run(data.target_offsets, int(data.target_counts.shape[0]), "target", where)
    n = np.diff(data.target_offsets)
    wrong = (n < 1) | (n > targets.k)
    if np.any(wrong):
        p = int(np.argmax(wrong))
        raise CorruptShardError(
            f"{_at(data, where, p)}: 'target_offsets' gives {int(n[p])} ids; expected 1..k={targets.k} ids per "
            "position (offsets rising from 0)"
        )
    _check_draws(data, "target", data.target_ids, data.target_counts, data.target_offsets, targets, where)
    if P and np.any(data.tail_mass != 0):
        p = int(np.argmax(data.tail_mass != 0))
        raise CorruptShardError(
            f"{_at(data, where, p)}: tail_mass {float(data.tail_mass[p])!r}; a sampled store's tail_mass must be 0 "
            "(every draw is stored)"
        )


def _check_hybrid_tail(data: ShardData, targets: TargetSpec, where: str) -> None:
    """A hybrid store's tail draws: 0 ids where the tail mass is 0, else 1..min(num_samples, num_classes - k),
    checked as :func:`_check_draws`, and none of them among the position's top-k ids (the draws come from the
    teacher restricted to the other ids, so a kept id there would count its mass twice)."""
    assert data.tail_offsets is not None and data.tail_counts is not None and data.tail_ids is not None
    off, ids = data.tail_offsets, data.tail_ids
    _check_run(off, int(data.tail_counts.shape[0]), "tail", where)
    n = np.diff(off)  # (P,)
    empty = data.tail_mass == 0
    wrong = np.where(empty, n != 0, (n < 1) | (n > targets.tail_bound))
    if np.any(wrong):
        p = int(np.argmax(wrong))
        want = "none (its tail_mass is 0)" if empty[p] else f"1..min(num_samples, num_classes - k)={targets.tail_bound}"
        raise CorruptShardError(f"{_at(data, where, p)}: 'tail_offsets' gives {int(n[p])} tail ids; expected {want}")
    _check_draws(data, "tail", ids, data.tail_counts, off, targets, where, skip=empty)
    if ids.size:
        pos = np.repeat(np.arange(n.shape[0]), n)  # (U,) the position of each entry
        kept = (data.target_ids[pos] == ids[:, None]).any(axis=1)  # (U,) the entry repeats a top-k id
        if np.any(kept):
            e = int(np.argmax(kept))
            raise CorruptShardError(
                f"{_at_entry(data, where, e, off, 'tail')}: tail id {int(ids[e])} is one of the position's top-"
                f"{targets.k} ids; expected tail ids outside the top-k"
            )


def _check_draws(
    data: ShardData,
    kind: str,
    ids: NDArray,
    counts: NDArray,
    off: NDArray,
    targets: TargetSpec,
    where: str,
    skip: NDArray | None = None,
) -> None:
    """Ragged draws (``kind`` "target": a sampled store's, "tail": a hybrid store's) whose offsets the caller
    checked (:func:`_check_run`, and that none falls): ids strictly ascending within a position (so unique) and
    below num_classes, each drawn at least once, and each position's counts summing to num_samples (except the
    positions ``skip`` (P,) bool marks, which the caller checked hold no draws)."""
    U, P = int(counts.shape[0]), data.num_positions
    name = "target id" if kind == "target" else "tail id"
    if U and int(ids.max()) >= targets.num_classes:
        e = int(np.argmax(ids >= targets.num_classes))
        raise CorruptShardError(
            f"{_at_entry(data, where, e, off, kind)}: {name} {int(ids[e])}; expected < num_classes "
            f"{targets.num_classes}"
        )
    if U and int(counts.min()) < 1:
        e = int(np.argmax(counts < 1))
        raise CorruptShardError(f"{_at_entry(data, where, e, off, kind)}: a sampled id has a count of 0; expected >= 1")
    if P:
        # differences of the running sum: a position with no draws (hybrid, tail 0) sums to 0, where reduceat
        # would return the next entry's count
        running = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # (U + 1,)
        sums = running[off[1:]] - running[off[:-1]]  # (P,)
        wrong = sums != targets.num_samples
        if skip is not None:
            wrong &= ~skip
        if np.any(wrong):
            p = int(np.argmax(wrong))
            raise CorruptShardError(
                f"{_at(data, where, p)}: the counts of a position do not sum to num_samples={targets.num_samples} "
                f"(they sum to {int(sums[p])})"
            )
    falls = np.diff(ids.astype(np.int64)) <= 0  # (U - 1,): within a position ids must strictly rise
    falls[off[1:-1][(off[1:-1] > 0) & (off[1:-1] < U)] - 1] = False  # a position's first id may be anything
    if np.any(falls):
        e = int(np.argmax(falls)) + 1
        raise CorruptShardError(
            f"{_at_entry(data, where, e, off, kind)}: {name} {int(ids[e])} follows {int(ids[e - 1])}; expected the "
            "ids of a position unique and ascending"
        )


def _check_run(off: NDArray, entries: int, kind: str, where: str) -> None:
    """A ragged axis's (P + 1,) offsets start at 0 and end at its length U."""
    if off[0] != 0 or off[-1] != entries:
        raise CorruptShardError(
            f"{where}: '{kind}_offsets' runs from {int(off[0])} to {int(off[-1])}; expected 0 to {entries}"
        )


# ---------------------------------------------------------------- naming the first bad row


def _check_spans(data: ShardData, where: str) -> None:
    """A store with spans: each token's byte range [start, end) lies inside its example's text, and starts and ends
    never fall from one token to the next within an example (a character split over two byte-level tokens gives
    both the same range; a special token an empty one)."""
    spans, to = data.token_spans, data.token_offsets
    assert spans is not None and data.text_offsets is not None
    start, end = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)  # (T,)
    length = np.repeat(np.diff(data.text_offsets), np.diff(to))  # (T,) the text length of each token's example
    outside = (start < 0) | (start > end) | (end > length)
    if np.any(outside):
        t = int(np.argmax(outside))
        r, i = _locate(to, t)
        raise CorruptShardError(
            f"{where}: example {r}, token {i}: span [{int(start[t])}, {int(end[t])}); expected 0 <= start <= end <= "
            f"{int(length[t])}, the bytes of its text"
        )
    first = np.zeros(len(start), dtype=bool)
    first[to[:-1][np.diff(to) > 0]] = True  # an example's first token is not compared with the previous example's
    falls = ~first[1:] & ((start[1:] < start[:-1]) | (end[1:] < end[:-1]))
    if np.any(falls):
        t = int(np.argmax(falls)) + 1
        r, i = _locate(to, t)
        raise CorruptShardError(
            f"{where}: example {r}, token {i}: span [{int(start[t])}, {int(end[t])}) after [{int(start[t - 1])}, "
            f"{int(end[t - 1])}); expected spans in text order"
        )


def _locate(offsets: NDArray, index: int) -> tuple[int, int]:
    """(example, index within it) of flat ``index`` on an axis whose example starts are ``offsets``."""
    r = int(np.searchsorted(offsets, index, side="right")) - 1
    return r, index - int(offsets[r])


def _at(data: ShardData, where: str, p: int) -> str:
    r, i = _locate(data.position_offsets, p)
    return f"{where}: example {r}, position {i}"


def _at_entry(data: ShardData, where: str, e: int, off: NDArray, kind: str = "target") -> str:
    """Where flat entry ``e`` of a ragged axis whose position starts are ``off`` lies."""
    p = int(np.searchsorted(off, e, side="right")) - 1
    what = "sampled entry" if kind == "target" else "tail entry"
    return f"{_at(data, where, p)}, {what} {e - int(off[p])}"
