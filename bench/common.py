"""Helpers shared by the benchmark scripts: where a run happened, and how its results file is written.

The scripts run as ``.venv/bin/python bench/NAME.py`` (so this file is importable as ``common``). Every results
file holds the device, the CPU and GPU names, the date, the library versions, the exact command, the config and
the results, and is replaced atomically, so a run cut short leaves the last complete partial file.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def environment(device: Any) -> dict[str, Any]:
    """Device, CPU/GPU names, date, versions and the exact command of this run."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(device) if getattr(device, "type", str(device)) == "cuda" else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "command": shlex.join([".venv/bin/python", *sys.argv]),
    }


def code_digests(*modules: str) -> dict[str, str]:
    """SHA-256 (16 hex digits) of the measured modules' source files: they are edited while we measure."""
    import hashlib
    import importlib

    out = {}
    for name in modules:
        path = Path(importlib.import_module(name).__file__ or "")
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


def write_results(name: str, report: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``report`` to ``bench/results/<name>.json`` (or ``out``) atomically; returns the path."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    return path


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: list[float]) -> dict[str, float]:
    """min, median, max of repeated measurements (the spread is what tells noise from effect)."""
    return {"min": min(xs), "median": median(xs), "max": max(xs), "n": len(xs)} if xs else {"n": 0}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pin_threads(threads: int) -> None:
    """``threads`` > 0: pin this process to that many cores and torch to that many threads, so that other
    processes on a shared machine take the other cores instead of stalling ours (a parallel region waits for its
    slowest thread); 0 leaves torch's default. Ratios are what these benchmarks report: both sides run alike."""
    import torch

    if threads <= 0:
        return
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(cores[:threads]))
    torch.set_num_threads(threads)


def sync(device: Any) -> None:
    """Wait for queued GPU work before reading a clock (a no-op on CPU)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)
