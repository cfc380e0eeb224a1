"""Labeling memory against input size: peak RSS of ``pipeline label`` on an input 1x and 10x as large.

    .venv/bin/python bench/label_memory.py                      # ~2 min on 2 CPU cores
    .venv/bin/python bench/label_memory.py --records 200 --words 1000 --scales 1 10

Target (issue 13): the 10x run's peak RSS within 10% of the 1x run's. Writes bench/results/label_memory.json.

Each run is a fresh process (``--child``) that calls ``stages.label.run`` (the real path: fingerprint, stream,
tokenise, label, write) and reports its own peak RSS (``VmHWM`` of /proc/self/status), so one run's
allocations never count towards another's. (Not ``getrusage``'s ``ru_maxrss``: on Linux a child keeps the
high-water mark its parent had when it forked, and the parent here has imported torch to build the teacher.)
The teacher is the tests' tiny model built from a config (a
word-level tokenizer, 2 layers, hidden 32): a real teacher adds a constant (its weights), not a term that grows
with the input. The input is JSONL with ``--records`` x scale records of ``--words`` words each, labelled with
``--max-length`` 64 (unpacked: each record truncated) and ``--pack`` (documents packed), so that the input's bytes
and tokens grow 10x while the teacher's work stays small: what is measured is what reading the input costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _child(args: argparse.Namespace) -> None:
    from kd_pipeline.stages.label import LabelConfig, run

    start = time.perf_counter()
    cfg = LabelConfig(
        teacher=args.teacher,
        data=args.data,
        out=args.out,
        method="topk",  # what its recorded results measured (the default changed after them)
        top_k=4,
        max_length=64,
        shard_size=64,
        pack=args.pack,
        progress=False,
    )
    result = run(cfg, log=lambda msg: None)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rss_kib = int(status["VmHWM"].split()[0])
    print(json.dumps({"maxrss_mib": rss_kib / 1024, "seconds": time.perf_counter() - start, "tokens": result.tokens}))


def write_input(path: Path, records: int, words: int) -> int:
    """JSONL of ``records`` records of ``words`` words (from the tiny tokenizer's vocabulary); returns its bytes."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny import SENTENCES

    vocab = " ".join(SENTENCES).split()
    with open(path, "w") as f:
        for r in range(records):
            text = " ".join(vocab[(r * 7 + i) % len(vocab)] for i in range(words))
            f.write(json.dumps({"text": text}) + "\n")
    return path.stat().st_size


def make_teacher(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_model, make_tokenizer

    vocab = len(make_tokenizer(folder))
    make_model(folder, "causal-lm", vocab_size=vocab)
    return folder


def measure(root: Path, teacher: Path, records: int, words: int, scale: int, pack: bool) -> dict[str, Any]:
    """Peak RSS of one labeling run, in a fresh process, of ``records * scale`` records."""
    data = root / f"input-{records}x{scale}-{words}.jsonl"
    size = data.stat().st_size if data.is_file() else write_input(data, records * scale, words)
    out = root / f"store-{scale}-{'pack' if pack else 'trunc'}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--teacher", str(teacher)]
    cmd += ["--data", str(data), "--out", str(out)] + (["--pack"] if pack else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"labeling run failed:\n{done.stderr[-3000:]}")
    return {"scale": scale, "records": records * scale, "input_bytes": size, **json.loads(done.stdout.splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--pack", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--records", type=int, default=300, help="records in the 1x input")
    p.add_argument("--pack-records", type=int, default=30, help="records in the 1x input of the --pack runs")
    p.add_argument("--words", type=int, default=2000, help="words per record")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    p.add_argument("--results", type=Path, default=None, help="results file (default bench/results/...)")
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import environment, write_results

    report: dict[str, Any] = {
        "environment": environment("cpu"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="kd-label-memory-") as tmp:
        teacher = make_teacher(Path(tmp) / "teacher")
        for mode in ("truncate", "pack"):
            n = args.pack_records if mode == "pack" else args.records  # packed, every token is labelled
            runs = [measure(Path(tmp), teacher, n, args.words, s, mode == "pack") for s in args.scales]
            base, top = runs[0]["maxrss_mib"], runs[-1]["maxrss_mib"]
            report["runs"][mode] = {
                "runs": runs,
                "ratio": top / base,
                "verdict": "met" if top <= 1.10 * base else "missed",
            }
            print(
                f"{mode}: " + ", ".join(f"{r['scale']}x {r['maxrss_mib']:.0f} MiB" for r in runs), f"{top / base:.3f}"
            )
    print(write_results("label_memory", report, args.results))


if __name__ == "__main__":
    main()
