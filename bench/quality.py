"""Quality at equal steps: held-out perplexity of students trained by hard labels, offline top-k KD (tail bin and
renormalised), and online full-logit KD, next to the teacher's own, for several (k, T), over several seeds.

    KD_PIPELINE_CACHE=/tmp/kdcache nohup .venv/bin/python bench/quality.py > quality.log 2>&1 &    # ~20-30 min, 2 cores
    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/quality.py --ks 32 --temperatures 1 --seeds 0 --steps 20

Target (DESIGN.md): the offline KD student beats the hard-label student on held-out perplexity, and is within 2%
of online full-logit KD. Writes bench/results/quality.json after every run (a cut run leaves its numbers).

Data: the built-in corpus (``stages.label.default_corpus``, the pydoc topics), packed into 128-token sequences,
the first ``--tokens`` tokens; labeled once per (k, T) by ``stages.label.run`` with the real teacher
(SmolLM2-135M-Instruct, de-quantised) in shards of 16 sequences. Every store holds the same sequences in the
same shards, so every method trains on the same examples in the same order (the order is a function of the store
layout and the seed) and is evaluated on the same held-out shards: the last ``--eval-fraction`` of them, the
split ``stages.train`` makes itself.

Student: a fresh 2-layer Llama, hidden 128, tied 49,152-row embedding (6.7M parameters: the vocabulary dominates
the cost), the same initial weights for every method of a seed. Every method: ``--steps`` AdamW steps of
``--batch-size`` sequences, lr ``--lr``, warm-up then cosine, clipping 1.0, seed s (initialisation and order):

    hard         stages.train.run, alpha 0 (cross-entropy only)
    bin          stages.train.run, alpha 0.5, forward KL over the k+1 bins (``pipeline train``'s defaults)
    renormalise  stages.train.run, alpha 0.5, forward KL on the top-k renormalised, the usual biased way
    online       the same loop written out here: the teacher in memory, its full-vocabulary log-probs at T
                 computed per batch (no grad), forward KL on the full distribution * T^2 mixed with the same
                 cross-entropy by the same alpha; the same optimizer, schedule, clipping, batches and
                 held-out evaluation (``stages.train.evaluate``) as stages.train

Before the runs, a check: ``--check-steps`` steps of stages.train.run at alpha 0 and of the online loop at alpha
0 must give the same held-out perplexity (recorded as ``online_loop_check``; equal to float rounding, since at
T=1 stages.train computes the cross-entropy as lse - z[y]): then the online loop differs from the pipeline's
only by its teacher signal.

Extras: ``--sampled N ...`` also labels stores with ``--method sample --samples N`` at each T and trains on them
with the pipeline's defaults (method "sampled"); ``--reference FILE`` takes the hard-label and online runs of an
earlier results file of the same configuration, so that an extra run needs only its new methods, e.g.

    .venv/bin/python bench/quality.py --ks 128 --sampled 50 --methods bin \
        --reference bench/results/quality.json --out bench/results/quality_extra.json

Perplexity is exp(mean next-token cross-entropy at T=1) on every held-out position. The teacher's is exact, from
the labeler's per-shard statistics (``teacher_nll_sum`` / ``count``) of the same held-out shards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import code_digests, environment, markdown_table, write_results

WITHIN_ONLINE = 0.02


def student_config(vocab_size: int) -> dict[str, Any]:
    """A fresh 2-layer Llama, hidden 128, that shares the teacher's tokenizer (tied embeddings; the demo's fresh
    student until issue 15, made smaller)."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


# ---------------------------------------------------------------------------------------------------- stages


