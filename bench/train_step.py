"""Training step cost and memory: a step from the store vs. a hard-label step vs. an online-KD step.

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/train_step.py                # ~10 min, one core
    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/train_step.py --steps 12

Targets (DESIGN.md): a step from the store <= 1.10x a hard-label-only step of the same student; training memory
is the student's alone (no teacher weights ever loaded). Writes bench/results/train_step.json.

The student is the former demo's fresh 4-layer Llama (15.7M parameters, tied 49,152-row embedding; ``--student``, by
default /tmp/demo1/student), the batches are the demo store's (``--store``, /tmp/demo1/store: top-32, T=1, 8 x 256
tokens per batch through ``data.dataset.StoreDataset``). Every mode runs the same batches, from the same initial
weights, with stages.train's optimizer (AdamW, betas 0.9/0.95, decay on matrices only, foreach=False), its
warmup + cosine schedule, clipping at 1.0 and (on GPU) bf16 autocast; one "step" is zero_grad, forward, loss,
backward, clip, optimizer and scheduler step, with the batch's host->device copy:

    (a) store   ``stages.batch_loss.at_positions`` + ``stages.batch_loss.train_loss``: the student's hidden states
                at the labelled positions only, the head and the k+1-bin forward KL mixed with cross-entropy (alpha 0.5)
                in chunks of positions, as ``pipeline train`` (``--loss-chunk`` default).
    (a') dense  the same with the dense head and loss (``--loss-chunk 0``): the (N, V) logits, as before the chunks.
    (b) hard    the same student and positions, ``F.cross_entropy`` on the next token only (the baseline).
    (c) online  the teacher (SmolLM2-135M-Instruct, the real one) forward under ``no_grad`` on the same batch,
                full-vocabulary forward KL at T * T^2 mixed with the same cross-entropy by the same alpha.

Timing: pinned to one core and one torch thread by default (``--threads``; see bench/label_overhead.py for why),
the three modes run interleaved, step by step on the same batch (the order rotates each step), after
``--warmup`` untimed steps; the medians over ``--steps`` steps and the per-step ratios are reported. The loader's
own time per batch (StoreDataset, main process) is measured apart and shown as an addition to (a).

Memory: each mode, and a baseline (imports, student, batches, no step), runs again in a subprocess of its own
for ``--memory-steps`` steps; it reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident memory),
``torch.cuda.max_memory_allocated`` on GPU, the parameters of every live ``nn.Module``, and whether any file of
the teacher's folder is mapped or open in the process.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import code_digests, environment, markdown_table, pin_threads, spread, sync, write_results

TARGET_RATIO = 1.10
MODES = ("store", "dense", "hard", "online")


# ---------------------------------------------------------------------------------------------------- setup


def load_batches(store: str, batch_size: int, n: int, seed: int) -> tuple[list[dict[str, torch.Tensor]], float]:
    """The first ``n`` batches of the store in training order, and the loader's seconds per batch."""
    from kd_pipeline.data.dataset import StoreDataset

    ds = StoreDataset(store, batch_size=batch_size, seed=seed)
    batches: list[dict[str, torch.Tensor]] = []
    t0 = time.perf_counter()
    while len(batches) < n:
        for b in ds:
            batches.append(b)
            if len(batches) == n:
                break
        ds.set_epoch(ds.epoch + 1)
    return batches, (time.perf_counter() - t0) / n


