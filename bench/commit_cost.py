"""Commit cost per shard at 100, 10,000 and 100,000 shards, and the cost of opening a 1,000,000-shard store.

    .venv/bin/python bench/commit_cost.py     # ~5-10 minutes on 2 CPU cores; writes bench/results/commit_cost.json

Commits: a store is first filled to N shards through the writer's own record path (synthetic records of a
20-file zarr-like shard, ~2.2 KB each, appended to the writer's log and committed in one root; their shard
files do not exist) and synced to disk, then WINDOW real commits of tiny one-example arrow shards are timed through
``StoreWriter.write_shard``: the whole commit, and its manifest part alone (segment + root writes, timed around
``Location.write_atomic``). Version 1 is measured the same way where it is feasible (every commit rewrites the
whole manifest) and extrapolated linearly beyond, labelled as an estimate.

Open: a version-2 store of 1,000,000 synthetic records written the same way; a fresh subprocess opens it with
the real reader (``open_store``, ``len``, totals, one record at the far end) and reports wall time, the
process's peak RSS (``VmHWM`` of /proc/self/status) and the open's increment (peak after the open minus the
RSS before it), beside a process that only imports the package. (``getrusage``'s ``ru_maxrss`` is not used: on
Linux a child keeps the high-water mark its parent had when it forked, and this parent holds the 1M records.)
Fingerprint: two more subprocesses open a store of ``--fingerprint-shards`` (100,000) synthetic records and hash
every record for the loader's ``store_fingerprint``: streamed (the code) and as the one JSON text it used to build
first, side by side (time and RSS increment; reading every record is most of the time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_results

from kd_pipeline.data import Manifest, ShardBuilder, StoreWriter, TargetSpec
from kd_pipeline.data.manifest import FileRecord, ShardRecord

TARGET_RATIO = 2.0
TARGET_OPEN_S = 2.0
TARGET_OPEN_MB = 200.0

_OPEN = """
import hashlib, json, sys, time

def mem():  # (current, peak) RSS of this process in MB
    f = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(f["VmRSS"].split()[0]) / 1024, int(f["VmHWM"].split()[0]) / 1024

mode, out = sys.argv[2], {}
t0 = time.perf_counter()
from kd_pipeline.data import open_store
if mode.startswith("fingerprint"):
    from kd_pipeline.data.dataset import store_fingerprint  # the loader's module: imports torch
