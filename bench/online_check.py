"""Check that bench/quality.py's online loop trains exactly as ``stages.train.run`` does: at alpha 0 (hard labels
only, the teacher's output unused) both must reach the same held-out perplexity from the same student, store,
seed and schedule, so that online KD and the stored-target runs of bench/regimes.py are paired by seed.

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/online_check.py [--store S] [--student DIR] [--steps 3]

Defaults: bench/regimes.py's top-32 store and early-regime student (``/tmp/regimes-work``). Writes
bench/results/online_check.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import environment, write_results
from quality import same_as_pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="/tmp/regimes-work/store-topk32")
    p.add_argument("--student", default="/tmp/regimes-work/student-early")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    from kd_pipeline.stages import train
    from kd_pipeline.stages.default_teacher import load_default_teacher_dequantised
    from kd_pipeline.stages.models import load_model

    teacher = load_model(
        str(load_default_teacher_dequantised(log=lambda m: None)),
        "causal-lm",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train.TrainConfig(
            store=args.store,
            student=args.student,
            out=tmp,
            alpha=0.0,
            steps=args.steps,
            batch_size=4,
            lr=2e-3,
            warmup=1,
            eval_fraction=0.2,
            eval_every=args.steps,
            eval_batches=1,
            save_every=args.steps,
            seed=args.seed,
            progress=False,
        )
        check = same_as_pipeline(cfg, teacher, 1.0, Path(tmp))
    offline, online = check["stages_train_run_perplexity"], check["online_loop_alpha0_perplexity"]
    diff = check["relative_difference"]
    print(f"stages.train.run {offline:.6f}, online loop at alpha 0 {online:.6f}, relative difference {diff:.2e}")
    write_results(
        "online_check",
        {
            "benchmark": "online_check",
            **environment(torch.device("cpu")),
            "config": vars(args),
            **check,
        },
    )


if __name__ == "__main__":
    main()
