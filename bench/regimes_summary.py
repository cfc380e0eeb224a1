"""Tables of bench/regimes.py's results: per run, each measure over seeds; paired (same seed) differences."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from common import markdown_table

PAIRS = [
    ("hybrid4x12@0.5", "sample50@0.5"),
    ("hybrid4x12@0.5", "topk16@0.5"),
    ("sample50@0.5", "topk16@0.5"),
    ("hybrid4x12@0.5", "topk32@0.5"),
    ("topk32@1", "topk32@0.5"),
    ("topk32@0.5", "online@0.5"),
    ("hybrid4x12@0.5", "online@0.5"),
    ("sample50@0.5", "online@0.5"),
    ("sample50@0.5", "topk32@0.5"),
    ("fresh4x12@0.5", "online@0.5"),
    ("hybrid4x12@0.5", "fresh4x12@0.5"),
    ("online@1", "online@0.5"),
    ("online@1", "topk32@1"),
    ("freshsample50@0.5", "online@0.5"),
    ("sample50@0.5", "freshsample50@0.5"),
    ("freshsample50@0.5", "fresh4x12@0.5"),
    ("sample50@1", "sample50@0.5"),
    ("sample50@1", "hard"),
    ("sample50@1", "topk32@1"),
    ("renorm32@0.5", "topk32@0.5"),
    ("renorm32@0.5", "online@0.5"),
    ("renorm32@0.5", "hard"),
    ("sys50@0.5", "sample50@0.5"),
    ("sys50@0.5", "online@0.5"),
    ("sys50@0.5", "hard"),
    ("sys50@0.5", "hybrid4x12@0.5"),
    ("freshsys50@0.5", "freshsample50@0.5"),
    ("freshsys50@0.5", "online@0.5"),
    ("sys50@0.5", "freshsys50@0.5"),
    ("sample200@0.5", "online@0.5"),
    ("hybrid12x32@0.5", "online@0.5"),
    ("sample200@0.5", "topk32@0.5"),
    ("hybrid12x32@0.5", "topk32@0.5"),
    ("hybrid12x32@0.5", "sample200@0.5"),
    ("sample200@0.5", "sample50@0.5"),
    ("sample200@0.5", "freshsample50@0.5"),
    ("hybrid12x32@0.5", "hybrid4x12@0.5"),
    ("sample200@0.5", "hard"),
    ("hybrid12x32@0.5", "hard"),
    ("sample50@0.5", "hard"),
    ("online@0.5", "hard"),
    ("sample50r1@0.5", "online@0.5"),
    ("sample50r2@0.5", "online@0.5"),
    ("sample50r1@0.5", "sample50@0.5"),
    ("sample50r2@0.5", "sample50@0.5"),
    ("sample50r1@0.5", "freshsample50@0.5"),
    ("sample50r2@0.5", "freshsample50@0.5"),
    ("sys50r1@0.5", "online@0.5"),
    ("sys50r1@0.5", "sys50@0.5"),
    ("sys50r1@0.5", "sample50r1@0.5"),
    ("hybrid4x12@1", "hybrid4x12@0.5"),
    ("hybrid4x12@1", "hard"),
    ("hybrid4x12@1", "sample50@1"),
    ("hybrid4x12@1", "online@1"),
]
"""Paired comparisons printed when both runs are there (item 5: the matched-size stores; item 6: alpha; the
issue's target: stored targets against online full-logit KD)."""

REALISATIONS = {
    "sample50@0.5": ["sample50@0.5", "sample50r1@0.5", "sample50r2@0.5"],
    "sys50@0.5": ["sys50@0.5", "sys50r1@0.5"],
}
"""A store of draws labelled with labeling seeds 0, 1, 2 (bench/regimes.py's rS suffix): one method, several stores."""
POOLED = [
    ("sample50@0.5", "online@0.5"),
    ("sys50@0.5", "online@0.5"),
    ("sys50@0.5", "sample50@0.5"),
    ("sample50@0.5", "hard"),
]
"""Pairs over every realisation of a (and, where b has them too, the same realisation of b), seed by seed."""

MEASURES = [("pydoc", "perplexity"), ("corpus2", "perplexity"), ("pydoc", "kl"), ("pydoc", "top1")]


def _value(row: dict[str, Any], corpus: str, key: str) -> float | None:
    value = row.get(corpus, {}).get(key)
    return None if value is None else float(value)


def _spread(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.fmean(xs), fmt)} ({format(min(xs), fmt)}..{format(max(xs), fmt)})"


def per_seed(runs: list[dict[str, Any]], name: str, corpus: str, key: str) -> dict[int, float]:
    out = {}
    for r in runs:
        value = _value(r, corpus, key)
        if r["run"] == name and value is not None:
            out[r["seed"]] = value
    return out


def paired(runs: list[dict[str, Any]], a: str, b: str, corpus: str = "pydoc") -> dict[str, Any]:
    """a's perplexity / b's - 1, seed by seed: mean, min, max, seeds, and whether a is lower on every seed."""
    pa, pb = per_seed(runs, a, corpus, "perplexity"), per_seed(runs, b, corpus, "perplexity")
    seeds = sorted(set(pa) & set(pb))
    return _differences([pa[s] / pb[s] - 1.0 for s in seeds], seeds=seeds)