out["import_s"] = time.perf_counter() - t0
before, _ = mem()
out["rss_before_open_mb"] = before
if mode != "import":
    t = time.perf_counter()
    s = open_store(sys.argv[1])
    out.update(examples=len(s), shards=len(s.manifest.shards), rows=s.manifest.rows)
    out["open_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["last_unit"] = s.manifest.shards[out["shards"] - 1].unit
    out["last_record_s"] = time.perf_counter() - t
    out["open_increment_mb"] = mem()[1] - before
if mode.startswith("fingerprint"):
    base, t = mem()[0], time.perf_counter()
    if mode == "fingerprint":
        out["fingerprint"] = store_fingerprint(s.manifest)
    else:  # the expression the loader used before: one list of every record, then one JSON text
        m = s.manifest
        shards = [[r.name, r.rows, sorted((p, f.sha256) for p, f in r.files.items())] for r in m.shards]
        text = json.dumps([m.task, shards], separators=(",", ":"))
        out["fingerprint"] = hashlib.sha256(text.encode()).hexdigest()
    out["fingerprint_s"] = time.perf_counter() - t
    out["fingerprint_increment_mb"] = mem()[1] - base
out["peak_rss_mb"] = mem()[1]
out["torch_imported"] = "torch" in sys.modules
out["transformers_imported"] = "transformers" in sys.modules
print(json.dumps(out))
"""


def template(version: int) -> Manifest:
    spec = TargetSpec(method="topk", k=4, temperature=1.0, num_classes=50)
    return Manifest(
        backend="arrow",
        task="causal-lm",
        targets=spec,
        vocab_size=50,
        teacher={"name_or_path": "bench"},
        tokenizer={"digest": "a" * 64},
        dataset={"source": "synthetic"},
        created="2026-12-03T00:00:00Z",
        format_version=version,
    )


def synthetic_record(unit: int) -> ShardRecord:
    """A record the size of a real zarr shard's: 20 files with sizes and SHA-256s."""
    files = {f"col{j:02d}/c/0": FileRecord(bytes=1000 + j, sha256=f"{unit:064x}") for j in range(20)}
    stats = {"kept_mass_sum": 100.0, "entropy_sum": 50.0, "teacher_nll_sum": 80.0, "count": 127.0}
    return ShardRecord(
        name=f"shard-{unit:06d}",
        path=f"shards/shard-{unit:06d}.arrow",
        unit=unit,
        rows=1,
        tokens=128,
        positions=127,
        files=files,
        stats=stats,
    )


def prefill(writer: StoreWriter, n: int) -> None:
    """N committed records, through the writer's own log (version 2, one commit per 8,192) or manifest
    (version 1, one commit)."""
    if writer._log is not None:
        for u in range(n):
            writer._log.append(synthetic_record(u))
            if (u + 1) % 8192 == 0:  # a flush drops sealed records from memory
                writer._log.flush(writer._v1)
        writer._log.flush(writer._v1)
    else:
        m = replace(writer._v1, shards=tuple(synthetic_record(u) for u in range(n)))
        writer._write_manifest(m)
        writer._v1 = m
    writer._units = None


def commit_window(path: Path, version: int, n: int, window: int) -> dict[str, Any]:
    m = template(version)
    rng = np.random.default_rng(0)
    with StoreWriter(path, m) as w:
        prefill(w, n)
        os.sync()  # the prefill's dirty pages would otherwise slow the timed commits' fsyncs
        spent = [0.0]
        original = w.location.write_atomic

        def timed(rel: str, data: bytes) -> None:
            t = time.perf_counter()
            original(rel, data)
            spent[0] += time.perf_counter() - t

        w.location.write_atomic = timed  # type: ignore[method-assign]
        totals, manifest_part = [], []
        for unit in range(n, n + window):
            b = ShardBuilder("causal-lm", m.targets)
            ids = rng.integers(0, 50, 8)
            top = np.argsort(-rng.random((7, 50)), axis=1)[:, :4]
            b.add(ids, top, np.full((7, 4), -2.0, np.float16), np.full(7, 1 - 4 * np.exp(-2.0), np.float32))
            data = b.build()
            spent[0] = 0.0
            t = time.perf_counter()
            w.write_shard(unit, data)
            totals.append(time.perf_counter() - t)
            manifest_part.append(spent[0])
    return {
        "shards_before": n,
        "window": window,
        "commit_s_per_shard": float(np.mean(totals)),
        "manifest_s_per_shard": float(np.mean(manifest_part)),
    }


def open_cost(path: Path, what: str) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": root, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _OPEN, str(path), what], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000, 100_000])
    ap.add_argument("--window", type=int, default=1024, help="timed commits at each size (v2)")
    ap.add_argument("--v1-sizes", type=int, nargs="+", default=[100, 10_000])
    ap.add_argument("--v1-window", type=int, default=16)
    ap.add_argument("--open-shards", type=int, default=1_000_000)
    ap.add_argument("--fingerprint-shards", type=int, default=100_000)
    ap.add_argument("--open-only", action="store_true", help="skip the commit windows (open and fingerprint only)")
    args = ap.parse_args()
    report: dict[str, Any] = {"command": " ".join(["bench/commit_cost.py", *sys.argv[1:]]), "date": "2026-12-03"}
    with tempfile.TemporaryDirectory(prefix="kd-commit-") as tmp:
        if not args.open_only:
            report["results"], report["verdicts"] = commits(Path(tmp), args)
        t = time.perf_counter()
        store = Path(tmp) / "million"
        with StoreWriter(store, template(2)) as w:
            prefill(w, args.open_shards)
            w.finish()
        build_s = time.perf_counter() - t
        root_bytes = (store / "manifest.json").stat().st_size
        baseline = open_cost(store, "import")
        opened = open_cost(store, "open")
        shutil.rmtree(store)
        store = Path(tmp) / "fingerprint"
        with StoreWriter(store, template(2)) as w:
            prefill(w, args.fingerprint_shards)
            w.finish()
        streamed = open_cost(store, "fingerprint")
        listed = open_cost(store, "fingerprint-list")
        print(
            f"open {args.open_shards:,} shards: {opened['open_s']:.3f} s, process peak RSS "
            f"{opened['peak_rss_mb']:.0f} MB, the open's increment {opened['open_increment_mb']:.1f} MB "
            f"(import only {baseline['peak_rss_mb']:.0f} MB); root {root_bytes:,} bytes; "
            f"store_fingerprint of {args.fingerprint_shards:,} records "
            f"{streamed['fingerprint_s']:.1f} s +{streamed['fingerprint_increment_mb']:.0f} MB (one JSON text: "
            f"{listed['fingerprint_s']:.1f} s +{listed['fingerprint_increment_mb']:.0f} MB)",
            flush=True,
        )
        report.setdefault("results", {}).update(
            {
                "open": {"shards": args.open_shards, "build_s": build_s, "root_bytes": root_bytes, **opened},
                "import_only": baseline,
                "fingerprint_streamed": streamed,
                "fingerprint_one_text": listed,
            }
        )
        same = streamed["fingerprint"] == listed["fingerprint"]
        report.setdefault("verdicts", {}).update(
            {
                "open_s": f"{'met' if opened['open_s'] <= TARGET_OPEN_S else 'missed'}: {opened['open_s']:.3f} s",
                "open_rss": f"{'met' if opened['peak_rss_mb'] <= TARGET_OPEN_MB else 'missed'}: "
                f"{opened['peak_rss_mb']:.0f} MB process peak, of which the open {opened['open_increment_mb']:.1f} MB "
                f"(target <= {TARGET_OPEN_MB:.0f} MB); torch imported: {opened['torch_imported']}",
                "fingerprint": f"streamed {streamed['fingerprint_increment_mb']:.0f} MB vs one text "
                f"{listed['fingerprint_increment_mb']:.0f} MB; same digest: {same}",
            }
        )
    print(json.dumps(report["verdicts"], indent=1))
    print(write_results("commit_cost", report))


def commits(tmp: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Commit seconds per shard (version 2 measured; version 1 measured where feasible, else extrapolated)."""
    v2 = [commit_window(tmp / f"v2-{n}", 2, n, args.window) for n in args.sizes]
    for r in v2:
        print(
            f"v2 at {r['shards_before']:>7,}: {r['commit_s_per_shard'] * 1e3:.2f} ms/commit "
            f"(manifest {r['manifest_s_per_shard'] * 1e3:.2f} ms)",
            flush=True,
        )
    v1 = [commit_window(tmp / f"v1-{n}", 1, n, args.v1_window) for n in args.v1_sizes]
    for r in v1:
        print(f"v1 at {r['shards_before']:>7,}: {r['commit_s_per_shard'] * 1e3:.2f} ms/commit", flush=True)
    # v1's commit is dominated by rebuilding and serialising the whole manifest (outside write_atomic, so
    # the whole commit is what grows): extrapolate it linearly from the largest measured size
    big = v1[-1]
    per_shard = big["commit_s_per_shard"] / big["shards_before"]
    v1_estimates = {str(n): per_shard * n for n in args.sizes if n > big["shards_before"]}
    ratio = v2[-1]["commit_s_per_shard"] / v2[0]["commit_s_per_shard"]
    ratio_manifest = v2[-1]["manifest_s_per_shard"] / v2[0]["manifest_s_per_shard"]
    results = {
        "v2_commits": v2,
        "v1_commits": v1,
        "v1_commit_s_per_shard_estimated": v1_estimates,
        "v2_ratio_last_to_first": ratio,
        "v2_manifest_ratio_last_to_first": ratio_manifest,
    }
    verdict = f"{'met' if ratio <= TARGET_RATIO else 'missed'}: {ratio:.2f}x (target <= {TARGET_RATIO}x)"
    return results, {"commit_ratio": verdict}


if __name__ == "__main__":
    main()