class Trainer:
    """One student with stages.train's optimizer and schedule, stepping in one of the three modes."""

    def __init__(self, mode: str, model: Any, teacher: Any, cfg: Any, temperature: float, total: int) -> None:
        from kd_pipeline.stages.batch_loss import at_positions
        from kd_pipeline.stages.models import OutputHead
        from kd_pipeline.stages.train_setup import warmup_cosine

        self.mode, self.model, self.cfg, self.temperature = mode, model, cfg, temperature
        self.net = at_positions(model, "causal-lm", 0 if mode == "dense" else cfg.loss_chunk)
        self.teacher_head = OutputHead(teacher, "causal-lm") if teacher is not None else None
        decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            foreach=False,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(cfg.warmup, total))
        device = next(model.parameters()).device
        self.device = device
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step; returns the wall seconds of its parts (forward+loss, backward, optimizer)."""
        from kd_pipeline.stages.batch_loss import train_loss
        from kd_pipeline.stages.weighting import selected, step_counts

        sync(self.device)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        # (b) and (c) only need what a token loader would give them; (a) copies the whole batch, as train.run
        keys = (
            batch.keys()
            if self.mode in ("store", "dense")
            else ("input_ids", "attention_mask", "labels", "position_mask")
        )
        b = {k: batch[k].to(self.device, non_blocking=True) for k in (*keys, "example_weight")}
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            if self.mode in ("store", "dense"):
                counts = step_counts([b], 1, self.device)  # as train.run: the step's positions (one micro-batch)
                loss, _ = train_loss(self.net, b, "causal-lm", self.cfg, self.temperature, counts)
            else:
                select = selected(b)  # (B, L-1): the same positions as (a)
                labels = b["labels"][select]
                teacher_lp = self._teacher_logprobs(b, select) if self.mode == "online" else None
                z = self.net.logits(self.net(b["input_ids"], b["attention_mask"], select))  # (N, V) float32
                ce = F.cross_entropy(z, labels)
                if teacher_lp is None:
                    loss = ce
                else:
                    T = self.temperature
                    log_q = torch.log_softmax(z / T, dim=-1)  # (N, V)
                    kl = (teacher_lp.exp() * (teacher_lp - log_q)).sum(-1).mean() * T**2
                    loss = self.cfg.alpha * kl + (1.0 - self.cfg.alpha) * ce
                float(loss.detach())  # the loop logs it (a's distill_loss does the same)
        sync(self.device)
        t1 = time.perf_counter()
        torch.autograd.backward(loss)
        sync(self.device)
        t2 = time.perf_counter()
        float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        sync(self.device)
        t3 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "total": t3 - t0,
            "forward_loss": t1 - t0,
            "backward": t2 - t1,
            "optimizer": t3 - t2,
            "system_cpu": r1.ru_stime - r0.ru_stime,  # kernel time: mostly page faults of fresh (N, V) buffers
            "page_faults": float(r1.ru_minflt - r0.ru_minflt),
        }

    def _teacher_logprobs(self, b: dict[str, torch.Tensor], select: torch.Tensor) -> torch.Tensor:
        """(N, V) float32 teacher log-probs at T at the selected positions, computed now (no grad)."""
        assert self.teacher_head is not None
        with torch.no_grad():
            hidden = self.teacher_head.hidden_or_logits(b["input_ids"], b["attention_mask"])  # (B, L, H)
            raw = self.teacher_head.logits(hidden[:, :-1][select])  # (N, V) float32
            return torch.log_softmax(raw / self.temperature, dim=-1)


def build(
    args: argparse.Namespace, mode_list: tuple[str, ...], device: torch.device
) -> tuple[dict[str, Trainer], Any, Any]:
    """Students (one per mode, same initial weights), the teacher if a mode needs it, the store manifest, and the
    initial student (which the last mode trains)."""
    from kd_pipeline import data
    from kd_pipeline.stages import train
    from kd_pipeline.stages.models import load_model, load_student, resolve_dtype

    manifest = data.open_store(args.store).manifest
    torch.manual_seed(args.seed)
    student, _ = load_student(args.student, manifest)
    student.to(device).train()
    teacher = None
    if "online" in mode_list:
        from kd_pipeline.stages.default_teacher import load_default_teacher_dequantised

        folder = str(load_default_teacher_dequantised(log=lambda msg: None))
        teacher = load_model(folder, "causal-lm", device=device, dtype=resolve_dtype("auto", device))
    cfg = train.TrainConfig(alpha=args.alpha, lr=2e-3, warmup=1)  # the demo's lr; warmup 1 so lr is not ~0
    total = args.warmup + args.steps
    trainers = {}
    for i, mode in enumerate(mode_list):
        model = student if i == len(mode_list) - 1 else copy.deepcopy(student)
        trainers[mode] = Trainer(
            mode, model, teacher if mode == "online" else None, cfg, manifest.targets.temperature, total
        )
    return trainers, manifest, student


# ---------------------------------------------------------------------------------------------------- memory


def memory_child(args: argparse.Namespace) -> None:
    """One mode (or the baseline) in this process alone; prints a JSON line with its peak memory."""
    from kd_pipeline.stages.models import resolve_device

    teacher_dir = _teacher_dir()
    opened: set[str] = set()

    def audit(event: str, a: tuple[Any, ...]) -> None:  # every Python-level open() of a teacher file
        if (
            event == "open"
            and isinstance(a[0], str | bytes | os.PathLike)
            and os.fsdecode(a[0]).startswith(teacher_dir)
        ):
            opened.add(os.fsdecode(a[0]))

    sys.addaudithook(audit)
    device = resolve_device(args.device)
    mode = args.memory_mode
    batches, _ = load_batches(args.store, args.batch_size, max(args.memory_steps, 1), args.seed)
    trainers, _, _student = build(args, () if mode == "baseline" else (mode,), device)
    for b in batches[: args.memory_steps] if mode != "baseline" else []:  # baseline: imports, student, batches
        trainers[mode].step(b)
    gc.collect()
    params = {id(p): p.numel() for o in gc.get_objects() if isinstance(o, torch.nn.Module) for p in o.parameters()}
    print(
        "MEMORY "
        + json.dumps(
            {
                "mode": mode,
                # ru_maxrss survives exec (a child starts at its parent's peak), so the parent runs these first,
                # while small; VmHWM is this address space's own peak
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "vm_hwm_mib": _vm_hwm_mib(),
                "cuda_max_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20
                if device.type == "cuda"
                else None,
                "live_module_parameters": sum(params.values()),
                "teacher_files_mapped_or_open_now": _touches(teacher_dir),
                "teacher_files_opened": sorted(Path(f).name for f in opened),
            }
        )
    )


def _vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _teacher_dir() -> str:
    from kd_pipeline.data.reader import default_cache_dir
    from kd_pipeline.stages.default_teacher import HF_FOLDER

    return str(default_cache_dir() / HF_FOLDER)


def _touches(folder: str) -> bool:
    """Is any file of ``folder`` memory-mapped (safetensors loads by mmap) or open in this process?"""
    try:
        maps = Path("/proc/self/maps").read_text()
        fds = [str(fd.readlink()) for fd in Path("/proc/self/fd").iterdir()]
    except OSError:
        return False
    return folder in maps or any(f.startswith(folder) for f in fds)


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("baseline", *(m for m in MODES if m in args.modes)):
        cmd = [sys.executable, __file__, "--memory-mode", mode, *_passthrough(args)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"memory run of {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(line.removeprefix("MEMORY ")) | {"wall_seconds": time.perf_counter() - t0}
        print(f"memory {mode}: {out[mode]}", flush=True)
    return out


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--store", args.store, "--student", args.student, "--batch-size", str(args.batch_size),
        "--alpha", str(args.alpha), "--seed", str(args.seed), "--device", args.device,
        "--memory-steps", str(args.memory_steps), "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--threads", str(args.threads),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="/tmp/demo1/store")
    p.add_argument("--student", default="/tmp/demo1/student", help="folder with the demo student's config.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="pin to N cores / N torch threads (0: torch's default)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--malloc-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time (a) and (b) in a child whose glibc malloc keeps freed memory (see MALLOC_KEEP)",
    )
    p.add_argument("--memory-mode", choices=("baseline", *MODES), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    pin_threads(args.threads)
    if args.memory_mode:
        memory_child(args)
        return
    if not os.environ.get("KD_PIPELINE_CACHE"):
        print("note: KD_PIPELINE_CACHE is not set; the default teacher comes from ~/.cache/kd-pipeline")

    from kd_pipeline.stages.models import resolve_device

    wall0 = time.perf_counter()
    device = resolve_device(args.device)
    # memory first: a child's ru_maxrss starts at its parent's peak, so the parent must still be small here
    memory = run_memory(args) if not args.skip_memory else None
    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = args.warmup + args.steps
    batches, loader_s = load_batches(args.store, args.batch_size, n, args.seed)
    modes = tuple(m for m in MODES if m in args.modes)
    trainers, manifest, _ = build(args, modes, device)
    student = trainers[modes[0]].model
    config = {
        "store": args.store,
        "k": manifest.targets.k,
        "temperature": manifest.targets.temperature,
        "student": args.student,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "student_layers": student.config.num_hidden_layers,
        "batch": list(batches[0]["input_ids"].shape),
        "positions_per_batch": int(batches[0]["position_mask"].sum()),
        "alpha": args.alpha,
        "lr": trainers[modes[0]].cfg.lr,
        "modes": list(modes),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "threads": args.threads,
        "code": code_digests(
            "kd_pipeline.stages.train",
            "kd_pipeline.stages.losses.bins",  # the losses package: each module the timed loss runs
            "kd_pipeline.stages.losses.divergences",
            "kd_pipeline.stages.losses.fused",
            "kd_pipeline.stages.losses.terms",
            "kd_pipeline.stages.losses.chunked",
            "kd_pipeline.stages.models",
            "kd_pipeline.data.dataset",
        ),
        "teacher": "SmolLM2-135M-Instruct (de-quantised), online mode only",
    }
    report: dict[str, Any] = {"benchmark": "train_step", "target_ratio": TARGET_RATIO, **environment(device)}
    report["config"] = config

    times: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for i, batch in enumerate(batches):
        order = modes[i % len(modes) :] + modes[: i % len(modes)]
        row = {}
        for mode in order:
            row[mode] = trainers[mode].step(batch)
        if i >= args.warmup:
            for mode in modes:
                times[mode].append(row[mode])
        print(
            f"step {i}{' (warm-up)' if i < args.warmup else ''}: "
            + ", ".join(f"{m} {row[m]['total']:.2f}s" for m in modes),
            flush=True,
        )

    results: dict[str, Any] = {"loader_seconds_per_batch": loader_s}
    for mode in modes:
        results[mode] = {part: spread([t[part] for t in times[mode]]) for part in times[mode][0]}
    results |= ratios(times, results, loader_s)
    report["results"] = results
    if memory is not None:
        report["memory"] = memory
        report["memory_parent_peak_rss_mib_when_children_ran"] = parent_rss
    report["wall_seconds"] = time.perf_counter() - wall0
    write_results("train_step", report, args.out)

    if not args.no_profile:  # where (a)'s extra time goes: one more step of (a) and of (b) under torch.profiler
        report["profile_one_step"] = {}
        for mode in ("store", "hard"):
            with torch.profiler.profile(activities=_activities(device)) as prof:
                trainers[mode].step(batches[0])
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:12]
            report["profile_one_step"][mode] = [
                {"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count} for e in events
            ]
    del trainers
    gc.collect()
    if args.malloc_variant and device.type == "cpu":
        report["malloc_keep_variant"] = malloc_variant(args)
    report["wall_seconds"] = time.perf_counter() - wall0
    path = write_results("train_step", report, args.out)
    print_tables(report)
    print(f"\nwrote {path} ({report['wall_seconds']:.0f} s)")


MALLOC_KEEP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(1 << 30)}
"""glibc malloc serves every block above 32 MB (a (N, V) float32 logits-sized buffer is 400 MB here) with a fresh
mmap and returns it on free, so each such temporary costs page faults on first touch. These settings keep freed
memory in the heap for reuse (no mmap, no trim): what a long training run sees once its heap is warm."""


def malloc_variant(args: argparse.Namespace) -> dict[str, Any]:
    """(a) and (b), interleaved as above, in a child process with MALLOC_KEEP in its environment."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kd-bench-step-") as tmp:
        out = Path(tmp) / "child.json"
        cmd = [
            sys.executable, __file__, "--modes", "store", "hard", "--skip-memory", "--no-profile",
            "--no-malloc-variant", "--out", str(out), *_passthrough(args),
        ]  # fmt: skip
        proc = subprocess.run(cmd, env={**os.environ, **MALLOC_KEEP}, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the malloc variant failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        child = json.loads(out.read_text())
    print(f"malloc variant: {child['results']['ratio_store_vs_hard']}", flush=True)
    return {"env": MALLOC_KEEP, "command": child["command"], "results": child["results"]}


def ratios(times: dict[str, list[dict[str, float]]], results: dict[str, Any], loader_s: float) -> dict[str, Any]:
    """(a)/(b) per step and of the medians, with the loader's time, and (c) against both, where present."""
    out: dict[str, Any] = {}

    def per_step(x: str, y: str) -> dict[str, float]:
        return spread([a["total"] / b["total"] for a, b in zip(times[x], times[y], strict=True)])

    if "store" in times and "hard" in times:
        store, hard = results["store"]["total"]["median"], results["hard"]["total"]["median"]
        out["ratio_store_vs_hard"] = per_step("store", "hard")
        out["ratio_store_vs_hard_of_medians"] = store / hard
        out["ratio_store_plus_loader_vs_hard"] = (store + loader_s) / hard
    if "store" in times and "dense" in times:  # the chunked head-and-loss against the dense one
        out["ratio_store_vs_dense"] = per_step("store", "dense")
        out["ratio_store_vs_dense_of_medians"] = (
            results["store"]["total"]["median"] / results["dense"]["total"]["median"]
        )
    if "online" in times:
        out |= {f"ratio_online_vs_{m}": per_step("online", m) for m in ("hard", "store") if m in times}
    return out


def _activities(device: torch.device) -> list[Any]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def print_tables(report: dict[str, Any]) -> None:
    r, cfg = report["results"], report["config"]
    print(
        f"\ntraining step: student {cfg['student_parameters'] / 1e6:.1f}M params ({cfg['student_layers']} layers), "
        f"batch {cfg['batch']} ({cfg['positions_per_batch']} positions), top-{cfg['k']} T={cfg['temperature']:g}, "
        f"{report['device']} ({report['cpu']}{', ' + report['gpu'] if report['gpu'] else ''}); "
        f"median of {cfg['steps_timed']} interleaved steps\n"
    )
    parts = ("total", "forward_loss", "backward", "optimizer", "system_cpu")
    whats = {
        "store": "(a) from the store",
        "dense": "(a') from the store, dense head",
        "hard": "(b) hard labels only",
        "online": "(c) online KD",
    }
    rows = []
    for mode, what in whats.items():
        if mode not in r:
            continue
        t = r[mode]
        rows.append([what, *(f"{t[part]['median']:.3f}" for part in parts), f"{t['page_faults']['median']:,.0f}"])
    keep = report.get("malloc_keep_variant")
    if keep:
        for mode in ("store", "hard"):
            t = keep["results"][mode]
            what = whats[mode] + ", malloc keeps freed memory"
            rows.append([what, *(f"{t[part]['median']:.3f}" for part in parts), f"{t['page_faults']['median']:,.0f}"])
    header = ["step", "seconds", "forward + loss", "backward", "clip + optimizer", "of which kernel (s)", "page faults"]
    print(markdown_table(header, rows))
    if "ratio_store_vs_dense" in r:
        d = r["ratio_store_vs_dense"]
        print(
            f"\n(a)/(a'), chunked / dense head and loss: median of per-step ratios **{d['median']:.3f}** (min "
            f"{d['min']:.3f}, max {d['max']:.3f}); ratio of medians {r['ratio_store_vs_dense_of_medians']:.3f}. "
            f"Target <= 1.05: {'met' if d['median'] <= 1.05 else 'missed'}."
        )
    if "ratio_store_vs_hard" not in r:
        return
    ratio = r["ratio_store_vs_hard"]
    verdict = "met" if ratio["median"] <= TARGET_RATIO else "missed"
    print(
        f"\n(a)/(b): median of per-step ratios **{ratio['median']:.3f}** (min {ratio['min']:.3f}, max "
        f"{ratio['max']:.3f}); ratio of medians {r['ratio_store_vs_hard_of_medians']:.3f}; with the loader's "
        f"{r['loader_seconds_per_batch'] * 1e3:.1f} ms/batch {r['ratio_store_plus_loader_vs_hard']:.3f}. "
        f"Target <= {TARGET_RATIO}: {verdict}."
        + (
            f" (c)/(b) {r['ratio_online_vs_hard']['median']:.2f}, (c)/(a) {r['ratio_online_vs_store']['median']:.2f}."
            if "ratio_online_vs_hard" in r
            else ""
        )
    )
    if keep:
        k = keep["results"]["ratio_store_vs_hard"]
        print(
            f"with glibc malloc keeping freed memory ({' '.join(f'{a}={b}' for a, b in keep['env'].items())}): "
            f"(a)/(b) **{k['median']:.3f}** (min {k['min']:.3f}, max {k['max']:.3f})"
        )
    mem = report.get("memory")
    if mem:
        print()
        print(
            markdown_table(
                [
                    "process",
                    "peak RSS MiB (ru_maxrss)",
                    "VmHWM MiB",
                    "GPU max allocated MiB",
                    "live nn.Module parameters",
                    "teacher files opened",
                ],
                [
                    [
                        m,
                        f"{v['peak_rss_mib']:,.0f}",
                        f"{v['vm_hwm_mib']:,.0f}" if v.get("vm_hwm_mib") else "-",
                        "-" if v["cuda_max_allocated_mib"] is None else f"{v['cuda_max_allocated_mib']:,.0f}",
                        f"{v['live_module_parameters']:,}",
                        ", ".join(v["teacher_files_opened"]) or "none",
                    ]
                    for m, v in mem.items()
                ],
            )
        )

    for mode, ops in report.get("profile_one_step", {}).items():
        print(f"\ntop operators, one step of {mode}:\n")
        print(
            markdown_table(
                ["operator", "self ms", "calls"], [[o["op"], f"{o['self_ms']:.0f}", o["calls"]] for o in ops]
            )
        )


if __name__ == "__main__":
    main()
