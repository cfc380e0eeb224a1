"""Loader throughput: collated batches per second from a local store, on one core, k=32, causal-lm.

    .venv/bin/python bench/loader.py                      # ~1M tokens, zarr and arrow; writes bench/results/loader.json
    .venv/bin/python bench/loader.py --tokens 262144 --epochs 2

It writes a synthetic but realistic store per backend through the real writer (sequences of 512 tokens;
ids drawn log-uniformly from a 49,152-id vocabulary, so small ids are frequent, as with BPE; per position 32
distinct ids with log-probabilities sorted in descending order, a kept mass around 0.83 and its exact tail),
then times ``StoreDataset`` for whole epochs in the main process, pinned to one core with
``torch.set_num_threads(1)``. An epoch decodes every shard once (decompression and checks) and collates every
batch; the time is split into those two parts as well, to show where it goes. Each epoch runs twice, with the
shard value checks (data/values.py) on and off, interleaved; the ratio of the median epochs is their cost.
Target (DESIGN.md): >= 1,000,000 tokens/s.

Then, on a second zarr store (``--scale-tokens``), the scaling of issue 13: decodes per epoch (the real
``StoreReader.load_shard`` wrapped to append one file per call to a directory, so worker processes count too)
with 1 and 2 DataLoader workers and with 2 ranks (two StoreDatasets, rank 0 and 1, in this process); target: each
shard once per job. And loader tokens/s through ``DataLoader(ds, batch_size=None, num_workers=W)`` for W = 1 and
2, interleaved (1, 2, 2, 1, ...), ``--scale-repeats`` epochs each, medians; each worker is pinned to its own core
(of those this process may use) with one torch thread; the main process only receives batches. Target: 2 workers
>= 1.7x 1 worker on 2 cores. Worker start-up is inside the timed epoch, as a trainer pays it every epoch. Each
epoch also records the CPU seconds of the main process and of the workers, and how many of the cores they kept
busy over its wall time; and, interleaved with the epochs, the same shards are decoded by 1 and by 2 plain
processes (no DataLoader, no batches), each on its own core: the scaling that decoding alone reaches on this
machine, the ceiling beside which the workers' ratio is read.

Last, where a batch's time goes (``profile``, on the scaling store, one core, CPU seconds per batch, medians):
reading a shard's files, decoding them (decompression and checks, with the value checks on and off), collating
(wide tensors, as before; narrow arrays, as workers do now), pickling a batch in a worker (the wide dict of
tensors moves each tensor into its own shared-memory file; a ``WireBatch`` packs the narrow arrays into one
buffer), and the receiving process's CPU per batch through a real 1-worker DataLoader whose dataset yields
ready batches (``time.process_time`` of the main process: unpickling, fetching shared-memory descriptors, or
unpacking and widening). CPU time, not wall time, so it means something on a shared machine too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_pipeline.data import Manifest, ShardData, StoreWriter, TargetSpec, example_key, open_store, values
from kd_pipeline.data.backends import shard_files
from kd_pipeline.data.collate import WireBatch, collate_arrays, widen
from kd_pipeline.data.dataset import StoreDataset, collate
from kd_pipeline.data.reader import StoreReader
from kd_pipeline.data.shard import NDArray

TARGET_TOKENS_PER_S = 1_000_000
TARGET_TWO_WORKER_SPEEDUP = 1.7


def log_uniform_ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int) -> NDArray:
    """Ids with p(id) ~ 1 / (id + 1): the heavy head of small ids a BPE vocabulary has."""
    ids: NDArray = (np.exp(rng.random(shape) * np.log(vocab)) - 1).astype(np.int64)
    return ids.clip(0, vocab - 1)


def synthetic_shard(rng: np.random.Generator, rows: int, seq_len: int, k: int, vocab: int) -> ShardData:
    """One causal-lm shard of ``rows`` sequences: (rows * seq_len,) input ids, (rows * (seq_len - 1), k) targets."""
    P = rows * (seq_len - 1)
    input_ids = log_uniform_ids(rng, (rows, seq_len), vocab).astype(np.uint16)
    # k distinct ids per position: draw, sort, redraw duplicates uniformly, then put them in a random order
    ids = np.sort(log_uniform_ids(rng, (P, k), vocab), axis=1)
    while True:  # a redrawn id can hit another one of its row: redraw until none repeats (the reader checks)
        dup = np.zeros_like(ids, dtype=bool)
        dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
        if not dup.any():
            break
        ids[dup] = rng.integers(0, vocab, int(dup.sum()))
        ids = np.sort(ids, axis=1)
    ids = np.take_along_axis(ids, np.argsort(rng.random((P, k)), axis=1), axis=1)
    # log-probs over the full vocabulary, most probable first: a peaked, noisy decay, scaled to the kept mass
    sharp = rng.lognormal(0.0, 0.5, (P, 1))
    z = -sharp * np.log1p(np.arange(k)) * 2.0 + rng.gumbel(size=(P, k)) * 0.3
    z = -np.sort(-z, axis=1)
    kept = rng.beta(6.0, 1.2, (P, 1))
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True)) + np.log(kept)
    offsets = np.arange(rows + 1, dtype=np.int64)
    keys = np.stack([np.frombuffer(example_key(x), dtype=np.uint8) for x in input_ids])
    return ShardData(
        input_ids=input_ids.reshape(-1),
        token_offsets=offsets * seq_len,
        position_offsets=offsets * (seq_len - 1),
        target_ids=ids.astype(np.uint16),
        target_logprobs=logp.astype(np.float16),
        tail_mass=(1.0 - kept[:, 0]).astype(np.float32),
        keys=keys,
    )


def write_store(path: Path, backend: str, args: argparse.Namespace) -> None:
    spec = TargetSpec(method="topk", k=args.k, temperature=1.0, num_classes=args.vocab)
    manifest = Manifest(
        backend=backend,
        task="causal-lm",
        targets=spec,
        vocab_size=args.vocab,
        teacher={"name_or_path": "synthetic"},
        tokenizer={"vocab_size": args.vocab},
        dataset={"source": "bench/loader.py synthetic", "max_length": args.seq_len},
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    rng = np.random.default_rng(0)
    examples = max(args.tokens // args.seq_len, 1)
    with StoreWriter(path, manifest) as w:
        for unit, start in enumerate(range(0, examples, args.shard_size)):
            rows = min(args.shard_size, examples - start)
            w.write_shard(unit, synthetic_shard(rng, rows, args.seq_len, args.k, args.vocab))
        w.finish()


def time_backend(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Whole epochs with the shard value checks (data/values.py) on and off, interleaved (on, off, off, on, ...)
    so that the machine's drift hits both alike; medians per variant. Checks on is what every reader runs."""
    reader = open_store(path)
    m = reader.manifest
    ds = StoreDataset(reader, batch_size=args.batch_size, seed=0, block_shards=args.block_shards)
    epochs: dict[bool, list[float]] = {True: [], False: []}
    decode: dict[bool, list[float]] = {True: [], False: []}
    try:
        for epoch in range(args.epochs):
            for checks in (True, False) if epoch % 2 == 0 else (False, True):
                values._ENABLED = checks  # private switch, for this measurement only
                ds.set_epoch(epoch)
                t0 = time.perf_counter()
                tokens = sum(int(b["attention_mask"].sum()) for b in ds)
                epochs[checks].append(time.perf_counter() - t0)
                assert tokens == m.tokens, (tokens, m.tokens)
                # where the time goes: decoding every shard once (decompression + checks)
                t0 = time.perf_counter()
                shards = [reader.load_shard(s, verify=False) for s in m.shards]
                decode[checks].append(time.perf_counter() - t0)
    finally:
        values._ENABLED = True
    # then collating from memory
    t0 = time.perf_counter()
    for sh in shards:
        for r0 in range(0, sh.rows, args.batch_size):
            collate([sh.example(r, m.task) for r in range(r0, min(r0 + args.batch_size, sh.rows))], m.task)
    collate_s = time.perf_counter() - t0
    on, off = float(np.median(epochs[True])), float(np.median(epochs[False]))
    return {
        "tokens": m.tokens,
        "examples": m.rows,
        "shards": len(m.shards),
        "store_bytes": m.bytes,
        "bytes_per_token": m.bytes / m.tokens,
        "epoch_seconds": epochs[True],
        "epoch_seconds_no_value_checks": epochs[False],
        "tokens_per_s": m.tokens / min(epochs[True]),
        "tokens_per_s_median": m.tokens / on,
        "tokens_per_s_median_no_value_checks": m.tokens / off,
        "value_checks_throughput_ratio": off / on,  # (tokens/s on) / (tokens/s off), medians
        "decode_tokens_per_s": m.tokens / float(np.median(decode[True])),
        "decode_tokens_per_s_no_value_checks": m.tokens / float(np.median(decode[False])),
        "collate_tokens_per_s": m.tokens / collate_s,
    }