def _differences(diffs: list[float], **extra: Any) -> dict[str, Any]:
    """Relative differences (a / b - 1, one per pair): n, the pairs, mean, min, max, whether a is lower in every
    pair, and ``extra``; ``{"n": 0}`` when there are none."""
    if not diffs:
        return {"n": 0}
    return {
        "n": len(diffs),
        **extra,
        "per_seed": diffs,
        "mean": statistics.fmean(diffs),
        "min": min(diffs),
        "max": max(diffs),
        "lower_on_every_seed": all(d < 0 for d in diffs),
    }


def pooled(runs: list[dict[str, Any]], a: str, b: str, corpus: str = "pydoc") -> dict[str, Any]:
    """:func:`paired` over the store realisations of ``a`` (REALISATIONS), each against the realisation of ``b``
    with the same labeling seed where b has realisations (a realisation that b lacks is left out), else against
    b: every (realisation, seed) pair, as one sample. The pairs share b's runs, so they are not independent."""
    present = {r["run"] for r in runs}
    ours = dict(enumerate(REALISATIONS.get(a, [a])))  # labeling seed -> run name
    theirs = dict(enumerate(REALISATIONS[b])) if b in REALISATIONS else None
    diffs: list[float] = []
    used = 0
    for seed, name in ours.items():
        other = theirs.get(seed) if theirs is not None else b
        if name not in present or other is None or other not in present:
            continue
        d = paired(runs, name, other, corpus)
        diffs += d.get("per_seed", [])
        used += bool(d.get("n"))
    return _differences(diffs, realisations=used, median=statistics.median(diffs) if diffs else None)


def _pct(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "-"
    every = "every seed" if d["n"] >= 3 else f"{d['n']}/{d['n']} seeds"  # "every seed" reads strongly at n < 3
    never = "never" if d["n"] >= 3 else f"0/{d['n']} seeds"
    verdict = every if d["lower_on_every_seed"] else (never if all(x >= 0 for x in d["per_seed"]) else "")
    return f"{d['mean']:+.1%} ({d['min']:+.1%}..{d['max']:+.1%}) n={d['n']} {verdict}".rstrip()


def print_summary(paths: list[Path]) -> None:
    for path in paths:
        report = json.loads(path.read_text())
        runs, cfg = report.get("runs", []), report.get("config", {})
        names = list(dict.fromkeys(r["run"] for r in runs))
        t = report.get("teacher", {})
        print(
            f"\n## {report['regime']}: {cfg.get('steps')} steps of {cfg.get('batch_size')} x 256 tokens, "
            f"seeds {sorted({r['seed'] for r in runs})}; teacher pydoc ppl "
            f"{t.get('pydoc', {}).get('perplexity', float('nan')):.2f}, corpus2 ppl "
            f"{t.get('corpus2', {}).get('perplexity', float('nan')):.2f}\n"
        )
        stores = report.get("stores", {})
        rows = []
        for name in names:
            store = next(r["store"] for r in runs if r["run"] == name)
            cells = [
                _spread(list(per_seed(runs, name, c, k).values()), ".3f" if k != "perplexity" else ".2f")
                for c, k in MEASURES
            ]
            bpt = stores.get(store, {}).get("bytes_per_token_from_store")
            rows.append(
                [
                    name,
                    f"{bpt:.1f}" if bpt else "-",
                    *cells,
                    _pct(paired(runs, name, "hard")) if name != "hard" else "-",
                ]
            )
        header = ["run", "B/token", "pydoc ppl", "corpus2 ppl", "KL(t||s)", "top-1", "pydoc ppl vs hard, paired"]
        print(markdown_table(header, rows))
        rows = []
        for name in names:
            cells = [
                _spread(list(per_seed(runs, name, "pydoc", k).values()), ".3f")
                for k in ("share_out_of_topk", "ce_in_topk", "ce_out_topk")
            ]
            rows.append([name, *cells, _pct(paired(runs, name, "hard", "corpus2")) if name != "hard" else "-"])
        print()
        header = ["run", "share out of top-32", "CE in top-32", "CE out of top-32", "corpus2 ppl vs hard, paired"]
        print(markdown_table(header, rows))
        print()
        seed_rows = [
            [
                r["run"],
                r["seed"],
                *(
                    f"{v:.3f}"
                    if (v := _value(r, c, k)) is not None and k != "perplexity"
                    else "-"
                    if v is None
                    else f"{v:.2f}"
                    for c, k in MEASURES
                ),
                f"{r['train_seconds']:.0f}",
            ]
            for r in runs
        ]
        print(markdown_table(["run", "seed", "pydoc ppl", "corpus2 ppl", "KL(t||s)", "top-1", "train s"], seed_rows))
        rows = []
        for a, b in PAIRS:
            if a in names and b in names:
                rows.append([f"{a} vs {b}", _pct(paired(runs, a, b)), _pct(paired(runs, a, b, "corpus2"))])
        if rows:
            print()
            print(markdown_table(["pair", "pydoc ppl, paired", "corpus2 ppl, paired"], rows))
        rows = []
        for a, b in POOLED:
            d = pooled(runs, a, b)
            if d.get("realisations", 0) > 1:
                label = f"{a} vs {b}, {d['realisations']} stores x seeds"
                rows.append([label, f"{_pct(d)}, median {d['median']:+.1%}", _pct(pooled(runs, a, b, "corpus2"))])
        if rows:
            print()
            print(markdown_table(["pooled over store realisations", "pydoc ppl, paired", "corpus2 ppl, paired"], rows))
