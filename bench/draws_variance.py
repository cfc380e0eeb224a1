"""How noisy are a sampled store's targets? The variance of each kind of stored draws, on the real teacher.

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/draws_variance.py --sequences 8 --draws 12 25 50 100 200

A sampled store keeps N draws per position and trains on counts / N, an unbiased estimate of the teacher's
distribution p; what it costs against the full distribution is that estimate's noise. This script computes, per
position, the summed variance sum_i Var[t_i] of the target t (for counts, which sum to 1, the noise the student's logit
gradient p_student - t carries, whatever the student) for N draws of each kind, on the teacher's full T=1
distributions at the positions a store labels (every one but each sequence's last) over the first
``--sequences`` x 256 tokens of the built-in corpus:

* ``multinomial`` (pipeline label's default draws): t_i = count_i / N, count_i ~ Binomial(N, p_i):
  Var = sum_i p_i (1 - p_i) / N.
* ``systematic`` (``--draws systematic``): count_i is floor(N p_i) or ceil(N p_i), the latter with probability
  f_i = frac(N p_i): Var = sum_i f_i (1 - f_i) / N^2.
* ``ht`` and ``ht_systematic`` (not stores the pipeline writes: what storing each drawn id's exact probability
  instead of its count would give): the Horvitz-Thompson weight t_i = p_i / pi_i for a drawn id, pi_i its chance
  of being drawn at all: Var = sum_i p_i^2 (1 - pi_i) / pi_i. For multinomial draws pi_i = 1 - (1 - p_i)^N; for
  systematic ones pi_i = min(1, N p_i), so Var = sum over the ids with N p_i < 1 of p_i (1 - N p_i) / N: the ids
  with N p_i >= 1 exact, the others as systematic counts carry them (such an id's count is 0 or 1). These
  targets do not sum to 1, so their gradient noise also depends on the student (q (sum_i t_i - 1)); the summed
  variance is what is compared.

Each count closed form is checked against ``--realisations`` draws made by the labeler's own sampler
(``stages.soft_targets._draw``) on ``--check-rows`` positions: the summed empirical variance, its standard error
from batch means (8 groups of realisations), and z = (empirical - closed form) / standard error. Also recorded:
the expected number of unique ids per position (what a store pays bytes for: ~1.8 bytes each for id + count
after compression, BENCHMARKS section 2), sum_i pi_i for multinomial draws and sum_i min(1, N p_i) for
systematic ones.

Results: bench/results/draws_variance.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from common import RESULTS, code_digests, environment, markdown_table, pin_threads, write_results

LENGTH = 256


def teacher_distributions(sequences: int) -> torch.Tensor:
    """(positions, V) float64: the default teacher's T=1 distribution at each position of the corpus's start that
    a store labels (each sequence's last position has no next token: not labelled)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_pipeline.stages.default_teacher import load_default_teacher_dequantised
    from kd_pipeline.stages.inputs import default_corpus, load_records, prepare_examples

    folder = str(load_default_teacher_dequantised(log=lambda msg: None))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    records, _ = load_records(str(default_corpus(lambda msg: None)))
    # packed as `pipeline label --pack` packs it (documents joined with EOS, cut every LENGTH tokens)
    packed = prepare_examples(
        records, tok, task="causal-lm", text_field="text", label_field=None, max_length=LENGTH, pack=True
    )
    rows = torch.as_tensor(np.stack([e.input_ids for e in packed[:sequences]]))
    out = []
    with torch.no_grad():
        for row in rows.split(1):
            out.append(torch.softmax(model(row).logits[0, :-1].double(), dim=-1))
    return torch.cat(out)


def closed_forms(p: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Per position (P,): each scheme's summed target variance, and the expected unique ids of each draw."""
    frac = n * p - torch.floor(n * p)
    pi = -torch.expm1(n * torch.log1p(-p.clamp_max(1 - 1e-16)))  # 1 - (1 - p)^n, accurate for tiny p
    ht = torch.where(pi > 0, p * p * (1 - pi) / pi.clamp_min(1e-300), torch.zeros_like(p))
    return {
        "multinomial": (p * (1 - p)).sum(-1) / n,
        "systematic": (frac * (1 - frac)).sum(-1) / n**2,
        "ht": ht.sum(-1),
        "ht_systematic": torch.where(n * p < 1, p * (1 - n * p) / n, torch.zeros_like(p)).sum(-1),
        "unique_multinomial": pi.sum(-1),
        "unique_systematic": torch.clamp(n * p, max=1.0).sum(-1),
    }


def empirical(p: torch.Tensor, n: int, scheme: str, realisations: int, groups: int = 8) -> tuple[float, float]:
    """The summed variance of count / N over ``realisations`` draws by the labeler's sampler (mean over the rows),
    and its standard error from batch means: the variance computed within each of ``groups`` groups of
    realisations, their spread / sqrt(groups)."""
    from kd_pipeline.stages.soft_targets import _draw

    probs = p.float()
    sums = torch.zeros(groups, 2, *p.shape, dtype=torch.float64)  # [group][sum, sum of squares] per (row, id)
    for r in range(realisations):
        ids, counts, unique = _draw(probs, n, [7, n, r], None, scheme)
        row = torch.repeat_interleave(torch.arange(p.shape[0]), unique)
        t = torch.zeros(p.shape, dtype=torch.float64).index_put_((row, ids), counts.double() / n, accumulate=True)
        sums[r % groups, 0] += t
        sums[r % groups, 1] += t * t

    def summed_var(s1: torch.Tensor, s2: torch.Tensor, m: int) -> float:
        return float(((s2 - s1 * s1 / m) / (m - 1)).sum(-1).mean())

    per_group = torch.tensor(
        [summed_var(sums[g, 0], sums[g, 1], len(range(g, realisations, groups))) for g in range(groups)]
    )
    total = summed_var(sums[:, 0].sum(0), sums[:, 1].sum(0), realisations)
    return total, float(per_group.std() / groups**0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=8, help="256-token sequences of the built-in corpus")
    p.add_argument("--draws", type=int, nargs="+", default=[12, 25, 50, 100, 200])
    p.add_argument("--realisations", type=int, default=64)
    p.add_argument("--check-rows", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    pin_threads(args.threads)
    t0 = time.perf_counter()
    dist = teacher_distributions(args.sequences)
    report: dict[str, Any] = {
        "benchmark": "draws_variance",
        **environment(torch.device("cpu")),
        "config": vars(args),
        "positions": dist.shape[0],
        "vocab": dist.shape[1],
        "code": code_digests("kd_pipeline.stages.soft_targets"),
        "rows": [],
    }
    check = dist[torch.linspace(0, dist.shape[0] - 1, args.check_rows).long()]
    for n in args.draws:
        forms = {k: float(v.mean()) for k, v in closed_forms(dist, n).items()}
        sub = {k: float(v.mean()) for k, v in closed_forms(check, n).items()}
        checks = {s: empirical(check, n, s, args.realisations) for s in ("multinomial", "systematic")}
        report["rows"].append(
            {
                "draws": n,
                **forms,
                "check": {
                    s: {"closed_form": sub[s], "empirical": e, "stderr": se, "z": (e - sub[s]) / se}
                    for s, (e, se) in checks.items()
                },
            }
        )
        print(f"N={n}: {forms}  check {report['rows'][-1]['check']}", flush=True)
    report["wall_seconds"] = time.perf_counter() - t0

    def equivalent(r: dict[str, Any], v: float) -> str:
        """How many multinomial draws give the same variance (theirs is sum_i p_i (1 - p_i) / N)."""
        return f"{r['multinomial'] * r['draws'] / v:.0f}"

    table = [
        [
            r["draws"],
            f"{r['multinomial']:.5f}",
            *(
                f"{r[s]:.5f} ({r[s] / r['multinomial']:.2f}x; ~{equivalent(r, r[s])})"
                for s in ("systematic", "ht", "ht_systematic")
            ),
            f"{r['unique_multinomial']:.1f}",
            f"{r['unique_systematic']:.1f}",
        ]
        for r in report["rows"]
    ]
    header = ["N draws", "multinomial", "systematic (vs multinomial; ~ as many multinomial draws)", "ht (same)"]
    header += ["ht_systematic (same)"]
    print(markdown_table([*header, "unique ids, multinomial", "unique ids, systematic"], table))
    print("written", write_results("draws_variance", report, RESULTS / "draws_variance.json"))


if __name__ == "__main__":
    main()