def count_decodes(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Decodes per shard in one epoch: 1 worker, 2 workers, 2 ranks (in this process, one after the other)."""
    real = StoreReader.load_shard
    with tempfile.TemporaryDirectory(prefix="kd-bench-decodes-") as where:

        def counting(self: StoreReader, record: Any, *, verify: bool) -> ShardData:
            (Path(where) / f"{record.name}.{os.getpid()}.{os.urandom(4).hex()}").touch()
            return real(self, record, verify=verify)

        StoreReader.load_shard = counting  # type: ignore[method-assign]
        out: dict[str, Any] = {}
        try:
            for name, world, workers in (("1 worker", 1, 1), ("2 workers", 1, 2), ("2 ranks", 2, 0)):
                for rank in range(world):
                    ds = StoreDataset(
                        path, batch_size=args.batch_size, block_shards=args.block_shards, rank=rank,
                        world_size=world, num_workers=workers,
                    )  # fmt: skip
                    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
                    for _ in loader:
                        pass
                files = list(Path(where).iterdir())
                per_shard = Counter(p.name.split(".")[0] for p in files)
                shards = len(open_store(path).manifest.shards)
                out[name] = {
                    "decodes": len(files),
                    "shards": shards,
                    "each_shard_once": sorted(per_shard.values()) == [1] * shards,
                }
                for p in files:
                    p.unlink()
        finally:
            StoreReader.load_shard = real  # type: ignore[method-assign]
    return out


def _pin_worker(worker_id: int) -> None:
    """A DataLoader worker on its own core, one torch thread: W workers use W cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores:
        os.sched_setaffinity(0, {cores[worker_id % len(cores)]})
    torch.set_num_threads(1)


@contextmanager
def _wire(mode: str | None) -> Iterator[None]:
    """``KD_PIPELINE_WIRE=mode`` for the DataLoader workers forked inside (None: the default, shared-memory
    slots; "inband": the DataLoader's pipe)."""
    if mode:
        os.environ["KD_PIPELINE_WIRE"] = mode
    try:
        yield
    finally:
        os.environ.pop("KD_PIPELINE_WIRE", None)


def _decode_share(path: Path, core: int | None, share: int, of: int) -> None:
    """Decode every ``of``-th shard of the store from the ``share``-th, pinned to ``core``, one torch thread."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    reader = open_store(path)
    for record in list(reader.manifest.shards)[share::of]:
        reader.load_shard(record, verify=False)


def decode_only_seconds(path: Path, processes: int) -> float:
    """Wall seconds for ``processes`` forked processes, each on its own core, to decode their share of the shards
    (no DataLoader, no batches): how far decoding alone scales on this machine."""
    import multiprocessing

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    procs = [
        ctx.Process(target=_decode_share, args=(path, cores[i % len(cores)] if cores else None, i, processes))
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0, proc.exitcode
    return time.perf_counter() - t0


def time_workers(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Epoch tokens/s through a DataLoader with 1 and 2 workers, interleaved; medians and their ratio. Batches
    leave the workers through shared-memory slots (the default; data/wire_slots.py) and, interleaved with those
    epochs, through the DataLoader's pipe (``KD_PIPELINE_WIRE=inband``, what every batch did before). Each epoch
    also records the CPU seconds of the main process and of its workers (``os.times``: the workers' are counted
    when the DataLoader joins them at the epoch's end), and, interleaved with the epochs, the same shards are
    decoded by 1 and by 2 plain processes (``decode_only``): the scaling that decoding alone reaches here."""
    tokens = open_store(path).manifest.tokens
    wires = ("slots", "inband")
    seconds: dict[str, dict[int, list[float]]] = {w: {1: [], 2: []} for w in wires}
    cpu: dict[str, dict[int, list[dict[str, float]]]] = {w: {1: [], 2: []} for w in wires}
    decode_only: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.scale_repeats):
        for workers in (1, 2) if rep % 2 == 0 else (2, 1):
            decode_only[workers].append(decode_only_seconds(path, workers))
            for wire in wires if rep % 2 == 0 else wires[::-1]:
                ds = StoreDataset(
                    path, batch_size=args.batch_size, seed=0, block_shards=args.block_shards, epoch=rep,
                    num_workers=workers,
                )  # fmt: skip
                loader = torch.utils.data.DataLoader(
                    ds, batch_size=None, num_workers=workers, worker_init_fn=_pin_worker
                )
                with _wire(None if wire == "slots" else wire):
                    before, t0 = os.times(), time.perf_counter()
                    got = sum(int(b["attention_mask"][b["example_weight"] > 0].sum()) for b in loader)
                    wall = time.perf_counter() - t0
                    after = os.times()  # the DataLoader joined (reaped) its workers when its iterator ran out
                seconds[wire][workers].append(wall)
                main_cpu = after.user - before.user + after.system - before.system
                workers_cpu = (
                    after.children_user - before.children_user + after.children_system - before.children_system
                )
                cpu[wire][workers].append(
                    {"main": main_cpu, "workers": workers_cpu, "busy_cores": (main_cpu + workers_cpu) / wall}
                )
                assert got == tokens, (got, tokens)
    one_d, two_d = float(np.median(decode_only[1])), float(np.median(decode_only[2]))
    out: dict[str, Any] = {
        "tokens": tokens,
        "decode_only": {
            "seconds": {str(w): s for w, s in decode_only.items()},
            "tokens_per_s_median": {"1": tokens / one_d, "2": tokens / two_d},
            "speedup_2_over_1": one_d / two_d,
        },
    }
    for wire in wires:
        one, two = float(np.median(seconds[wire][1])), float(np.median(seconds[wire][2]))
        result = {
            "epoch_seconds": {str(w): s for w, s in seconds[wire].items()},
            "tokens_per_s_median": {"1": tokens / one, "2": tokens / two},
            "speedup_2_over_1": one / two,
            "cpu_seconds": {str(w): c for w, c in cpu[wire].items()},
            "cpu_median": {
                str(w): {k: float(np.median([c[k] for c in cs])) for k in ("main", "workers", "busy_cores")}
                for w, cs in cpu[wire].items()
            },
        }
        if wire == "slots":  # the default: the figures as before
            out.update(result)
        else:
            out[wire] = result
    return out


