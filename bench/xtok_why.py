"""Why the cross-tokenizer student of ``bench/xtok_quality.py`` gains or loses: measurements on its --work folder.

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/xtok_why.py --work /tmp/kd-bench-xtok

Each student position (predicting the student's next token) is put in one class by the group (``stages.xtok_align``)
that starts or holds its next token: an aligned pair whose group is one teacher token and one student token (the
same string: "1:1"), one teacher token split into several student tokens ("student finer"), several teacher tokens
merged into one student token ("teacher finer"), several on both sides ("n:m"), or a position inside a group
("inside", no soft target). Measured per class:

1. On the training split (what the soft term is trained on): positions, and at aligned pairs the soft target's
   probability of the student's actual next token (the stored teacher probability of the teacher id with the
   same string when there is one; the rest bin's mass q_rest otherwise), against the teacher's probability of its
   own actual next token.
2. On the held-out split, for every finished run under --work: bits per character split by class (summed NLL of
   the class's predicted tokens / ln 2 / the characters they cover), so that a gain or loss can be placed.

Writes bench/results/xtok_why.json (--results names another).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from common import environment, markdown_table, write_results

from kd_pipeline import data
from kd_pipeline.data.dataset import held_out
from kd_pipeline.stages.models import load_tokenizer
from kd_pipeline.stages.source_spans import encode_with_spans, token_strings
from kd_pipeline.stages.xtok import teacher_entries
from kd_pipeline.stages.xtok_align import groups, vocab_map

NDArray = np.ndarray[Any, Any]
CLASSES = ("1:1", "student finer", "teacher finer", "n:m", "inside")


def _kind(n_teacher: int, n_student: int) -> int:
    if n_teacher == 1:
        return 0 if n_student == 1 else 1
    return 2 if n_student == 1 else 3


def _positions(store: data.StoreReader, ex: dict[str, NDArray], tok: Any, maps: tuple[Any, ...]) -> Any:
    """One example: the student's ids, each position's class, the characters its next token covers, and at each
    aligned pair (student position, target probability of the student's next token, teacher's of its own, whether
    the student's next token is shared, the target's mass on shared ids whose string is a proper prefix of it)."""
    forward, inverse, teacher, student = maps  # id maps (-1: no id with its string); each side's id strings
    width = 512  # the student's max_position_embeddings (bench/xtok_quality.py)
    raw = bytes(ex["text"])
    ((ids, spans),) = encode_with_spans(tok, [raw.decode("utf-8")])
    ids, spans = np.asarray(ids[:width]), spans[:width]
    kind = np.full(len(ids) - 1, 4)  # position i predicts token i + 1
    pairs = []
    for t0, t1, s0, s1 in groups(ex["token_spans"], spans):
        if t0 >= 1 and 1 <= s0 < len(ids):
            kind[s0 - 1] = _kind(t1 - t0, s1 - s0)
            pairs.append((s0 - 1, t0 - 1, int(ids[s0]), int(ex["input_ids"][t0])))
    chars = np.zeros(len(ids) - 1)
    done = 0
    for i, (a, b) in enumerate(spans[1:].tolist()):
        if b > a:
            chars[i] = len(raw[max(a, done) : b].decode("utf-8", errors="ignore"))
            done = max(done, b)
    rows = []
    if pairs:
        p = np.asarray(pairs)
        tid, prob, known = teacher_entries(ex, store.manifest.targets, p[:, 1])
        mapped = inverse[p[:, 2]]  # the teacher id with the student's next token's string, or -1
        q_shared = np.where(known & (tid == mapped[:, None]) & (mapped[:, None] >= 0), prob, 0.0).sum(1)
        shared_mass = np.where(known & (forward[tid] >= 0), prob, 0.0).sum(1)
        target = np.where(mapped >= 0, q_shared, 1.0 - shared_mass)  # the rest bin's mass when unshared
        own = np.where(known & (tid == p[:, 3][:, None]), prob, 0.0).sum(1)
        prefix = [
            sum(
                q
                for t, q, k in zip(tid[j].tolist(), prob[j].tolist(), known[j].tolist(), strict=True)
                if k and forward[t] >= 0 and nxt and teacher[t] != nxt and nxt.startswith(teacher[t])
            )
            for j, nxt in enumerate(student[i] for i in p[:, 2])
        ]
        rows = list(zip(p[:, 0].tolist(), target.tolist(), own.tolist(), (mapped >= 0).tolist(), prefix, strict=True))
    return ids, kind, chars, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kd-bench-xtok")
    ap.add_argument("--results", default="xtok_why")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    store = data.open_store(str(work / "store"))
    tok = load_tokenizer(str(work / "student"))
    teacher = data.source_text.read_token_strings(store.location, store.manifest)
    student = token_strings(tok, len(tok))
    forward = vocab_map(teacher, student)  # teacher id -> student id
    inverse = np.full(len(tok), -1, dtype=np.int64)
    inverse[forward[forward >= 0]] = np.flatnonzero(forward >= 0)
    maps = (forward, inverse, teacher, student)
    held = held_out(np.concatenate([store.shard_keys(s) for s in range(store.num_shards)]), 0.1)
    report: dict[str, Any] = {"env": environment("cpu"), "shared_ids": int((forward >= 0).sum()), "train": {}}

    # 1. the soft target on the training split
    counts, lists = np.zeros(5), [[[] for _ in range(4)] for _ in range(4)]  # target, own, shared, prefix
    for i in np.flatnonzero(~held):
        _, kind, _, rows = _positions(store, store[int(i)], tok, maps)
        counts += np.bincount(kind, minlength=5)
        for pos, *values in rows:
            for column, value in zip(lists, values, strict=True):
                column[kind[pos]].append(value)
    for k, name in enumerate(CLASSES):
        row: dict[str, Any] = {"positions": int(counts[k]), "share": float(counts[k] / counts.sum())}
        if k < 4 and lists[0][k]:
            target, own, shared, prefix = (np.asarray(column[k], dtype=float) for column in lists)
            row |= {
                "target_prob_of_next_mean": float(target.mean()),
                "target_prob_of_next_below_1pct": float((target < 0.01).mean()),
                "teacher_prob_of_own_next_mean": float(own.mean()),
                "next_token_shared": float(shared.mean()),
                "target_mass_on_shared_prefixes_mean": float(prefix.mean()),
            }
        report["train"][name] = row
    print(json.dumps(report["train"], indent=1), file=sys.stderr)

    # 2. held-out bits per character by class, per finished run
    examples = [_positions(store, store[int(i)], tok, maps) for i in np.flatnonzero(held)]
    report["held_out"] = {}
    for run in sorted(work.glob("run-*")):
        if not (run / "final").is_dir():
            continue
        model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
        nll, chars = np.zeros(5), np.zeros(5)
        with torch.no_grad():
            for ids, kind, ch, _ in examples:
                x = torch.as_tensor(ids)[None]
                lp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
                per = -lp.gather(1, x[0, 1:, None])[:, 0].numpy()
                nll += np.bincount(kind, weights=per, minlength=5)
                chars += np.bincount(kind, weights=ch, minlength=5)
        loop = json.loads((run / "bench.json").read_text())["row"] if (run / "bench.json").is_file() else {}
        report["held_out"][run.name] = {
            "bits_per_char": float(nll.sum() / math.log(2) / chars.sum()),
            "bits_per_char_of_the_loop": loop.get("bits_per_char"),  # the training loop's own evaluation
            "by_class": {
                n: {"bits_per_char": float(nll[k] / math.log(2) / max(chars[k], 1)), "chars": float(chars[k])}
                for k, n in enumerate(CLASSES)
            },
        }
        print(run.name, json.dumps(report["held_out"][run.name]), file=sys.stderr)
        write_results(args.results, report)
    path = write_results(args.results, report)
    rows = [
        [n, r["positions"], f"{r['share']:.3f}", f"{r.get('target_prob_of_next_mean', float('nan')):.3f}"]
        for n, r in report["train"].items()
    ]
    print(markdown_table(["class", "positions", "share", "target prob of next"], rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
