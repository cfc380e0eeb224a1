"""What the labeler computes from a teacher's output rows: top-k log-probs with the exact tail, sampled ids, or
both (hybrid: the top-k, plus ids drawn from the teacher restricted to the other ids).

Both take (N, H) hidden states or (N, V) logits of the positions to label, run the output head on ``chunk`` rows
at a time (a (chunk, V) float32 block is the largest thing that exists), and return CPU tensors: only the kept
ids and values and a few per-row scalars leave the device. ``stages.label`` calls them once per batch.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.manifest import DRAW_SCHEMES  # how sampled and hybrid stores draw their ids (``_draw``)
from .losses import PRECISE_TAIL  # the options only (no torch): the student's tail bin uses the same bound

if TYPE_CHECKING:
    import torch

    from .models import OutputHead

__all__ = [
    "CPU_SUB_ROWS",
    "DEFAULT_DRAWS",
    "DRAW_SCHEMES",
    "ENTROPY_EVERY",
    "HEAD_DTYPES",
    "TeacherOutputError",
    "hybrid_chunked",
    "per_example",
    "sample_chunked",
    "topk_chunked",
    "topk_rows",
]

# Precision of the output head's matmul (``stages.models.OutputHead``): "auto" = float32 where the head is a
# separable linear layer of a non-float32 teacher, "float32" = that or refuse, "model" = the teacher's own dtype
# (the result upcast). Here, without torch, so that the CLI can list the choices.
HEAD_DTYPES = ("auto", "float32", "model")
DEFAULT_DRAWS = "multinomial"  # pipeline label --draws (README, *Which targets*)
_CDF_ELEMENTS = 1 << 23  # a systematic draw's float64 cumulative distribution is built this many elements at a time

# The teacher's exact entropy is a statistic for `inspect`, not a target: measure it on every 16th row only.
ENTROPY_EVERY = 16
CPU_SUB_ROWS = 16  # 16 x 49,152 x 4 B = 3 MB of float32 logits: stays in cache across the per-row passes


class TeacherOutputError(ValueError):
    """The teacher's logits at a row are NaN or infinite: there is no distribution to store. ``row`` is the row's
    index in the call (``stages.label`` turns it into the example and position)."""

    def __init__(self, row: int, message: str = "") -> None:
        super().__init__(message or f"the teacher's logits are not finite (NaN or inf) at row {row}")
        self.row = row


def _require_finite(lse: torch.Tensor, first: int) -> None:
    """Refuse rows whose logsumexp is not finite: a NaN or +inf logit anywhere in the row, or no finite logit."""
    import torch

    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        raise TeacherOutputError(first + int(bad.nonzero()[0, 0]))


def topk_chunked(
    rows: torch.Tensor, head: OutputHead, k: int, temperature: float, chunk: int, labels: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Top-k of log softmax(z / T) over the full vocabulary, with the tail mass, for N rows.

    Args:
        rows: (N, H) hidden states or (N, V) logits.
        labels: (N,) int64 hard labels (-1 = none), for the teacher's own cross-entropy at T=1, or None.

    Returns CPU tensors: ids (N, k) int64, logprobs (N, k) float32 (top z minus logsumexp: the (c, V) log-softmax
    is never built), tail (N,) float32, nll (N,) float32 (at T=1; 0 where there is no label), and entropy
    (M,) float32 at T for every 16th row. The output head runs on ``chunk`` rows at a time (an efficient
    matmul); on CPU the per-row passes (logsumexp, top-k, tail, statistics) then run on ``CPU_SUB_ROWS`` rows
    of those logits at a time, which stay in cache across the passes where a whole chunk would go to DRAM and
    back for each (bench/label_overhead.py: labeled/bare 0.936 -> 0.955 at T=1 on SmolLM2, identical outputs).
    """
    import torch

    out: dict[str, list[torch.Tensor]] = {"ids": [], "logprobs": [], "tail": [], "entropy": [], "nll": []}
    for i in range(0, rows.shape[0], chunk):
        raw = head.logits(rows[i : i + chunk])  # (c, V) float32
        _topk_blocks(raw, i, k, temperature, labels, out)
    return {key: torch.cat(parts) for key, parts in out.items() if parts}


