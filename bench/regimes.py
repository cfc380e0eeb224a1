"""Quality in two regimes (issue 15 items 4-6): students trained by hard labels and by each kind of stored target,
3 seeds, measured independently of training on two held-out corpora against the teacher's full distribution.

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/regimes.py --regime early --steps 150 --batch-size 4 \
        --runs hard topk32@0.5 topk16@0.5 sample50@0.5 hybrid8x24@0.5 topk32@1 ...
    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/regimes.py --regime cut --steps 16 --batch-size 8 ...
    .venv/bin/python bench/regimes.py --summary          # tables from bench/results/regimes-*.json

Regimes. ``early``: a fresh 2-layer Llama, hidden 128 (bench/quality.py's student), trained with
bench/quality.py's lr 2e-3 and warm-up 10. ``cut``: the demo's student cut from the teacher (SmolLM2-135M-Instruct,
blocks 0,1,2,8,11,21,24,27,28,29, made by ``stages.init_student``), trained with the healing schedule its
``init_student.json`` records (``stages.healing``; lr 1e-3, warm-up 1), alpha set per run.

Stores (``--work``/store-NAME, labelled once by ``bench/quality.label_store`` with the real teacher on the first
``--sequences`` x 256 tokens of the built-in corpus, packed, shards of 16 sequences): ``topkK`` (top-K + tail bin),
``sampleN`` (N draws), ``hybridKxN``. Every store holds the same sequences, so every run sees the same examples
in the same order (a function of the seed) and holds out the same ones (by content key). Bytes per token are read
from the store itself: the size of every file under it / the positions its manifest counts.

Runs (``--runs``, in priority order; each over every ``--seeds``): ``hard`` (alpha 0, on topk32's store),
``STORE@ALPHA`` (the pipeline's default forward KL on the k+1 bins, or the unbiased estimator on sampled and
hybrid stores), ``renormK@ALPHA`` (top-K renormalised, the usual biased way), ``online@ALPHA`` (bench/quality.py's
online loop: the teacher's full distribution each step), ``freshKxN@ALPHA`` / ``freshsampleN@ALPHA`` (that loop
with a hybrid / sampled store's targets drawn afresh at every step by the labeler's own code, under the
pipeline's loss: a store whose draws never repeat, as in a one-pass run). Each run's final student is measured by
``stages.heldout.score`` (a plain transformers forward, nothing shared with the losses) on (1) pydoc: the store's
held-out examples, never trained on, and (2) a second corpus, ``--corpus2`` (default: the GNU GPL v3 text that
Debian's base-files installs at /usr/share/common-licenses/GPL-3; evaluation only, never labelled or trained on;
skipped with a message when absent): perplexity, KL(teacher || student) and top-1 agreement with the teacher's
full T=1 distribution. On pydoc, each position is also split by whether its true next token is among the
teacher's stored top-32 (the split bench/alpha_why.py made for one seed): cross-entropy inside and outside.

Longer healing (``--tag hour``, section 11e of BENCHMARKS.md): the long regime's cut and schedule over more of the
corpus and ~6.7x the steps, each run ~an hour of one core here (two runs side by side on the 2 cores):

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/regimes.py --regime long --tag hour --work /tmp/regimes-hour \
        --sequences 432 --steps 400 --batch-size 4 --threads 1 --runs hard sample50@0.5 --seeds 0

and online KD at that horizon with the teacher's hidden states kept per training sequence after its first pass
(``--cache-teacher``: 346 teacher passes instead of 1,600, the same targets up to float rounding):

    ... --runs online@0.5 --cache-teacher --seeds 0

Results: bench/results/regimes-REGIME.json (REGIME-TAG.json with a tag), rewritten after every run (a cut run
keeps its numbers; a run already there is skipped, so a second invocation extends the grid). Processes running one
regime side by side merge their rows; the file's ``command`` and ``config`` are those of the last process that saved,
and each row of a process started after 2026-12-04 22:07 UTC records the ``command`` that ran it and when it
``finished`` (earlier rows do not).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, code_digests, environment, write_results
from quality import label_store, student_config

CUT_LAYERS = {
    "cut": "0,1,2,8,11,21,24,27,28,29",  # section 8's 10-block cut
    "long": "0,1,2,8,9,10,11,20,21,22,23,24,27,28,29",  # the demo's 15 blocks (greedy removal's 15)
}
LENGTH = 256
SPLIT_STORE = "topk32"  # its ids decide the in/out of top-k split; hard labels train on it


def parse_store(name: str) -> dict[str, Any]:
    """``topk16`` / ``sample50`` / ``sys50`` / ``hybrid8x24`` -> label_store's arguments; a suffix ``rS`` on a store
    of draws (``sample50r1``) labels it with seed S (another realisation of the same draws; none: seed 0)."""
    base, r, seed = name.rpartition("r")
    if r and seed.isdigit() and base[-1:].isdigit():  # sample50r1, hybrid4x12r2, topk32r1 (refused below)
        if not base.startswith(("sample", "sys", "hybrid")):
            raise SystemExit(f"store {name!r}: a labeling seed (rS) applies to stores of draws only")
        return parse_store(base) | {"seed": int(seed)}
    if name.startswith("topk"):
        return {"k": int(name[4:]), "samples": None, "method": "topk"}
    if name.startswith("sample"):
        return {"k": 32, "samples": int(name[6:]), "method": "sample"}
    if name.startswith("sys"):  # sampled, systematic draws (pipeline label --draws systematic)
        return {"k": 32, "samples": int(name[3:]), "method": "sample", "draws": "systematic"}
    if name.startswith("hybrid"):
        k, n = name[6:].split("x")
        return {"k": int(k), "samples": int(n), "method": "hybrid"}
    raise SystemExit(f"unknown store {name!r}: expected topkK, sampleN, sysN or hybridKxN (draws: optional rSEED)")


def parse_run(text: str) -> dict[str, Any]:
    """``hard`` / ``topk16@0.5`` / ``renorm16@1`` / ``online@0.5`` -> store, alpha, tail, online."""
    if text == "hard":
        return {"name": text, "store": SPLIT_STORE, "alpha": 0.0, "tail": "bin", "online": False}
    what, _, alpha = text.partition("@")
    if not alpha:
        raise SystemExit(f"--runs {text!r}: expected hard or STORE@ALPHA, e.g. topk16@0.5")
    if what == "online":
        return {"name": text, "store": SPLIT_STORE, "alpha": float(alpha), "tail": "bin", "online": True}
    if what.startswith("fresh"):  # freshKxN / freshsampleN: a store's targets drawn afresh each step, online loop
        store = what[5:] if what.startswith(("freshsample", "freshsys")) else "hybrid" + what[5:]
        drawn = parse_store(store)
        if "seed" in drawn:
            raise SystemExit(f"--runs {text!r}: fresh draws are drawn by the online loop, not labelled: no rS")
        k = 0 if drawn["method"] == "sample" else drawn["k"]
        spec = {"name": text, "store": store, "alpha": float(alpha), "tail": "bin", "online": True}
        return spec | {"fresh": [k, drawn["samples"], drawn.get("draws", "multinomial")]}
    if what.startswith("renorm"):
        return {"name": text, "store": "topk" + what[6:], "alpha": float(alpha), "tail": "renormalise", "online": False}
    parse_store(what)
    return {"name": text, "store": what, "alpha": float(alpha), "tail": "bin", "online": False}


def store_bytes_per_token(store: Path) -> float:
    """Every file under the store / the positions its manifest counts."""
    total = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    positions = json.loads((store / "manifest.json").read_text())["totals"]["positions"]
    return total / positions


def corpus2_batches(path: Path, tokenizer_dir: str, sequences: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """``path``'s text tokenised by the teacher's tokenizer, cut into ``sequences`` rows of LENGTH tokens."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(path.read_text())["input_ids"]
    rows = torch.tensor(ids[: (len(ids) // LENGTH) * LENGTH]).view(-1, LENGTH)[:sequences]
    return [
        {"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r[:, 1:].clone()} for r in rows.split(batch)
    ]


def measure(model_dir: str, evals: dict[str, Any]) -> dict[str, Any]:
    """One model on each evaluation corpus (stages.heldout.score), plus the pydoc in/out-of-top-k split."""
    from kd_pipeline.stages.heldout import score

    out: dict[str, Any] = {}
    for name, e in evals.items():
        r = score(model_dir, e["batches"], e["reference"], keep_positions=name == "pydoc")
        out[name] = r.to_dict()
        if name == "pydoc":
            out[name].update(split_by_topk(torch.tensor(r.position_nll), e["in_topk"]))
    return out


def split_by_topk(nll: torch.Tensor, in_topk: torch.Tensor) -> dict[str, float]:
    total = len(nll)
    return {
        "share_out_of_topk": float((~in_topk).sum()) / total,
        "ce_in_topk": float(nll[in_topk].mean()),
        "ce_out_topk": float(nll[~in_topk].mean()),
        "ce_in_topk_contribution": float(nll[in_topk].sum()) / total,
        "ce_out_topk_contribution": float(nll[~in_topk].sum()) / total,
    }


def teacher_evals(teacher: str, args: argparse.Namespace, store: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluation batches, the teacher's full log-probs on them, and the teacher's own figures."""
    from kd_pipeline.stages.heldout import reference_logprobs, store_batches

    evals: dict[str, Any] = {"pydoc": {"batches": store_batches(store, args.eval_fraction, 4)}}
    if args.corpus2.is_file():
        evals["corpus2"] = {"batches": corpus2_batches(args.corpus2, teacher, args.corpus2_sequences, 4)}
    else:
        print(f"note: {args.corpus2} does not exist here; the second-corpus measures are skipped", flush=True)
    figures: dict[str, Any] = {}
    for name, e in evals.items():
        e["reference"] = reference_logprobs(teacher, e["batches"])
        labels = [b["labels"][b["labels"] != -100] for b in e["batches"]]
        nll = torch.cat([-lp.gather(-1, y[:, None])[:, 0] for lp, y in zip(e["reference"], labels, strict=True)])
        figures[name] = {"perplexity": math.exp(float(nll.mean())), "nll": float(nll.mean()), "positions": len(nll)}
        figures[name]["reference_batches_compact"] = [e["reference"].compact, len(e["reference"])]
        if name == "pydoc":
            e["in_topk"] = torch.cat(
                [
                    (b["target_ids"].long()[b["labels"] != -100] == y[:, None]).any(-1)
                    for b, y in zip(e["batches"], labels, strict=True)
                ]
            )
            figures[name].update(split_by_topk(nll, e["in_topk"]))
    return evals, figures


def prepare_student(args: argparse.Namespace, teacher: str, vocab: int) -> tuple[str, dict[str, Any]]:
    """The regime's starting student folder and its training schedule."""
    folder = args.work / f"student-{args.regime}"
    if args.regime == "early":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(student_config(vocab), indent=1) + "\n")
        return str(folder), {"lr": 2e-3, "warmup": 10}
    from kd_pipeline.stages import init_student
    from kd_pipeline.stages.healing import student_schedule

    if not (folder / "init_student.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        layers = CUT_LAYERS[args.regime]
        init_student.run(init_student.InitStudentConfig(teacher=teacher, out=str(folder), layers=layers))
    schedule = student_schedule(str(folder))
    return str(folder), {k: v for k, v in schedule.items() if k != "alpha"}


def train_run(
    spec: dict[str, Any],
    seed: int,
    student: str,
    schedule: dict[str, Any],
    args: argparse.Namespace,
    teacher_model: Any,
) -> tuple[str, dict[str, Any]]:
    from quality import train_online

    from kd_pipeline.stages import train

    out = args.work / "runs" / f"{args.regime}-{spec['name'].replace('@', '-a')}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train.TrainConfig(
        **schedule,
        store=str(args.work / f"store-{spec['store']}"),
        student=student,
        out=str(out),
        alpha=spec["alpha"],
        tail=spec["tail"],
        steps=args.steps,
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
        eval_every=args.steps,
        eval_batches=1,
        save_every=args.steps,
        log_every=max(1, args.steps // 10),
        seed=seed,
        progress=False,
    )
    t0 = time.perf_counter()
    if spec["online"]:
        fresh = tuple(spec["fresh"]) if spec.get("fresh") else None
        r = train_online(cfg, teacher_model, 1.0, save=out / "final", fresh=fresh, cache_hidden=args.cache_teacher)
    else:
        r = dict(train.run(cfg, log=lambda msg: None).eval)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return str(out / "final"), {"train_seconds": time.perf_counter() - t0, "train_eval": r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=["early", "cut", "long"])
    p.add_argument("--runs", nargs="+", default=["hard", "topk32@0.5"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sequences", type=int, default=96, help="256-token sequences labelled (train + held out)")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--corpus2", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    p.add_argument("--corpus2-sequences", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work", type=Path, default=Path("/tmp/regimes-work"))
    p.add_argument(
        "--cache-teacher",
        action="store_true",
        help="online runs: keep the teacher's hidden states per training sequence after its first pass "
        "(bench/quality.train_online's cache_hidden; the same targets up to float rounding, ~0.2 GB at 432 sequences)",
    )
    p.add_argument(
        "--tag",
        default="",
        help="a variant of the regime (other --sequences, e.g. one pass): results in regimes-REGIME-TAG.json",
    )
    p.add_argument(
        "--remeasure",
        nargs="*",
        default=[],
        help="RUN:SEED rows whose kept final student is measured again (early regime: students are kept)",
    )
    p.add_argument("--summary", action="store_true", help="print the tables of the results files and exit")
    args = p.parse_args()
    if args.summary:
        from regimes_summary import print_summary

        print_summary(sorted(RESULTS.glob("regimes-*.json")))
        return
    if args.regime is None:
        p.error("give --regime early or --regime cut (or --summary)")
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_run(r) for r in args.runs]
    from kd_pipeline.stages.default_teacher import load_default_teacher_dequantised

    teacher = str(load_default_teacher_dequantised(log=lambda msg: None))
    regime = args.regime + (f"-{args.tag}" if args.tag else "")
    results_name = f"regimes-{regime}"
    path = RESULTS / f"{results_name}.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    report.update({"benchmark": "regimes", "regime": regime, **environment(torch.device("cpu"))})
    report.setdefault("runs", [])
    wall0 = time.perf_counter()

    def save() -> None:
        """Write the report, keeping rows that another process running this regime wrote meanwhile."""
        report["wall_seconds"] = time.perf_counter() - wall0
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ours = {(r["run"], r["seed"], r.get("steps")) for r in report["runs"]}
            if path.is_file():
                theirs = json.loads(path.read_text())
                report["runs"] += [
                    r for r in theirs.get("runs", []) if (r["run"], r["seed"], r.get("steps")) not in ours
                ]
                report["stores"] = {**theirs.get("stores", {}), **report.get("stores", {})}
            write_results(results_name, report)

    ns = argparse.Namespace(max_length=LENGTH, shard_size=16, tokens=args.sequences * LENGTH)
    stores = report.setdefault("stores", {})
    for name in dict.fromkeys([SPLIT_STORE, *(s["store"] for s in specs)]):
        folder = args.work / f"store-{name}"
        a = parse_store(name)
        stores[name] = {
            **label_store(folder, a["k"], 1.0, ns, **{k: a.get(k) for k in ("samples", "method", "draws", "seed")}),
            "bytes_per_token_from_store": store_bytes_per_token(folder),
            "spec": a,
        }
        print(f"store {name}: {stores[name]['bytes_per_token_from_store']:.1f} bytes/token", flush=True)
    from kd_pipeline import data

    vocab = data.open_store(args.work / f"store-{SPLIT_STORE}").manifest.vocab_size
    student, schedule = prepare_student(args, teacher, vocab)
    report["config"] = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("summary",)},
        "student": student,
        "schedule": schedule,
        "cut_layers": CUT_LAYERS.get(args.regime),
        "code": code_digests("kd_pipeline.stages.train", "kd_pipeline.stages.heldout", "kd_pipeline.stages.label"),
    }
    evals, report["teacher"] = teacher_evals(teacher, args, args.work / f"store-{SPLIT_STORE}")
    print(f"teacher: {report['teacher']}", flush=True)
    if "start" not in report:
        report["start"] = measure(student, evals) if args.regime != "early" else None
    save()
    teacher_model = None
    if any(s["online"] for s in specs):
        from kd_pipeline.stages.models import load_model, resolve_device

        # on the device the online loop puts the student and the batches on (TrainConfig's device, "auto")
        teacher_model = load_model(teacher, "causal-lm", device=resolve_device("auto"), dtype=torch.float32)
    for row in report["runs"]:
        if f"{row['run']}:{row['seed']}" in args.remeasure:
            final = args.work / "runs" / f"{args.regime}-{row['run'].replace('@', '-a')}-s{row['seed']}" / "final"
            row.update(measure(str(final), evals), remeasured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            print(f"remeasured {row['run']} seed {row['seed']}: kl {row['pydoc']['kl']:.3f}", flush=True)
            save()
    done = {(r["run"], r["seed"]) for r in report["runs"] if r.get("steps") == args.steps}
    for spec in specs:
        for seed in args.seeds:
            if (spec["name"], seed) in done:
                continue
            final, trained = train_run(spec, seed, student, schedule, args, teacher_model)
            row = {
                "run": spec["name"],
                "seed": seed,
                "steps": args.steps,
                "batch_size": args.batch_size,
                **spec,
                **({"teacher_cached": True} if spec["online"] and args.cache_teacher else {}),
                **trained,
                **measure(final, evals),
                # the report's own command/config are the last saving process's; each row keeps its own
                "command": report["command"],
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            report["runs"].append(row)
            save()
            c2 = row.get("corpus2", {}).get("perplexity", float("nan"))
            print(
                f"{args.regime} {spec['name']:14} seed {seed}: pydoc ppl {row['pydoc']['perplexity']:.2f} "
                f"kl {row['pydoc']['kl']:.3f} top1 {row['pydoc']['top1']:.3f} corpus2 ppl {c2:.2f} "
                f"({trained['train_seconds']:.0f} s)",
                flush=True,
            )
            if args.regime != "early" or spec["online"]:
                shutil.rmtree(Path(final).parent, ignore_errors=True)  # 255 MB each; the figures are kept
    print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
