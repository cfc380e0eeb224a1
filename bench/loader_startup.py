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

    .venv/bin/python bench/loader_startup.py --first-batch     # bench/results/loader_first_batch.json

``--first-batch``: what a shard's first decode costs for the records of its segment. A store of
``--first-batch-shards`` (1,024) real one-example zarr shards is written through ``StoreWriter`` (one sealed
segment of 1,024 records), and a copy of it (shard files hard-linked) whose same records are in segments of 16
(written by the writer's record log, its carry shrunk to 4 x 4 as the tests shrink it). Fresh processes then
time, after ``StoreDataset(store, ...)``: reading record 0 alone (``record``: its segment read and checked, the
record parsed); every record of its segment (``all_records``: what a first decode paid when a segment's records
were all parsed as it was read); the first batch of one example in store order (``ordered``: ``record`` plus one
shard decoded); and the first batch of the trainer's defaults (``shuffled``: ``batch_size=8, seed=0``, blocks of
4 shards). ``--repeats`` times, the two stores interleaved; medians with min..max, and the segment files read.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.rawstore: standard library only

from commit_cost import prefill, template
from common import median, spread, write_results

from kd_pipeline.data import ShardBuilder, StoreWriter
from kd_pipeline.data.location import Location
from kd_pipeline.data.manifest import Totals
from kd_pipeline.data.reader import open_store
from kd_pipeline.data.record_log import RecordLog
from kd_pipeline.data.segments import SEGMENT_SHARDS
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

_FIRST = """
import json, sys, time
from kd_pipeline.data.dataset import StoreDataset
from kd_pipeline.data.location import Location

reads, real = [], Location.read_bytes
def counting(self, rel):
    reads.append(rel)
    return real(self, rel)
Location.read_bytes = counting

mode = sys.argv[2]
ds = StoreDataset(sys.argv[1], batch_size=8 if mode == "shuffled" else 1, seed=0, shuffle=mode == "shuffled")
reads.clear()
t = time.perf_counter()
if mode == "record":
    index = [ds.reader.manifest.shards[0].unit]
elif mode == "all_records":  # what a first decode paid before records were parsed on first use
    index = [r.unit for r in ds.reader.manifest.shards.segment(0)][:1]
else:
    index = next(iter(ds))["index"].tolist()
out = {"s": time.perf_counter() - t, "index": index}
out["segment_bytes_read"] = sum(len(real(ds.reader.location, r)) for r in reads if r.startswith("records/segment"))
out["segments_read"] = sum(r.startswith("records/segment") for r in reads)
print(json.dumps(out))
"""


def start(path: Path, script: str = _START, *args: str) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": root, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(path), *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--old-sizes", type=int, nargs="*", default=[10_000], help="sizes also measured on the old path")
    ap.add_argument("--first-batch", action="store_true", help="measure only the first batch's latency (above)")
    ap.add_argument("--first-batch-shards", type=int, default=SEGMENT_SHARDS)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.first_batch:
        first_batch(args.first_batch_shards, args.repeats)
        return
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
    save("loader_startup", load, rows)


def save(name: str, load: tuple[float, float, float], results: Any) -> None:
    report = {
        "command": " ".join(["bench/loader_startup.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_before_after": [load, os.getloadavg()],
        "results": results,
    }
    print(write_results(name, report))


def build(path: Path, shards: int) -> None:
    """``shards`` real zarr shards of one 128-token example each (top-4 of 50), committed one by one."""
    m = replace(template(2), backend="zarr")
    rng = np.random.default_rng(0)
    with StoreWriter(path, m) as w:
        for unit in range(shards):
            b = ShardBuilder("causal-lm", m.targets)
            top = np.argsort(-rng.random((127, 50)), axis=1)[:, :4]
            b.add(
                rng.integers(0, 50, 128),
                top,
                np.full((127, 4), -2.0, np.float16),
                np.full(127, 1 - 4 * np.exp(-2.0), np.float32),
            )
            w.write_shard(unit, b.build())
        w.finish()


def resegment(src: Path, dst: Path, seal: int) -> None:
    """A copy of ``src`` (shard files hard-linked) with the same records in segments of ``seal`` (a power of 4)."""
    manifest = open_store(src).manifest
    shutil.copytree(src / "shards", dst / "shards", copy_function=os.link)
    log = RecordLog(Location(dst), [], [], Totals())
    log.fanout, log.seal = 4, seal  # as tests shrink FANOUT / SEGMENT_SHARDS: sealed segments of `seal` records
    for record in manifest.shards:
        log.append(record)
    log.flush(manifest)


def first_batch(shards: int, repeats: int) -> None:
    load = os.getloadavg()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="kd-first-batch-") as tmp:
        t = time.perf_counter()
        stores = {str(shards): Path(tmp) / "big", "16": Path(tmp) / "small"}
        build(stores[str(shards)], shards)
        build_s = time.perf_counter() - t
        resegment(stores[str(shards)], stores["16"], 16)
        segments = {k: sorted(p.name for p in (v / "records").glob("segment-*")) for k, v in stores.items()}
        for _ in range(repeats):
            for mode in ("record", "all_records", "ordered", "shuffled"):
                for key, path in stores.items():
                    runs.setdefault(mode, {}).setdefault(key, []).append(start(path, _FIRST, mode))
    results: dict[str, Any] = {"build_s": build_s, "segments": {k: len(v) for k, v in segments.items()}}
    for mode, by_store in runs.items():
        indices = {json.dumps(r["index"]) for rs in by_store.values() for r in rs}
        assert len(indices) == 1, f"{mode}: the two stores gave different first batches"
        results[mode] = {
            f"{key} records per segment": {
                "seconds": spread([r["s"] for r in rs]),
                "segments_read": rs[0]["segments_read"],
                "segment_bytes_read": rs[0]["segment_bytes_read"],
            }
            for key, rs in by_store.items()
        }
        line = ", ".join(
            f"{key}: {median([r['s'] for r in rs]) * 1e3:.1f} ms "
            f"({min(r['s'] for r in rs) * 1e3:.1f}..{max(r['s'] for r in rs) * 1e3:.1f}; "
            f"{rs[0]['segments_read']} segments, {rs[0]['segment_bytes_read']:,} bytes)"
            for key, rs in by_store.items()
        )
        print(f"{mode:>8}: {line}", flush=True)
    save("loader_first_batch", load, results)


if __name__ == "__main__":
    main()