def label_store(
    out: Path,
    k: int,
    temperature: float,
    args: argparse.Namespace,
    samples: int | None = None,
    method: str | None = None,
    draws: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Label the corpus subset at (k, T) (or with ``samples`` draws per position; ``method`` "hybrid": k exact ids
    and ``samples`` tail draws; ``seed``: the labeling seed of the draws, pipeline label's default if None) with
    stages.label.run; a finished store with this configuration is reused."""
    from kd_pipeline.stages import label

    cfg = label.LabelConfig(
        out=str(out),
        top_k=k,
        method=method or ("sample" if samples else "topk"),
        samples=samples,  # None: the method's own default (stages.label.METHOD_DEFAULTS)
        **({"draws": draws} if draws else {}),  # None: pipeline label's default
        **({"seed": seed} if seed is not None else {}),
        temperature=temperature,
        max_length=args.max_length,
        pack=True,
        shard_size=args.shard_size,
        limit=args.tokens // args.max_length,
        progress=False,
    )
    t0 = time.perf_counter()
    result = label.run(cfg, log=lambda msg: None)
    return {
        "store": str(out),
        "tokens": result.tokens,
        "positions": result.positions,
        "shards": result.resumed_units + result.labelled_units,
        "seconds": result.seconds if result.labelled_units else 0.0,
        "wall_seconds": time.perf_counter() - t0,
        "bytes_per_token": result.bytes / max(1, result.positions),
        "kept_mass_mean": result.kept_mass_mean,
    }


def heldout_teacher(store: Path, eval_fraction: float) -> dict[str, float]:
    """The teacher's perplexity on the held-out shards (the split stages.train makes), from the store's stats."""
    from kd_pipeline import data

    shards = data.open_store(store).manifest.shards
    held = shards[len(shards) - max(1, round(eval_fraction * len(shards))) :]
    nll = sum(s.stats["teacher_nll_sum"] for s in held)
    count = sum(s.stats["count"] for s in held)
    return {"perplexity": math.exp(nll / count), "ce": nll / count, "positions": count}


def train_config(store: Path, student: Path, out: Path, method: str, seed: int, args: argparse.Namespace) -> Any:
    from kd_pipeline.stages import train

    return train.TrainConfig(
        store=str(store),
        student=str(student),
        out=str(out),
        alpha=0.0 if method == "hard" else args.alpha,
        tail="renormalise" if method == "renormalise" else "bin",
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        eval_fraction=args.eval_fraction,
        eval_every=args.steps,
        eval_batches=1000,
        save_every=args.steps,
        log_every=max(1, args.steps // 10),
        seed=seed,
        progress=False,
    )


def train_offline(cfg: Any) -> dict[str, Any]:
    from kd_pipeline.stages import train

    shutil.rmtree(cfg.out, ignore_errors=True)
    t0 = time.perf_counter()
    result = train.run(cfg, log=lambda msg: None)
    return {**result.eval, "final_train_loss": result.final_loss, "seconds": time.perf_counter() - t0}


def train_online(
    cfg: Any,
    teacher: Any,
    temperature: float,
    save: Path | None = None,
    fresh: tuple[int, int] | tuple[int, int, str] | None = None,
    cache_hidden: bool = False,
) -> dict[str, Any]:
    """stages.train.run's loop, written out, with the teacher in memory instead of the store's soft labels.
    ``save``: also write the final student there with ``save_pretrained``. ``fresh`` (K, N[, draws]): instead of the
    full distribution, hybrid targets (K 0: sampled) drawn afresh at every step by the labeler's ``draws`` scheme
    (default multinomial; :func:`fresh_hybrid`) under the pipeline's own loss (``distill_loss`` with cfg's options),
    i.e. a hybrid or sampled store whose draws never repeat.
    ``cache_hidden``: keep the teacher's last hidden states of each training sequence (keyed by its ids and mask) the
    first time a batch holding it runs, and from then on build a batch of cached sequences from them instead of
    running the teacher again. The teacher is deterministic in eval mode (no dropout; refused in train mode), so the
    targets are the same up to float rounding (a sequence's states computed beside other sequences of another
    batch); the output head and the softmax (and fresh draws) still run every step. It costs (sequences x length x
    hidden) in the teacher's dtype (~0.2 GB for 346 x 256 x 576 in float32; a teacher whose head does not split off
    caches (length x vocabulary) logits instead, ~17 GB there) and saves all but the first epoch's teacher passes:
    what makes online KD affordable at the hour horizon of BENCHMARKS 11e on one core.

    Same student initialisation (seeded the same way), the same batches in the same order (stages.train's own
    split and batch stream), the same AdamW groups, schedule and clipping, and stages.train.evaluate.
    """
    from kd_pipeline import data
    from kd_pipeline.data.dataset import StoreDataset
    from kd_pipeline.stages import train
    from kd_pipeline.stages.batch_loss import at_positions
    from kd_pipeline.stages.losses import distill_loss
    from kd_pipeline.stages.models import OutputHead, load_student, resolve_device
    from kd_pipeline.stages.train_setup import batch_stream, data_split, warmup_cosine
    from kd_pipeline.stages.weighting import selected

    if cache_hidden and teacher.training:
        raise ValueError("cache_hidden needs the teacher in eval mode: in train mode its dropout would be cached")
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    store = data.open_store(cfg.store)
    m = store.manifest
    torch.manual_seed(cfg.seed)
    model, _ = load_student(cfg.student, m)
    model.to(device)
    net = at_positions(model, m.task)
    train_split, eval_source = data_split(cfg, store)

    def train_set(epoch: int, samples_seen: int) -> StoreDataset:
        return StoreDataset(
            store,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            samples_seen=samples_seen,
            rank=0,
            world_size=1,
            num_workers=cfg.workers,
            **train_split,
        )

    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        foreach=False,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, cfg.steps))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    head = OutputHead(teacher, m.task)
    batches = batch_stream(train_set, cfg, 1, {"epoch": 0, "samples_seen": 0})
    model.train()
    loss_value = float("nan")
    cache: dict[bytes, torch.Tensor] | None = {} if cache_hidden else None
    for step in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        batch, _ = next(batches)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        select = selected(batch)  # (B, L-1) bool
        with torch.no_grad():
            hidden = teacher_hidden(head, batch["input_ids"], batch["attention_mask"], cache)  # (B, L, H)
            if fresh is not None:
                k, n, *how = fresh
                rows = hidden[:, :-1][select]
                targets = fresh_hybrid(rows, head, k, n, temperature, [cfg.seed, step], *how)
            else:
                teacher_lp = torch.log_softmax(head.logits(hidden[:, :-1][select]) / temperature, dim=-1)  # (N, V)
        with autocast:
            z = net.logits(net(batch["input_ids"], batch["attention_mask"], select))  # (N, V) float32
            if fresh is not None:
                loss, _ = distill_loss(
                    z.float(),
                    *targets[:3],
                    batch["labels"][select],
                    alpha=cfg.alpha,
                    kind=cfg.loss,
                    temperature=temperature,
                    beta=cfg.beta,
                    tail=cfg.tail,
                    target_mask=targets[3],
                )
            else:
                log_q = torch.log_softmax(z.float() / temperature, dim=-1)
                kl = (teacher_lp.exp() * (teacher_lp - log_q)).sum(-1).mean() * temperature**2
                ce = F.cross_entropy(z.float(), batch["labels"][select])
                loss = cfg.alpha * kl + (1.0 - cfg.alpha) * ce
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
    result = train.evaluate(net, eval_source, cfg, m.task, temperature, device, 0, 1)
    if save is not None:
        model.save_pretrained(save)
    return {**result, "final_train_loss": loss_value, "seconds": time.perf_counter() - t0}


def teacher_hidden(
    head: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: dict[bytes, torch.Tensor] | None
) -> torch.Tensor:
    """The teacher's (B, L, H) last hidden states for a batch; with ``cache`` (a dict), taken from it when every row
    of the batch is there, else computed for the batch and each row added to it (key: the row's ids and mask)."""
    if cache is None:
        return head.hidden_or_logits(input_ids, attention_mask)
    pairs = zip(input_ids.cpu().numpy(), attention_mask.cpu().numpy(), strict=True)
    keys = [ids.tobytes() + mask.tobytes() for ids, mask in pairs]
    if all(key in cache for key in keys):
        return torch.stack([cache[key] for key in keys]).to(input_ids.device)
    hidden = head.hidden_or_logits(input_ids, attention_mask)
    for key, row in zip(keys, hidden, strict=True):
        cache[key] = row.detach().cpu().clone()
    return hidden


def fresh_hybrid(
    rows: torch.Tensor,
    head: Any,
    k: int,
    num_samples: int,
    temperature: float,
    seed: list[int],
    draws: str = "multinomial",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hybrid targets for the teacher's rows (N, H), drawn now: the labeler's own ``hybrid_chunked`` (top-k, exact
    tail mass, ``num_samples`` draws from the rest, seeded by ``seed``), the head's log-probs rounded to float16 as
    a store keeps them, padded to (N, U) and turned into loss targets by ``losses.hybrid_targets`` as the collator
    does. ``k`` 0: a sampled store's targets instead (the labeler's ``sample_chunked``, ``num_samples`` draws from
    the whole distribution, turned into loss targets by ``losses.sampled_targets``). ``draws``: the labeler's
    --draws scheme. Returns ``distill_loss``'s target_ids, target_logprobs, tail_mass and target_mask."""
    from kd_pipeline.stages.losses import hybrid_targets, sampled_targets
    from kd_pipeline.stages.soft_targets import hybrid_chunked, sample_chunked

    if k == 0:  # a sampled store: num_samples draws from the whole distribution, weights count / num_samples
        drawn = sample_chunked(rows, head, num_samples, temperature, rows.shape[0], None, seed, draws)
        ids, counts = _padded_draws(drawn["unique"], drawn["ids"], drawn["counts"])
        log_p, tail = sampled_targets(counts, num_samples)
        return ids, log_p, tail, counts > 0
    top = hybrid_chunked(rows, head, k, num_samples, temperature, rows.shape[0], None, seed, draws)
    tail_ids, tail_counts = _padded_draws(top["tail_unique"], top["tail_ids"], top["tail_counts"])
    ids, log_p, mask, tail = hybrid_targets(
        top["ids"], top["logprobs"].half().float(), top["tail"], tail_ids, tail_counts, num_samples
    )
    return ids, log_p, tail, mask


def _padded_draws(unique: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged draws (``unique`` (N,) entries per row, ``ids`` / ``counts`` (U_total,) row after row) padded to
    (N, max unique) with id 0 and count 0, as the collator pads them."""
    n, width = unique.shape[0], max(1, int(unique.max()))
    row = torch.repeat_interleave(torch.arange(n), unique)  # (U_total,) the row of each entry
    first = torch.cumsum(unique, 0) - unique  # (N,) where each row's entries start
    slot = torch.arange(row.shape[0]) - first[row]
    out_ids = torch.zeros(n, width, dtype=torch.long)
    out_counts = torch.zeros(n, width, dtype=torch.long)
    out_ids[row, slot] = ids
    out_counts[row, slot] = counts
    return out_ids, out_counts


def check_online_loop(stores: dict[str, Any], student: Path, teacher: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``--check-steps`` steps of stages.train.run and of the online loop, both at alpha 0, seed 0."""
    import dataclasses

    name, entry = next((n, e) for n, e in stores.items() if n.startswith("k="))
    T = float(name.split("T=")[1])
    cfg = train_config(Path(entry["store"]), student, args.work / "runs" / "check-train", "hard", 0, args)
    cfg = dataclasses.replace(cfg, steps=args.check_steps, eval_every=args.check_steps, save_every=args.check_steps)
    return {"store": name, "steps": args.check_steps, **same_as_pipeline(cfg, teacher, T, args.work / "runs")}


def same_as_pipeline(cfg: Any, teacher: Any, temperature: float, work: Path) -> dict[str, Any]:
    """cfg (alpha 0) trained by stages.train.run and by the online loop (under ``work``): their held-out
    perplexities, which must be equal (then the online loop differs from the pipeline's only by its teacher
    signal)."""
    import dataclasses

    pipeline = train_offline(dataclasses.replace(cfg, out=str(work / "check-train")))
    online = train_online(dataclasses.replace(cfg, out=str(work / "check-online")), teacher, temperature)
    diff = abs(online["perplexity"] / pipeline["perplexity"] - 1.0)
    return {
        "stages_train_run_perplexity": pipeline["perplexity"],
        "online_loop_alpha0_perplexity": online["perplexity"],
        "relative_difference": diff,
        # to float rounding: at T=1 stages.train computes its cross-entropy as lse - z[y] (one logsumexp shared
        # with the KD term), the loop as F.cross_entropy
        "matches": diff < 1e-5,
    }


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=24576, help="tokens of the corpus to label and train on")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=["hard", "bin", "renormalise", "online"])
    p.add_argument("--sampled", type=int, nargs="*", default=[], help="also: sampled stores with N draws, each T")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="a results file of this script (same config) whose hard and online runs the summary compares with",
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--check-steps", type=int, default=10, help="steps of the online-loop check (0: skip it)")
    p.add_argument("--work", type=Path, default=Path("/tmp/kd-bench-quality"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not os.environ.get("KD_PIPELINE_CACHE"):
        print("note: KD_PIPELINE_CACHE is not set; the default teacher comes from ~/.cache/kd-pipeline")

    from kd_pipeline.stages.default_teacher import load_default_teacher_dequantised
    from kd_pipeline.stages.models import load_model, resolve_device, resolve_dtype

    wall0 = time.perf_counter()
    device = resolve_device("auto")
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "quality", "target_within_online": WITHIN_ONLINE, **environment(device)}
    report["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    report["config"]["teacher"] = "SmolLM2-135M-Instruct (de-quantised)"
    report["config"]["corpus"] = "stages.label.default_corpus (pydoc_data topics), packed"
    report["config"]["code"] = code_digests(
        "kd_pipeline.stages.label",
        "kd_pipeline.stages.train",
        "kd_pipeline.stages.losses.bins",  # the losses package: each module a training step runs
        "kd_pipeline.stages.losses.divergences",
        "kd_pipeline.stages.losses.fused",
        "kd_pipeline.stages.losses.terms",
        "kd_pipeline.data.dataset",
    )

    def save() -> None:
        report["wall_seconds"] = time.perf_counter() - wall0
        write_results("quality", report, args.out)

    # ---- stores: one per (k, T), the same sequences and shards in each
    stores: dict[str, Any] = {}
    report["stores"] = stores
    for k in args.ks:
        for T in args.temperatures:
            name = f"k={k},T={T:g}"
            stores[name] = label_store(args.work / f"store-k{k}-T{T:g}", k, T, args)
            stores[name]["heldout_teacher"] = heldout_teacher(Path(stores[name]["store"]), args.eval_fraction)
            print(f"labeled {name}: {stores[name]}", flush=True)
            save()
    for n in args.sampled:
        for T in args.temperatures:
            name = f"sample={n},T={T:g}"
            stores[name] = label_store(args.work / f"store-s{n}-T{T:g}", max(args.ks), T, args, samples=n)
            stores[name]["heldout_teacher"] = heldout_teacher(Path(stores[name]["store"]), args.eval_fraction)
            print(f"labeled {name}: {stores[name]}", flush=True)
            save()
    first = next(iter(stores.values()))
    report["teacher"] = first["heldout_teacher"]
    from kd_pipeline import data

    vocab = data.open_store(first["store"]).manifest.vocab_size
    student = args.work / "student"
    student.mkdir(exist_ok=True)
    (student / "config.json").write_text(json.dumps(student_config(vocab), indent=1) + "\n")
    report["config"]["student"] = student_config(vocab)

    teacher = None
    if "online" in args.methods or args.check_steps:
        folder = str(load_default_teacher_dequantised(log=lambda msg: None))
        teacher = load_model(folder, "causal-lm", device=device, dtype=resolve_dtype("auto", device))

    # ---- fairness check: the online loop at alpha 0 must reproduce stages.train.run at alpha 0 exactly (same
    # initialisation, batches, optimizer, schedule and evaluation), so that only the teacher signal differs
    if teacher is not None and args.check_steps:
        report["online_loop_check"] = check_online_loop(stores, student, teacher, args)
        print(f"online loop check: {report['online_loop_check']}", flush=True)
        save()

    # ---- runs: seed by seed, so that a cut run still has every method of its first seed(s)
    runs: list[dict[str, Any]] = []
    report["runs"] = runs
    for seed in args.seeds:
        plan: list[tuple[str, int | None, float]] = []
        if "hard" in args.methods:  # independent of (k, T): alpha 0
            plan.append(("hard", None, args.temperatures[0]))
        for T in args.temperatures:
            if "online" in args.methods:  # independent of k
                plan.append(("online", None, T))
            for k in args.ks:
                plan += [(m, k, T) for m in ("bin", "renormalise") if m in args.methods]
            plan += [("sampled", n, T) for n in args.sampled]
        for method, k, T in plan:
            key = f"sample={k},T={T:g}" if method == "sampled" else f"k={k or max(args.ks)},T={T:g}"
            store = Path(stores[key]["store"])
            out = args.work / "runs" / f"{method}-k{k}-T{T:g}-s{seed}"
            cfg = train_config(store, student, out, method, seed, args)
            r = train_online(cfg, teacher, T) if method == "online" else train_offline(cfg)
            row = {"method": method, "k": k, "T": T if method != "hard" else None, "seed": seed, **r}
            if method == "sampled":
                row["k"], row["samples"] = None, k
            runs.append(row)
            print(
                f"seed {seed} {method:11} k={k} T={T:g}: held-out ppl {r['perplexity']:.2f} ({r['seconds']:.0f} s)",
                flush=True,
            )
            report["summary"] = summarise(runs, args, report["teacher"])
            save()
    print_tables(report)
    print(f"\nwrote {args.out or 'bench/results/quality.json'} ({report['wall_seconds']:.0f} s)")


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    return {
        "mean": statistics.fmean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace, teacher: dict[str, float]) -> dict[str, Any]:
    """Per (k, T) (and per sampled store): every method's perplexity over seeds, and the paired (same seed)
    relative differences. Hard-label and online runs of ``--reference`` count as this run's own."""
    pool = runs + _reference_runs(args)

    def ppl(method: str, k: int | None, temperature: float | None, samples: int | None = None) -> dict[int, float]:
        return {
            r["seed"]: r["perplexity"]
            for r in pool
            if r["method"] == method
            and r["k"] == k
            and r.get("samples") == samples
            and (temperature is None or r["T"] == temperature)
        }

    def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
        return _stats([a[s] / b[s] - 1.0 for s in a if s in b])

    cells: dict[str, Any] = {}
    kinds = [(f"k={k}", k, None) for k in args.ks] + [(f"sample={n}", None, n) for n in args.sampled]
    for label, k, n in kinds:
        for T in args.temperatures:
            hard, online = ppl("hard", None, None), ppl("online", None, T)
            binned = ppl("bin", k, T) if n is None else ppl("sampled", None, T, n)
            renorm = ppl("renormalise", k, T) if n is None else {}
            cell: dict[str, Any] = {
                "k": k,
                "samples": n,
                "T": T,
                "perplexity": {
                    "hard": _stats(list(hard.values())),
                    "bin": _stats(list(binned.values())),
                    "renormalise": _stats(list(renorm.values())),
                    "online": _stats(list(online.values())),
                    "teacher": teacher["perplexity"],
                },
                "bin_vs_hard": paired(binned, hard),
                "bin_vs_online": paired(binned, online),
                "renormalise_vs_hard": paired(renorm, hard),
                "renormalise_vs_online": paired(renorm, online),
                "online_vs_hard": paired(online, hard),
            }
            if cell["bin_vs_hard"]["n"]:
                cell["beats_hard"] = all(binned[s] < hard[s] for s in binned if s in hard)
            if cell["bin_vs_online"]["n"]:
                cell["within_online"] = cell["bin_vs_online"]["mean"] <= WITHIN_ONLINE
            cells[f"{label},T={T:g}"] = cell
    return cells


_SAME = ("tokens", "max_length", "shard_size", "steps", "batch_size", "lr", "warmup", "alpha", "eval_fraction")


def _reference_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The hard-label and online runs of ``--reference``, if its configuration matches this one."""
    if args.reference is None:
        return []
    ref = json.loads(args.reference.read_text())
    differ = [k for k in _SAME if ref["config"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--reference {args.reference} was run with other {', '.join(differ)}; not comparable")
    return [dict(r, reference=str(args.reference)) for r in ref.get("runs", []) if r["method"] in ("hard", "online")]


def print_tables(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(
        f"\nquality: held-out perplexity after {cfg['steps']} steps of {cfg['batch_size']} x {cfg['max_length']} "
        f"tokens, seeds {cfg['seeds']} (mean ± sd); teacher {report['teacher']['perplexity']:.2f} on the same "
        f"{report['teacher']['positions']:,.0f} held-out positions; {report['device']} ({report['cpu']})\n"
    )

    def fmt(s: dict[str, float]) -> str:
        return f"{s['mean']:.1f} ± {s['sd']:.1f}" if s.get("n") else "-"

    def pct(s: dict[str, float]) -> str:
        return f"{s['mean']:+.1%} ({s['min']:+.1%}..{s['max']:+.1%})" if s.get("n") else "-"

    rows = []
    for cell in report.get("summary", {}).values():
        p = cell["perplexity"]
        verdict = "-"
        if "beats_hard" in cell and "within_online" in cell:
            ok = cell["beats_hard"] and cell["within_online"]
            verdict = "met" if ok else "missed"
        what = f"k={cell['k']}" if cell.get("samples") is None else f"sampled, {cell['samples']} draws"
        rows.append(
            [
                f"{what}, T={cell['T']:g}",
                fmt(p["hard"]),
                fmt(p["bin"]),
                fmt(p["renormalise"]),
                fmt(p["online"]),
                f"{p['teacher']:.2f}",
                pct(cell["bin_vs_hard"]),
                pct(cell["bin_vs_online"]),
                pct(cell["renormalise_vs_online"]),
                verdict,
            ]
        )
    print(
        markdown_table(
            [
                "(k, T)",
                "hard labels",
                "offline KD, tail bin",
                "offline KD, renormalised",
                "online full KD",
                "teacher",
                "bin vs hard",
                "bin vs online",
                "renorm. vs online",
                "target",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
