"""Peak memory and step time of the output head + loss: dense, chunked, and hard-label cross-entropy.

    .venv/bin/python bench/head_loss.py                                   # the full grid (long on a CPU)
    .venv/bin/python bench/head_loss.py --vocab 49152 --positions 2048   # one configuration

For each vocabulary V (49,152: SmolLM2; 131,072: Llama 3 class) and number of positions N (2,048; 16,384), from
(N, H) float32 hidden states and a (V, H) float32 head (H = 576, SmolLM2-135M's width), one step is the head, the
loss and the backward pass to the hidden states and the head's weight:

    dense    z = hidden @ W.T, (N, V) float32, then ``distill_loss`` (forward-kl + CE, alpha 0.5, top-32 at T=1;
             the fused closed-form gradient): what ``pipeline train --loss-chunk 0`` runs.
    chunked  ``chunked_distill_loss``, the same loss, rows in chunks of ``--chunk`` (default: ``rows_per_chunk(V)``,
             a 256 MiB float32 block): what ``pipeline train`` runs by default.
    ce       ``F.cross_entropy(hidden @ W.T, labels)``: the hard-label baseline over the full logits.

Each configuration runs in a subprocess of its own (``--child``), so its peak resident memory
(``ru_maxrss``) is its own: reported as the growth over the resident memory just before the first step (inputs
allocated), and on GPU ``torch.cuda.max_memory_allocated`` over the allocation before the first step. glibc's mmap
threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed blocks leave the resident set and the peak is what
was live at once. The dense and ce paths need about three (N, V) float32 tensors at once (logits, a softmax or
logsumexp temporary, the gradient); a configuration whose estimate exceeds ``--limit-gb`` is not run and is
recorded as skipped, with the bytes it would need. Step time: the median of ``--steps`` steps after one warm-up.

Writes bench/results/head_loss.json (``--out`` elsewhere), after every configuration (with ``"partial": true`` until
the grid ends).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import environment, markdown_table, write_results

MODES = ("dense", "chunked", "ce")
_DENSE_COPIES = 3  # (N, V) float32 tensors alive at once on the dense and ce paths (see the docstring)


def _child(mode: str, vocab: int, positions: int, hidden_size: int, chunk: int, steps: int, device_name: str) -> None:
    """One configuration, in this process: prints a JSON object with its peak memory growth and step times."""
    import torch
    import torch.nn.functional as F

    from kd_pipeline.stages.losses import chunked_distill_loss, distill_loss

    device = torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    n, v, h, k = positions, vocab, hidden_size, 32
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device).requires_grad_(True)
    # top-32 targets with the tail the labeler would store: ids drawn at random, log-probs -5 each
    ids = torch.randint(0, v, (n, k), generator=g).to(device)
    lp = torch.full((n, k), -5.0, device=device)
    tail = 1.0 - lp.exp().sum(-1)
    labels = torch.randint(0, v, (n,), generator=g).to(device)

    def step() -> None:
        hidden.grad = weight.grad = None
        if mode == "chunked":
            loss, _ = chunked_distill_loss(hidden, weight, None, ids, lp, tail, labels, alpha=0.5, chunk=chunk)
        elif mode == "dense":
            loss, _ = distill_loss(hidden @ weight.T, ids, lp, tail, labels, alpha=0.5)
        else:
            loss = F.cross_entropy(hidden @ weight.T, labels)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    before = rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if i > 0:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "peak_rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
    }
    if device.type == "cuda":
        out["cuda_peak_growth_bytes"] = torch.cuda.max_memory_allocated(device) - allocated
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49_152, 131_072])
    ap.add_argument("--positions", type=int, nargs="+", default=[2_048, 16_384])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: rows_per_chunk(V))")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--limit-gb", type=float, default=16.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=7, metavar="ARG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, vocab, positions, hidden, chunk, steps, device = args.child
        _child(mode, int(vocab), int(positions), int(hidden), int(chunk), int(steps), device)
        return

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))  # measure this checkout's losses (the children get it through PYTHONPATH)
    import torch

    from kd_pipeline.stages.losses import rows_per_chunk

    env = {**os.environ, "PYTHONPATH": str(repo), "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    config = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    results = []
    for vocab in args.vocab:
        for positions in args.positions:
            for mode in args.modes:
                chunk = args.chunk or rows_per_chunk(vocab)
                row: dict[str, Any] = {"mode": mode, "vocab": vocab, "positions": positions, "hidden": args.hidden}
                row["chunk"] = chunk if mode == "chunked" else None
                need = _DENSE_COPIES * positions * vocab * 4
                if mode != "chunked" and need > args.limit_gb * 2**30:
                    results.append({**row, "skipped": f"needs ~{need / 2**30:.1f} GiB > --limit-gb", "bytes": need})
                    print(f"{mode} V={vocab} N={positions}: skipped (~{need / 2**30:.1f} GiB)", file=sys.stderr)
                    continue
                cmd = [sys.executable, __file__, "--child", mode, str(vocab), str(positions), str(args.hidden)]
                cmd += [str(chunk), str(args.steps), args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    results.append({**row, "error": proc.stderr[-2000:]})
                    print(f"{mode} V={vocab} N={positions}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                row.update(json.loads(proc.stdout))
                results.append(row)
                # after every configuration: a grid stopped part-way still leaves its finished rows on disk
                info = {"environment": environment(torch.device(args.device)), "config": config}
                write_results("head_loss", {**info, "partial": True, "results": results}, args.out)
                print(
                    f"{mode} V={vocab} N={positions}: peak +{row['peak_rss_growth_bytes'] / 2**20:.0f} MiB, "
                    f"{row['step_seconds']:.3f} s/step",
                    file=sys.stderr,
                )
    path = write_results(
        "head_loss",
        {"environment": environment(torch.device(args.device)), "config": config, "results": results},
        args.out,
    )
    table = [
        [r["mode"], r["vocab"], r["positions"], r.get("chunk") or "-"]
        + (
            [f"{r['peak_rss_growth_bytes'] / 2**20:.0f}", f"{r['step_seconds']:.3f}"]
            if "step_seconds" in r
            else [r.get("skipped", "error"), "-"]
        )
        for r in results
    ]
    print(markdown_table(["mode", "V", "N", "chunk", "peak RSS growth (MiB)", "s/step"], table))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