class _Ready(torch.utils.data.IterableDataset[Any]):
    """Yields ``n`` batches made by ``make`` (fresh each time: a tensor already in shared memory moves for free)."""

    def __init__(self, make: Any, n: int) -> None:
        self.make, self.n = make, n

    def __iter__(self) -> Any:
        for _ in range(self.n):
            yield self.make()


def _cpu_per_call(fn: Any, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def profile_stages(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """CPU milliseconds per batch of each stage a batch goes through (see the module doc); medians over shards."""
    from multiprocessing.reduction import ForkingPickler

    reader = open_store(path)
    m = reader.manifest
    per_shard: dict[str, list[float]] = {"read": [], "decode": [], "decode_no_value_checks": []}
    try:
        for record in m.shards:
            per_shard["read"].append(
                _cpu_per_call(lambda r=record: [reader.location.read_bytes(f) for f in shard_files(m.backend, r)], 1)
            )
            for checks, key in ((True, "decode"), (False, "decode_no_value_checks")):
                values._ENABLED = checks  # private switch, for this measurement only
                per_shard[key].append(_cpu_per_call(lambda r=record: reader.load_shard(r, verify=False), 1))
    finally:
        values._ENABLED = True
    shard = reader.load_shard(m.shards[0], verify=False)
    batches_per_shard = m.shards[0].rows / args.batch_size
    examples = [shard.example(r, m.task) for r in range(args.batch_size)]
    n = 20
    arrays = collate_arrays(examples, m.task)
    wide = collate(examples, m.task)
    ms: dict[str, float] = {k: 1e3 * float(np.median(v)) / batches_per_shard for k, v in per_shard.items()}
    ms |= {
        "collate_wide": 1e3 * _cpu_per_call(lambda: collate(examples, m.task), n),
        "collate_narrow": 1e3 * _cpu_per_call(lambda: collate_arrays(examples, m.task), n),
        "widen": 1e3 * _cpu_per_call(lambda: widen(arrays), n),
        # a fresh batch each time (a tensor already in shared memory would move for free), less its collation
        "pickle_wide_tensors": 1e3 * _cpu_per_call(lambda: ForkingPickler.dumps(collate(examples, m.task)), n),
        "pickle_wire_batch": 1e3 * _cpu_per_call(lambda: ForkingPickler.dumps(WireBatch(arrays)), n),
    }
    ms["pickle_wide_tensors"] -= ms["collate_wide"]
    for name, make, wire in (
        ("receive_wide_tensors", lambda: collate(examples, m.task), None),
        ("receive_wire_batch", lambda: WireBatch(collate_arrays(examples, m.task)), None),  # shared slots
        ("receive_wire_batch_inband", lambda: WireBatch(collate_arrays(examples, m.task)), "inband"),  # the pipe
    ):
        count = 64
        with _wire(wire):
            loader = torch.utils.data.DataLoader(_Ready(make, count), batch_size=None, num_workers=1)
            it = iter(loader)
            next(it)  # worker start-up is not a batch's cost
            t0 = time.process_time()
            got = sum(1 for _ in it)
        ms[name] = 1e3 * (time.process_time() - t0) / got
    return {
        "what": "CPU milliseconds per batch (medians over shards for read/decode, divided by batches per shard)",
        "batch_bytes_wide": sum(t.numel() * t.element_size() for t in wide.values()),
        "batch_bytes_narrow": sum(a.nbytes for a in arrays.values()),
        "ms_per_batch": ms,
    }


def profile_only(args: argparse.Namespace) -> None:
    """The per-stage CPU profile alone (CPU seconds mean something on a busy machine; wall seconds do not)."""
    torch.set_num_threads(1)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kd-bench-loader-") as tmp:
        write_store(Path(tmp) / "p", "zarr", args)
        prof = profile_stages(Path(tmp) / "p", args)
    print(", ".join(f"{k} {v:.2f}" for k, v in prof["ms_per_batch"].items()), "(CPU ms per batch)")
    report = {
        "benchmark": "loader --profile-only",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cpu": _cpu_name(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "load_average_before_after": [load, os.getloadavg()],
        "profile": prof,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1 << 20, help="tokens in the synthetic store")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--shard-size", type=int, default=256, help="examples per shard (pipeline label's default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-shards", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per variant (value checks on, off)")
    p.add_argument(
        "--backends", nargs="*", default=["zarr", "arrow"], choices=["zarr", "arrow"], help="none: scaling only"
    )
    p.add_argument("--scale-tokens", type=int, default=1 << 21, help="tokens in the store of the worker scaling")
    p.add_argument("--scale-repeats", type=int, default=6, help="timed epochs per worker count")
    p.add_argument(
        "--profile-only", action="store_true", help="only the per-stage profile, on a store of --tokens (one shard)"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "loader.json")
    args = p.parse_args()
    if args.profile_only:
        profile_only(args)
        return

    all_cores = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else set()
    # one core, honestly: every thread (torch, blosc, zarr's event loop) is pinned to the same CPU
    if all_cores:
        os.sched_setaffinity(0, {min(all_cores)})
    torch.set_num_threads(1)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kd-bench-loader-") as tmp:
        for backend in args.backends:
            path = Path(tmp) / backend
            write_store(path, backend, args)
            results[backend] = time_backend(path, args)
        if all_cores:  # the workers' part: each worker pins itself to one of these
            os.sched_setaffinity(0, all_cores)
        scale_args = argparse.Namespace(**{**vars(args), "tokens": args.scale_tokens})
        write_store(Path(tmp) / "scale", "zarr", scale_args)
        scaling = {
            "cores": len(all_cores) or os.cpu_count(),
            "load_average_before": os.getloadavg(),
            "decodes_per_epoch": count_decodes(Path(tmp) / "scale", args),
            **time_workers(Path(tmp) / "scale", args),
            "load_average_after": os.getloadavg(),
        }
        if all_cores:  # the stages, like the main-process timings, on one core
            os.sched_setaffinity(0, {min(all_cores)})
        scaling["profile"] = profile_stages(Path(tmp) / "scale", args)

    print(
        f"{'backend':8} {'tokens/s':>12} {'median':>12} {'median, no checks':>18} {'ratio':>6} "
        f"{'decode/s':>12} {'no checks':>12} {'collate/s':>12} {'bytes/token':>11}"
    )
    for backend, r in results.items():
        print(
            f"{backend:8} {r['tokens_per_s']:12,.0f} {r['tokens_per_s_median']:12,.0f} "
            f"{r['tokens_per_s_median_no_value_checks']:18,.0f} {r['value_checks_throughput_ratio']:6.3f} "
            f"{r['decode_tokens_per_s']:12,.0f} {r['decode_tokens_per_s_no_value_checks']:12,.0f} "
            f"{r['collate_tokens_per_s']:12,.0f} {r['bytes_per_token']:11.1f}"
        )
    for name, d in scaling["decodes_per_epoch"].items():
        print(f"decodes per epoch, {name}: {d['decodes']} for {d['shards']} shards (each once: {d['each_shard_once']})")
    per_s = scaling["tokens_per_s_median"]
    inband = scaling["inband"]
    print(
        f"DataLoader tokens/s (median): 1 worker {per_s['1']:,.0f}, 2 workers {per_s['2']:,.0f}; "
        f"2 / 1 = {scaling['speedup_2_over_1']:.2f}x (target >= {TARGET_TWO_WORKER_SPEEDUP}x); in-band "
        f"(KD_PIPELINE_WIRE=inband): {inband['tokens_per_s_median']['1']:,.0f}, "
        f"{inband['tokens_per_s_median']['2']:,.0f}, {inband['speedup_2_over_1']:.2f}x; "
        f"load average {scaling['load_average_before']} -> {scaling['load_average_after']}"
    )
    for wire, r in (("slots", scaling), ("in-band", inband)):
        print(
            f"CPU seconds per epoch, {wire} (median; main, workers, busy cores of the wall time): "
            + "; ".join(
                f"{w} worker{'s' * (w != '1')} {c['main']:.2f}, {c['workers']:.2f}, {c['busy_cores']:.2f}"
                for w, c in r["cpu_median"].items()
            )
        )
    dec = scaling["decode_only"]
    print(
        f"decoding alone (1 and 2 plain processes, the same shards): {dec['tokens_per_s_median']['1']:,.0f}, "
        f"{dec['tokens_per_s_median']['2']:,.0f} tokens/s; 2 / 1 = {dec['speedup_2_over_1']:.2f}x"
    )
    prof = scaling["profile"]
    print(
        f"CPU ms per batch ({prof['batch_bytes_wide']:,} bytes wide, {prof['batch_bytes_narrow']:,} narrow): "
        + ", ".join(f"{k} {v:.2f}" for k, v in prof["ms_per_batch"].items())
    )
    report = {
        "benchmark": "loader",
        "what": "collated causal-lm batches from a local store, one core, StoreDataset in the main process",
        "target_tokens_per_s": TARGET_TOKENS_PER_S,
        "device": "cpu",
        "cpu": _cpu_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "results": results,
        "scaling": scaling,
        "target_two_worker_speedup": TARGET_TWO_WORKER_SPEEDUP,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
