"""Where pure distillation (alpha 1) loses to hard labels: held-out cross-entropy split by whether the true next
token is among the teacher's stored top-k ids.

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/alpha_why.py --store STORE --eval-batches 4 --batch 4 \
        hard=RUN_DIR/final alpha0.5=RUN_DIR/final alpha1=RUN_DIR/final

At alpha 1 a student learns about a token outside the top-k only through the tail bin, which spreads the
teacher's remaining mass over every other id as the student spreads its own: nothing marks the true token. If
alpha 1's deficit sits on positions whose label is outside the top-k, the store's truncation is why; if it sits
inside, matching the teacher's distribution itself costs held-out likelihood at this horizon. Each model is run
over the first ``--eval-batches`` batches of the held-out split (what bench/healing.py's evaluations see); the
teacher's stored ids decide the split. Writes bench/results/alpha_why.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from common import environment, markdown_table, write_results


def split_ce(model_dir: str, store: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kd_pipeline.data.dataset import StoreDataset
    from kd_pipeline.stages.models import load_model

    model = load_model(model_dir, "causal-lm", device=torch.device("cpu"), dtype=torch.float32).eval()
    held = StoreDataset(store, batch_size=args.batch, shuffle=False, split="eval", eval_fraction=args.eval_fraction)
    sums = {"in": [0.0, 0], "out": [0.0, 0]}
    with torch.inference_mode():
        for i, batch in enumerate(held):
            if i >= args.eval_batches:
                break
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # (B, L-1, V)
            labels = batch["labels"]  # (B, L-1), -100 on padding
            valid = labels != -100
            nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, L-1)
            in_topk = (batch["target_ids"].long() == labels[..., None]).any(-1)  # (B, L-1)
            for key, mask in (("in", valid & in_topk), ("out", valid & ~in_topk)):
                sums[key][0] += float(nll[mask].sum())
                sums[key][1] += int(mask.sum())
    total = sums["in"][1] + sums["out"][1]
    out: dict[str, Any] = {
        "ce": (sums["in"][0] + sums["out"][0]) / total,
        "positions": total,
        "share_out_of_topk": sums["out"][1] / total,
    }
    for key in ("in", "out"):
        out[f"ce_{key}_topk"] = sums[key][0] / max(1, sums[key][1])
        # this part's contribution to the mean CE (so the two add up to the whole)
        out[f"ce_{key}_topk_contribution"] = sums[key][0] / total
    out["perplexity"] = math.exp(out["ce"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("models", nargs="+", help="NAME=MODEL_DIR")
    args = p.parse_args()
    report: dict[str, Any] = {"benchmark": "alpha_why", **environment(torch.device("cpu")), "store": str(args.store)}
    report["models"] = {}
    for item in args.models:
        name, folder = item.split("=", 1)
        report["models"][name] = {"folder": folder, **split_ce(folder, args.store, args)}
        print(name, report["models"][name], flush=True)
        write_results("alpha_why", report)
    rows = [
        [
            name,
            f"{r['perplexity']:.1f}",
            f"{r['share_out_of_topk']:.3f}",
            f"{r['ce_in_topk']:.3f}",
            f"{r['ce_out_topk']:.3f}",
            f"{r['ce_in_topk_contribution']:.3f}",
            f"{r['ce_out_topk_contribution']:.3f}",
        ]
        for name, r in report["models"].items()
    ]
    header = ["model", "ppl", "share out of top-k", "CE in", "CE out", "in: part of mean CE", "out: part of mean CE"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
