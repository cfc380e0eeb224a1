"""A training run's directory: atomic checkpoints (safetensors + JSON, no pickle), metrics.jsonl, loss_curve.png.

RUN_DIR/metrics.jsonl                    one JSON object per logged step and per evaluation
RUN_DIR/loss_curve.png                   training and evaluation loss against step
RUN_DIR/checkpoints/step-000100/         model.safetensors, optimizer.safetensors, state.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["Metrics", "latest_checkpoint", "load_checkpoint", "plot_metrics", "save_checkpoint", "truncate_metrics"]


def save_checkpoint(
    out: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    position: dict[str, Any],
    *,
    sharded: bool = False,
    write: bool = True,
) -> Path:
    """Write a checkpoint atomically (temp folder + rename). Safetensors and JSON only: no pickle.

    ``sharded``: the model is FSDP-sharded (``stages.sharding``); every rank must call this, to gather the full
    tensors, and only the one with ``write`` writes them, in the same files as an unsharded run.
    """
    import torch
    from safetensors.torch import save_file, save_model

    from .sharding import full_model_state, full_optimizer_state

    final = out / "checkpoints" / f"step-{step:06d}"
    weights = full_model_state(model) if sharded else None
    opt = full_optimizer_state(optimizer) if sharded else optimizer.state_dict()
    if not write:
        return final
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    if weights is None:
        save_model(model, str(tmp / "model.safetensors"))  # de-duplicates tied weights
    else:
        save_file(weights, str(tmp / "model.safetensors"))  # de-duplicated the same way
    tensors: dict[str, torch.Tensor] = {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"{pid}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "step": step,
        "data_position": position,
        "param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),  # LambdaLR keeps None for plain-function lambdas: JSON-able
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(
    ckpt: Path, model: Any, optimizer: Any, scheduler: Any, *, sharded: bool = False
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint; returns the step and the data position. ``sharded``: every rank reads the files and
    keeps its own shards (``stages.sharding``)."""
    import torch
    from safetensors.torch import load_file, load_model

    from .sharding import load_model_state, place_optimizer_state

    if sharded:
        load_model_state(model, load_file(str(ckpt / "model.safetensors")))
    else:
        load_model(model, str(ckpt / "model.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.cpu"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = value
    full = {"state": opt_state, "param_groups": state["param_groups"]}
    optimizer.load_state_dict(place_optimizer_state(optimizer, full) if sharded else full)
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), dict(state["data_position"])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from: they are about to be logged again.

    A run killed while appending a row leaves a last line without its newline: that row is torn (and logged
    after the checkpoint, since rows are appended as steps finish), so it is dropped, not parsed.
    """
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.split("\n")[:-1]  # complete lines only: what follows the last newline is a torn row, or ""
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class Metrics:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def plot_metrics(out: Path) -> None:
    """loss_curve.png from metrics.jsonl (skipped, with a note, if matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss_curve.png (pip install 'kd-pipeline[plot]')", file=sys.stderr)
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, key, style in (
        ("train", "loss", "-"),
        ("train", "kd", ":"),
        ("eval", "ce", "o-"),
        ("eval", "kd", "s--"),
    ):
        pts = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{split} {key}", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(out.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    plt.close(fig)
