"""Reading a store without walking every shard record: `pipeline inspect` from the root's totals and a bounded,
evenly spaced sample of shards; the loader's store fingerprint streamed record by record; no torch or
transformers in a process that opens, inspects or verifies a store."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline.data import ManifestError, ShardBuilder, StoreWriter, open_store
from kd_pipeline.data.inspect import summarize
from kd_pipeline.pipeline.cli import cli
from tests.conftest import make_manifest, random_example

SHARDS = 40  # a version-2 root of one 32-record segment and 8 of one record each


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 shards of 1-3 random examples; shard u's stats: entropy (u+1) over 2(u+1) rows, count u+1."""
    path = tmp_path_factory.mktemp("bounded") / "store"
    m = make_manifest("zarr")
    rng = np.random.default_rng(5)
    with StoreWriter(path, m) as w:
        for u in range(SHARDS):
            b = ShardBuilder("causal-lm", m.targets)
            for _ in range(1 + u % 3):
                ex = random_example(rng, "causal-lm", m.targets, m.vocab_size)
                b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"])
            stats = {"entropy_sum": u + 1.0, "entropy_count": 2.0 * (u + 1), "count": u + 1.0}
            w.write_shard(u, b.build(), stats)
        w.finish()
    return path


def test_inspect_reads_an_even_sample_of_shards(store: Path) -> None:
    reader = open_store(store)
    s = summarize(reader, max_shards=5)
    picked = [0, 10, 20, 29, 39]  # round(i * 39 / 4)
    assert s["summary_shards"] == 5 and s["shards"] == SHARDS
    tails = np.concatenate([reader.shard(i).tail_mass.astype(np.float64) for i in picked])
    assert s["kept_mass"]["mean"] == pytest.approx(float((1 - tails).mean()), rel=1e-12)
    # bytes per column (its data files, not its zarr.json) over exactly those shards' files
    records = [reader.manifest.shards[i] for i in picked]
    files = [(rel.split("/"), f.bytes) for r in records for rel, f in r.files.items()]
    ids = sum(n for parts, n in files if parts[0] == "target_ids" and parts[-1] != "zarr.json")
    assert s["column_bytes_per_position"]["target_ids"] == pytest.approx(ids / sum(r.positions for r in records))
    # counts and the teacher's entropy over every shard, from the totals: sum(u+1) / sum(2(u+1)) = 0.5
    assert s["rows"] == sum(1 + u % 3 for u in range(SHARDS)) and s["teacher_entropy_mean"] == pytest.approx(0.5)
    everything = summarize(reader, max_shards=None)
    assert everything["summary_shards"] == SHARDS
    tails = np.concatenate([reader.shard(i).tail_mass.astype(np.float64) for i in range(SHARDS)])
    assert everything["kept_mass"]["mean"] == pytest.approx(float((1 - tails).mean()), rel=1e-12)


def test_inspect_reads_no_record_beyond_its_sample(store: Path, tmp_path: Path) -> None:
    """With the last segment unreadable, a summary from shard 0 alone still works (no walk over every record);
    reading every shard reaches the broken segment and says so."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    root = json.loads((copy / "manifest.json").read_text())
    assert len(root["segments"]) > 2
    (copy / root["segments"][-1]["path"]).write_text("{}")
    s = summarize(open_store(copy), max_shards=1)
    assert s["summary_shards"] == 1 and s["teacher_entropy_mean"] == pytest.approx(0.5) and s["shards"] == SHARDS
    with pytest.raises(ManifestError, match="records are corrupt"):
        summarize(open_store(copy), max_shards=None)


def test_cli_inspect_sample_options(store: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", str(store)])
    assert result.exit_code == 0 and f"16 of {SHARDS} shards" in result.output, result.output
    result = runner.invoke(cli, ["inspect", str(store), "--all-shards", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["summary_shards"] == SHARDS
    result = runner.invoke(cli, ["inspect", str(store), "--all-shards", "--max-shards", "3"])
    assert result.exit_code == 2 and "not both" in result.output


def test_store_fingerprint_is_the_digest_of_every_record(store: Path) -> None:
    """Streamed one record at a time, it equals the SHA-256 of the one JSON text it is defined as."""
    from kd_pipeline.data.dataset import store_fingerprint

    root = json.loads((store / "manifest.json").read_text())
    records = [r for ref in root["segments"] for r in json.loads((store / ref["path"]).read_text())["shards"]]
    shards = [[r["name"], r["rows"], sorted([p, f["sha256"]] for p, f in r["files"].items())] for r in records]
    text = json.dumps(["causal-lm", shards], separators=(",", ":"))
    assert len(records) == SHARDS
    assert store_fingerprint(open_store(store).manifest) == hashlib.sha256(text.encode()).hexdigest()


def test_reading_a_store_imports_no_torch(store: Path) -> None:
    code = (
        "import sys\n"
        "from kd_pipeline.pipeline.cli import cli\n"
        "from kd_pipeline.data import open_store\n"
        f"for args in (['inspect', {str(store)!r}, '--all-shards'], ['verify', {str(store)!r}]):\n"
        "    try:\n"
        "        cli(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        f"s = open_store({str(store)!r}); examples = list(s)\n"
        "print(len(examples), [m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == f"{sum(1 + u % 3 for u in range(SHARDS))} []"
