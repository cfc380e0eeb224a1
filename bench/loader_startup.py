"""Loader start-up against the number of shard records: ``StoreDataset`` construction time and memory (issue 13).

    .venv/bin/python bench/loader_startup.py                                  # 10k and 100k records
    .venv/bin/python bench/loader_startup.py --sizes 10000 100000 1000000     # + 1M (the build takes minutes)

For each size, a version-2 store of synthetic shard records (bench/commit_cost.py's: 20 files each, the size of
a zarr shard's record, one example each; their shard files do not exist, and start-up reads none) is written
through the writer's own record log. A fresh process then does what a trainer does before its first step:
``StoreDataset(store, batch_size=8, seed=0, num_workers=2)``, ``len(ds)`` and one ``state_dict``; it reports the
seconds from the constructor to there, its peak RSS (``VmHWM``) and the increment over its RSS before (after
importing the loader). The same is measured on a copy of the store whose root has the per-shard counts removed
(a root written before them: the loader then reads every record, the old path) at ``--old-sizes``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.rawstore: standard library only

from commit_cost import prefill, template
from common import write_results

from kd_pipeline.data import StoreWriter
from tests.rawstore import strip_counts

_START = """
import json, sys, time

def mem():  # (current, peak) RSS of this process in MB
    f = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(f["VmRSS"].split()[0]) / 1024, int(f["VmHWM"].split()[0]) / 1024

from kd_pipeline.data.dataset import StoreDataset
before, _ = mem()
t = time.perf_counter()
ds = StoreDataset(sys.argv[1], batch_size=8, seed=0, num_workers=2)
batches = len(ds)
ds.state_dict(0)
out = {"start_s": time.perf_counter() - t, "batches": batches, "examples": ds.num_examples}
out["rss_before_mb"] = before
out["peak_rss_mb"] = mem()[1]
out["start_increment_mb"] = mem()[1] - before
print(json.dumps(out))
"""


def start(path: Path) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": root, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _START, str(path)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--old-sizes", type=int, nargs="*", default=[10_000], help="sizes also measured on the old path")
    args = ap.parse_args()
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kd-loader-startup-") as tmp:
        for n in args.sizes:
            store = Path(tmp) / f"s{n}"
            t = time.perf_counter()
            with StoreWriter(store, template(2)) as w:
                prefill(w, n)
                w.finish()
            row: dict[str, Any] = {"shards": n, "build_s": time.perf_counter() - t}
            row["root_bytes"] = (store / "manifest.json").stat().st_size
            row["summaries"] = len(list((store / "records").glob("rows-*")))
            row["new"] = start(store)
            if n in args.old_sizes:
                strip_counts(store)
                row["old"] = start(store)
            shutil.rmtree(store)
            rows.append(row)
            old = (
                f"; old path {row['old']['start_s']:.2f} s +{row['old']['start_increment_mb']:.0f} MB"
                if "old" in row
                else ""
            )
            print(
                f"{n:>9,} records: start {row['new']['start_s']:.3f} s, peak RSS {row['new']['peak_rss_mb']:.0f} MB "
                f"(+{row['new']['start_increment_mb']:.1f} MB){old}",
                flush=True,
            )
    report = {
        "command": " ".join(["bench/loader_startup.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_before_after": [load, os.getloadavg()],
        "results": rows,
    }
    print(write_results("loader_startup", report))


if __name__ == "__main__":
    main()