def _topk_blocks(
    raw: torch.Tensor,
    first: int,
    k: int,
    temperature: float,
    labels: torch.Tensor | None,
    out: dict[str, list[torch.Tensor]],
) -> None:
    """:func:`topk_rows` over a (c, V) chunk whose first row is row ``first`` of the call, in blocks of
    ``CPU_SUB_ROWS`` rows on CPU (the whole chunk on a GPU), appending each result to ``out``."""
    sub = CPU_SUB_ROWS if raw.device.type == "cpu" else raw.shape[0]
    for j in range(0, raw.shape[0], sub):
        block = raw[j : j + sub]  # (r, V), r <= sub: a chunk's last block may be short
        # the labels of exactly this block's rows (slicing by ``sub`` ran into the next chunk's labels)
        lab = labels[first + j : first + j + block.shape[0]] if labels is not None else None
        for key, value in topk_rows(block, first + j, k, temperature, lab).items():
            out[key].append(value)


def topk_rows(
    raw: torch.Tensor, first: int, k: int, temperature: float, labels: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """:func:`topk_chunked` on (r, V) float32 logits whose first row is row ``first`` of the call.

    The tail is 1 - sum(kept) in float64 from the unquantised values; rows where that is below ``PRECISE_TAIL``
    (1e-2: the ~2e-6 rounding of the float32 log-probs would be >1e-4 of the tail there) get
    exp(logsumexp of the non-kept logits - lse) instead.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    z = raw if temperature == 1.0 else raw / temperature
    lse = torch.logsumexp(z, dim=-1)  # (r,)
    _require_finite(lse, first)
    top_z, top_id = torch.topk(z, k, dim=-1)  # (r, k), most probable first
    top_lp = top_z - lse[:, None]
    tail = (1.0 - top_lp.double().exp().sum(-1)).clamp_min(0.0)  # (r,) float64
    small = (tail < PRECISE_TAIL).nonzero()[:, 0]
    if len(small) and k < z.shape[-1]:
        rest = z[small].scatter(-1, top_id[small], float("-inf"))
        tail[small] = (torch.logsumexp(rest, dim=-1) - lse[small]).double().exp()
    sub = _entropy_rows(first, z.shape[0], z.device)
    if len(sub):
        p = torch.softmax(z[sub], dim=-1)
        out["entropy"] = (lse[sub] - (p * z[sub]).sum(-1)).cpu()
    if labels is not None:
        lab = labels.to(raw.device)
        lse1 = lse if temperature == 1.0 else torch.logsumexp(raw, dim=-1)
        out["nll"] = ((lse1 - raw.gather(-1, lab.clamp_min(0)[:, None])[:, 0]) * (lab >= 0)).cpu()
    out["ids"] = top_id.cpu()
    out["logprobs"] = top_lp.cpu()
    out["tail"] = tail.float().cpu()
    return out


def sample_chunked(
    rows: torch.Tensor,
    head: OutputHead,
    num_samples: int,
    temperature: float,
    chunk: int,
    labels: torch.Tensor | None,
    seed: list[int],
    scheme: str = DEFAULT_DRAWS,
) -> dict[str, torch.Tensor]:
    """Draw ``num_samples`` ids from softmax(z / T) for N rows (``scheme``: "systematic" or "multinomial", as
    :func:`_draw` explains); keep the unique ids and counts.

    Args:
        rows: (N, H) hidden states or (N, V) logits.
        labels: as for :func:`topk_chunked`.
        seed: seed words (labeling seed, unit, batch within the unit); chunk c of the batch draws from a
            generator seeded with SeedSequence(seed + [c]), so a resumed or multi-process run, which labels each
            unit with the same batches and chunks, draws exactly the same ids (on the same kind of device: CPU
            and CUDA generators give different streams).

    Returns CPU tensors: ids (U,) int64 and counts (U,) int64, each row's unique ids in ascending order, rows one
    after another; unique (N,) int64, the unique ids of each row; kept (N,) float32, the teacher's probability of
    the ids drawn; nll (N,) and entropy (M,) as for :func:`topk_chunked`. Only those leave the device.
    """
    import torch

    out: dict[str, list[torch.Tensor]] = {"ids": [], "counts": [], "unique": [], "kept": [], "entropy": [], "nll": []}
    for c, i in enumerate(range(0, rows.shape[0], chunk)):
        raw = head.logits(rows[i : i + chunk])  # (c, V) float32
        z = raw if temperature == 1.0 else raw / temperature
        lse = torch.logsumexp(z, dim=-1)  # (c,)
        _require_finite(lse, i)
        probs = torch.softmax(z, dim=-1)  # (c, V) float32
        ids, counts, unique = _draw(probs, num_samples, [*seed, c], None, scheme)
        row = torch.repeat_interleave(torch.arange(z.shape[0], device=z.device), unique)  # (U_c,)
        out["kept"].append(torch.zeros(z.shape[0], device=z.device).index_add_(0, row, probs[row, ids]).cpu())
        sub = _entropy_rows(i, z.shape[0], z.device)
        out["entropy"].append((lse[sub] - (probs[sub] * z[sub]).sum(-1)).cpu())
        if labels is not None:
            lab = labels[i : i + chunk].to(raw.device)
            lse1 = lse if temperature == 1.0 else torch.logsumexp(raw, dim=-1)
            out["nll"].append(((lse1 - raw.gather(-1, lab.clamp_min(0)[:, None])[:, 0]) * (lab >= 0)).cpu())
        out["ids"].append(ids.cpu())
        out["counts"].append(counts.cpu())
        out["unique"].append(unique.cpu())
    return {key: torch.cat(parts) for key, parts in out.items() if parts}


def hybrid_chunked(
    rows: torch.Tensor,
    head: OutputHead,
    k: int,
    num_samples: int,
    temperature: float,
    chunk: int,
    labels: torch.Tensor | None,
    seed: list[int],
    scheme: str = DEFAULT_DRAWS,
) -> dict[str, torch.Tensor]:
    """The top-k of :func:`topk_chunked` (the same values, computed the same way), plus ``num_samples`` ids drawn
    (``scheme``, as for :func:`sample_chunked`) from softmax(z / T) restricted to the ids outside each row's top-k,
    kept as unique ids and counts. A row whose stored (float32) tail is exactly 0 keeps no draws: they would carry
    no mass.

    Args:
        rows: (N, H) hidden states or (N, V) logits; V > k, so that every row has ids to draw from.
        labels: as for :func:`topk_chunked`.
        seed: as for :func:`sample_chunked`: chunk c draws from a generator seeded with SeedSequence(seed + [c]).

    Returns CPU tensors: ids (N, k) int64, logprobs (N, k) float32, tail (N,) float32, nll (N,) and entropy (M,)
    as for :func:`topk_chunked`; tail_ids (U,) int64 and tail_counts (U,) int64, each row's unique tail ids in
    ascending order, rows one after another; tail_unique (N,) int64, the unique tail ids of each row.
    """
    import torch

    keys = ("ids", "logprobs", "tail", "entropy", "nll", "tail_ids", "tail_counts", "tail_unique")
    out: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for c, i in enumerate(range(0, rows.shape[0], chunk)):
        raw = head.logits(rows[i : i + chunk])  # (c, V) float32
        n_before = len(out["ids"])
        _topk_blocks(raw, i, k, temperature, labels, out)
        top_ids = torch.cat(out["ids"][n_before:]).to(raw.device)  # (c, k)
        tail = torch.cat(out["tail"][n_before:]).to(raw.device)  # (c,) float32, as stored
        z = raw if temperature == 1.0 else raw / temperature
        # the teacher restricted to the unkept ids: softmax over the rest (the kept ids' logits at -inf)
        probs = torch.softmax(z.scatter(-1, top_ids, float("-inf")), dim=-1)  # (c, V) float32
        ids, counts, unique = _draw(probs, num_samples, [*seed, c], tail > 0, scheme)
        out["tail_ids"].append(ids.cpu())
        out["tail_counts"].append(counts.cpu())
        out["tail_unique"].append(unique.cpu())
    return {key: torch.cat(parts) for key, parts in out.items() if parts}


def _draw(
    probs: torch.Tensor, num_samples: int, seed: list[int], keep: torch.Tensor | None, scheme: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` ids from each row of ``probs`` (c, V) float32, on its device.

    ``scheme`` (one of ``DRAW_SCHEMES``): "multinomial", independent draws with replacement; "systematic", one
    uniform offset u per row and the N points (u + j) / N, j = 0..N-1, read through the row's cumulative
    distribution (in float64, over the ids in vocabulary order). Both give each id the expected count N p_i, so
    count / N estimates p without bias either way; a systematic count is always floor(N p_i) or ceil(N p_i) (an
    id's interval of width p_i holds that many points 1/N apart), where a multinomial one has variance
    N p_i (1 - p_i): the ids above 1/N are carried almost exactly, only the rest are left to chance.

    The generator is seeded with SeedSequence(seed), so the same seed words draw the same ids on the same kind of
    device. ``keep`` (c,) bool or None: rows to keep (the others' draws are dropped, their unique count is 0).

    Returns:
        ids (U,) int64 and counts (U,) int64: each kept row's unique ids in ascending order and how often each was
        drawn, rows one after another; unique (c,) int64: the unique ids of each row.
    """
    import torch

    state = np.random.SeedSequence(seed).generate_state(2, np.uint32)
    g = torch.Generator(device=probs.device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    if scheme == "systematic":
        c, v = probs.shape
        u = torch.rand(c, 1, generator=g, device=probs.device, dtype=torch.float64)
        grid = torch.arange(num_samples, device=probs.device, dtype=torch.float64)
        draws = torch.empty(c, num_samples, dtype=torch.long, device=probs.device)
        step = max(1, _CDF_ELEMENTS // v)  # rows per float64 cumulative block: 64 MB at most
        for r in range(0, c, step):
            cdf = probs[r : r + step].double().cumsum(dim=-1)  # (r, V) float64
            total = cdf[:, -1:]  # (r, 1): 1 up to float32 rounding (1e-5 at 152k ids), scaled to below
            bad = ~(total[:, 0] > 0) | ~total[:, 0].isfinite()  # NaN, inf or no mass
            if keep is not None:
                bad &= keep[r : r + step]
            if bool(bad.any()):  # as torch.multinomial refuses such rows
                raise ValueError(f"cannot draw ids from a distribution that sums to {float(total[bad][0])}")
            points = (u[r : r + step] + grid) / num_samples * total  # (r, S) ascending in [0, total)
            points = torch.minimum(points, torch.nextafter(total, torch.zeros_like(total)))  # < total after rounding
            # the id whose interval [cdf_{i-1}, cdf_i) holds each point: the first cdf above it, an id of positive
            # probability (one of probability 0 has an empty interval); a row not kept may give V, clamped
            draws[r : r + step] = torch.searchsorted(cdf, points, right=True).clamp_max_(v - 1)
    elif scheme == "multinomial":
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=g)  # (c, S) int64
        draws = draws.sort(dim=-1).values
    else:
        raise ValueError(f"draw scheme {scheme!r} is not one of {', '.join(DRAW_SCHEMES)}")
    # a run of equal ids in a sorted row is one unique id: mark where each run starts
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    if keep is not None:
        starts &= keep[:, None]
    flat_starts = starts.reshape(-1).nonzero()[:, 0]  # (U,) into the flattened (c * S)
    # a run ends where the next starts, or at its row's end (a dropped row's entries never start a run)
    row_end = (flat_starts // num_samples + 1) * num_samples
    ends = torch.minimum(torch.cat([flat_starts[1:], flat_starts.new_tensor([draws.numel()])]), row_end)
    return draws.reshape(-1)[flat_starts], ends - flat_starts, starts.sum(dim=-1)


def per_example(top: dict[str, torch.Tensor], offsets: np.ndarray[Any, Any], method: str) -> list[dict[str, Any]]:
    """Cut a batch's targets (rows in batch order; ``offsets`` (B + 1,) where each example's rows start) into one
    dict of numpy arrays per example: per-row columns sliced by rows, ragged draws by their entries, with their
    per-row offsets from 0 (sample: ``ids``/``counts``/``offsets``; hybrid: ``tail_ids``/``tail_counts``/
    ``tail_offsets`` beside the top-k's ``ids``/``logprobs``/``tail``)."""
    per_row = () if method == "sample" else ("ids", "logprobs", "tail")
    ragged, unique, name = {
        "sample": (("ids", "counts"), "unique", "offsets"),
        "hybrid": (("tail_ids", "tail_counts"), "tail_unique", "tail_offsets"),
    }.get(method, ((), "", ""))
    entry = np.concatenate([[0], np.cumsum(top[unique].numpy())]) if ragged else None  # (N + 1,) row starts
    out = []
    for p0, p1 in itertools.pairwise(offsets):
        res = {key: top[key][p0:p1].numpy() for key in per_row}
        if entry is not None:
            e0, e1 = entry[p0], entry[p1]
            res |= {key: top[key][e0:e1].numpy() for key in ragged}
            res[name] = entry[p0 : p1 + 1] - e0
        out.append(res)
    return out


def _entropy_rows(first: int, rows: int, device: torch.device) -> torch.Tensor:
    """(M,) int64: the rows of a block whose index in the call (``first`` + row) is a multiple of ENTROPY_EVERY.

    The first such row may lie past the block's end (a block of 10 rows starting at row 20 has none); arange then
    needs an empty range, not a start beyond its end, which it rejects (``--chunk-positions 10`` crashed here).
    """
    import torch

    start = (-first) % ENTROPY_EVERY
    return torch.arange(start, max(start, rows), ENTROPY_EVERY, device=device)
