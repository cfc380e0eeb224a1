"""Healing students cut from the teacher: which schedule brings them closest to the teacher per step and per second.

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/healing.py --store STORE \
        --student s15=/tmp/heal/s15 --student s10=/tmp/heal/s10 \
        --run student=s15,lr=1e-4,alpha=0.5 --run student=s15,lr=3e-4,alpha=0.5,freeze=1 ...

Each ``--run`` is one ``stages.train.run`` of a cut student (made by ``pipeline init-student``) on STORE, with
the keys it gives over these defaults: ``lr`` 1e-4, ``alpha`` 0.5 (0: hard labels only), ``freeze`` 0 (1: the
tied embeddings and head fixed, ``--freeze-embeddings``), ``steps`` 40, ``batch`` 8, ``warmup`` 10% of the
steps, ``seed`` 0. The held-out perplexity is evaluated every ``--eval-every`` steps by training's own evaluation
(the examples ``pipeline train`` holds out by content key), with the training seconds spent up to that step
(the sum of each step's time, evaluation excluded), so that schedules compare per step and per second. Before
training, each student (and the teacher) is measured once on the same examples by ``stages.heldout`` (a plain
transformers forward: perplexity, parameters, inference tokens/s); after training, the final student is measured
by it too with ``--final-heldout`` (``final_heldout``), a check that training's evaluation agrees with it.

Results go to bench/results/healing.json (``--out``), rewritten after every run; a run already in that file
with the same name (the sorted keys) is kept, not repeated, so the search can be extended run by run.
``--summary`` prints the tables only, including paired differences by seed between runs that differ only in alpha.
``--merge OTHER.json`` adds the runs of another results file (a search split over parallel workers, each with its
own ``--out`` and e.g. ``OMP_NUM_THREADS=1``) to ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common import code_digests, environment, markdown_table, write_results

DEFAULTS: dict[str, float] = {"lr": 1e-4, "alpha": 0.5, "freeze": 0, "steps": 40, "batch": 8, "seed": 0}


def parse_run(text: str) -> dict[str, Any]:
    """``"student=s15,lr=3e-4,freeze=1"`` -> the full run spec with defaults filled in."""
    spec: dict[str, Any] = dict(DEFAULTS)
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in (*DEFAULTS, "student", "warmup"):
            raise SystemExit(f"--run {text!r}: unknown key {key!r} (keys: student, warmup, {', '.join(DEFAULTS)})")
        spec[key] = value if key == "student" else float(value)
    if "student" not in spec:
        raise SystemExit(f"--run {text!r}: give student=NAME (one of the --student names)")
    for key in ("freeze", "steps", "batch", "seed"):
        spec[key] = int(spec[key])
    spec["warmup"] = int(spec.get("warmup", max(1, spec["steps"] // 10)))
    return spec


def run_name(spec: dict[str, Any]) -> str:
    return ",".join(f"{k}={spec[k]:g}" if isinstance(spec[k], float) else f"{k}={spec[k]}" for k in sorted(spec))


def run_dir(spec: dict[str, Any], args: argparse.Namespace) -> Path:
    return Path(args.work) / "runs" / run_name(spec).replace("=", "").replace(",", "-")


def train_run(spec: dict[str, Any], student: str, args: argparse.Namespace) -> dict[str, Any]:
    from kd_pipeline.stages import train
    from kd_pipeline.stages.heldout import heldout

    out = run_dir(spec, args)
    shutil.rmtree(out, ignore_errors=True)
    cfg = train.TrainConfig(
        store=str(args.store),
        student=student,
        out=str(out),
        alpha=float(spec["alpha"]),
        lr=float(spec["lr"]),
        warmup=spec["warmup"],
        freeze_embeddings=bool(spec["freeze"]),
        steps=spec["steps"],
        batch_size=spec["batch"],
        seed=spec["seed"],
        eval_fraction=args.eval_fraction,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        save_every=spec["steps"],
        log_every=1,
        progress=False,
    )
    t0 = time.perf_counter()
    train.run(cfg, log=lambda msg: None)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds, curve = 0.0, []
    for row in rows:
        if row["split"] == "train":
            seconds += row["step_seconds"]
        else:
            curve.append(
                {"step": row["step"], "train_seconds": seconds, **{k: row[k] for k in ("perplexity", "ce", "kd")}}
            )
    last_train = [r for r in rows if r["split"] == "train"][-1]
    final = heldout(out / "final", args.store, args.eval_fraction).to_dict() if args.final_heldout else None
    return {
        "name": run_name(spec),
        **spec,
        "curve": curve,
        "final_train_ce": last_train.get("ce"),
        "final_train_kd": last_train.get("kd"),
        "train_seconds": seconds,
        "wall_seconds": wall,
        "final_heldout": final,
        "eval_batches": args.eval_batches,
        "load_average": os.getloadavg(),
    }


def summarise(report: dict[str, Any]) -> str:
    lines = [f"teacher held-out perplexity {report['teacher']['perplexity']:.2f} (every held-out example)"]
    for key, t in report.get("teacher_on_eval_batches", {}).items():
        lines.append(
            f"teacher on the first {key} held-out examples (what the runs' evaluations see): {t['perplexity']:.2f}"
        )
    rows = []
    for name, s in report["students"].items():
        rows.append(
            [
                name,
                s["kept_layers"],
                f"{s['parameters'] / 1e6:.1f}M",
                f"{s['tokens_per_second']:.0f}",
                f"{s['perplexity']:.4g}",
            ]
        )
    lines.append(markdown_table(["student", "blocks", "params", "inference tok/s", "unhealed ppl"], rows))
    rows = []
    for r in report["runs"]:
        pts = " ".join(f"{c['step']}:{c['perplexity']:.1f}" for c in r["curve"])
        last = r["curve"][-1]
        subset = report.get("teacher_on_eval_batches", {}).get(
            f"{r.get('eval_batches', report.get('eval_batches'))}x{r['batch']}"
        )
        teacher = (subset or report["teacher"])["perplexity"]
        rows.append(
            [
                r["student"],
                f"{r['lr']:g}",
                f"{r['alpha']:g}",
                r["freeze"],
                r["batch"],
                r["steps"],
                r["seed"],
                pts,
                f"{last['perplexity'] / teacher:.2f}x",
                f"{r['final_heldout']['perplexity']:.2f}" if r.get("final_heldout") else "-",
                f"{r['train_seconds']:.0f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "student",
                "lr",
                "alpha",
                "freeze",
                "batch",
                "steps",
                "seed",
                "held-out ppl at step",
                "vs teacher",
                "final, all held-out",
                "train s",
            ],
            rows,
        )
    )
    lines.append(paired(report["runs"]))
    return "\n\n".join(lines)


def paired(runs: list[dict[str, Any]]) -> str:
    """Runs equal but for alpha and seed: final perplexity per alpha, and differences paired by seed."""
    groups: dict[tuple[Any, ...], dict[float, dict[int, float]]] = {}
    for r in runs:
        key = (r["student"], r["lr"], r["freeze"], r["batch"], r["steps"], r["warmup"])
        groups.setdefault(key, {}).setdefault(r["alpha"], {})[r["seed"]] = r["curve"][-1]["perplexity"]
    rows = []
    for key, by_alpha in groups.items():
        hard = by_alpha.get(0.0)
        if not hard or len(hard) < 2:
            continue
        for alpha, by_seed in sorted(by_alpha.items()):
            seeds = sorted(set(by_seed) & set(hard))
            diffs = [by_seed[s] / hard[s] - 1 for s in seeds]
            vals = [by_seed[s] for s in seeds]
            rows.append(
                [
                    "/".join(str(k) for k in key),
                    f"{alpha:g}",
                    len(seeds),
                    f"{statistics.fmean(vals):.2f}",
                    " ".join(f"{v:.2f}" for v in vals),
                    "-" if alpha == 0 else f"{statistics.fmean(diffs):+.1%} ({min(diffs):+.1%}..{max(diffs):+.1%})",
                ]
            )
    if not rows:
        return ""
    header = ["student/lr/freeze/batch/steps/warmup", "alpha", "seeds", "mean ppl", "per seed", "vs hard, paired"]
    return markdown_table(header, rows)


def merge(report: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """Add the runs of ``others`` that ``report`` lacks (by name), and their students and teacher measurements."""
    for other in others:
        for key, value in other.items():
            report.setdefault(key, value)
        report["students"] = {**other.get("students", {}), **report.get("students", {})}
        report["teacher_on_eval_batches"] = {
            **other.get("teacher_on_eval_batches", {}),
            **report.get("teacher_on_eval_batches", {}),
        }
        done = {r["name"] for r in report.setdefault("runs", [])}
        report["runs"] += [r for r in other.get("runs", []) if r["name"] not in done]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--student", action="append", default=[], help="NAME=DIR of a student made by init-student")
    p.add_argument("--run", action="append", default=[], help="a run spec, see above")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=1000, help="at most N batches (of the run's batch size)")
    p.add_argument("--final-heldout", action="store_true", help="also measure each final student by stages.heldout")
    p.add_argument(
        "--measure-finals",
        action="store_true",
        help="measure, by stages.heldout on every held-out example, the final student of each run in --out that has "
        "none yet and whose run folder is under --work; then print the tables",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/kd-bench-healing"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "healing.json")
    p.add_argument("--summary", action="store_true", help="print the tables of --out and exit")
    p.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="add the runs (and students, teacher subsets) of another results file to --out, then print the tables "
        "(for searches run as parallel workers, each with its own --out)",
    )
    args = p.parse_args()
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.merge:
        merge(report, [json.loads(path.read_text()) for path in args.merge])
        write_results("healing", report, args.out)
    if args.measure_finals:
        from kd_pipeline.stages.heldout import heldout

        for r in report.get("runs", []):
            final = run_dir({k: r[k] for k in (*DEFAULTS, "student", "warmup")}, args) / "final"
            if r.get("final_heldout") is None and final.is_dir():
                r["final_heldout"] = heldout(final, args.store, args.eval_fraction).to_dict()
                print(f"{r['name']}: {r['final_heldout']}", flush=True)
                write_results("healing", report, args.out)
    if args.summary or args.merge or args.measure_finals:
        print(summarise(report))
        return

    import torch

    from kd_pipeline.pipeline.demo import teacher_folder
    from kd_pipeline.stages.heldout import heldout

    students = dict(s.split("=", 1) for s in args.student)
    specs = [parse_run(r) for r in args.run]
    for spec in specs:
        if spec["student"] not in students:
            raise SystemExit(f"--run student={spec['student']}: no --student {spec['student']}=DIR")
    report.setdefault("benchmark", "healing")
    report.update(environment(torch.device("cpu")))
    report["store"] = str(args.store)
    report["eval_fraction"] = args.eval_fraction
    report["eval_batches"] = args.eval_batches  # every run so far used one value; each run records its own too
    report["code"] = code_digests("kd_pipeline.stages.train", "kd_pipeline.stages.heldout")
    if "teacher" not in report:
        report["teacher"] = heldout(teacher_folder(), args.store, args.eval_fraction).to_dict()
    # the teacher on exactly the examples the runs' evaluations see (the first eval_batches batches)
    subsets = report.setdefault("teacher_on_eval_batches", {})
    for batch in sorted({s["batch"] for s in specs}):
        key = f"{args.eval_batches}x{batch}"
        if key not in subsets:
            subsets[key] = heldout(teacher_folder(), args.store, args.eval_fraction, batch, args.eval_batches).to_dict()
            write_results("healing", report, args.out)
    report.setdefault("students", {})
    for name, folder in students.items():
        if name not in report["students"]:
            info = json.loads((Path(folder) / "init_student.json").read_text())["result"]
            measured = heldout(folder, args.store, args.eval_fraction).to_dict()
            report["students"][name] = {"folder": folder, "kept_layers": info["kept_layers"], **measured}
            print(f"student {name}: {report['students'][name]}", flush=True)
            write_results("healing", report, args.out)
    report.setdefault("runs", [])
    done = {r["name"] for r in report["runs"]}
    for spec in specs:
        if run_name(spec) in done:
            continue
        row = train_run(spec, students[spec["student"]], args)
        report["runs"].append(row)
        done.add(row["name"])
        pts = ", ".join(f"{c['step']}: {c['perplexity']:.1f} ({c['train_seconds']:.0f} s)" for c in row["curve"])
        print(f"{row['name']}: {pts}", flush=True)
        write_results("healing", report, args.out)
    print(summarise(report))


if __name__ == "__main__":
    main()
