"""Teachers bigger than one device: `--device-map` (accelerate places the layers on CPU and a disk offload folder
here) and `--tensor-parallel N` under torchrun (gloo on CPU), each against a single-device run of the same
teacher; the manifest records the placement, and a store resumes under another placement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from tests import rawstore
from tests.test_scale_out import torchrun
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl

# layer 1's weights go to disk (accelerate's offload folder), the rest stays in CPU memory
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("placement")
    make_model(root / "teacher", "causal-lm", vocab_size=len(make_tokenizer(root / "tok")))
    docs = write_jsonl(root / "docs.jsonl", [{"text": s} for s in SENTENCES * 2])
    args = {"teacher": str(root / "teacher"), "data": str(docs), "top_k": 4, "shard_size": 4, "temperature": 2.0}
    label(LabelConfig(out=str(root / "single"), **args), log=_quiet)
    return {"root": root, "args": args, "single": root / "single"}


def _quiet(msg: str) -> None:
    pass


def assert_same_labels(a: Path, b: Path) -> None:
    """The same examples and ids; log-probs and tails equal within float tolerance (the arithmetic may be split
    or ordered differently)."""
    sa, sb = data.open_store(a), data.open_store(b)
    assert (
        sb.manifest.complete
        and len(sa) == len(sb)
        and [s.unit for s in sb.manifest.shards] == [s.unit for s in sa.manifest.shards]
    )
    for x, y in zip(sa, sb, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["target_ids"], y["target_ids"])
        np.testing.assert_allclose(
            x["target_logprobs"].astype(np.float32), y["target_logprobs"].astype(np.float32), atol=2e-3
        )
        np.testing.assert_allclose(x["tail_mass"], y["tail_mass"], atol=1e-5)
    assert data.verify_store(b).ok


def test_device_map_over_cpu_and_disk_labels_as_one_device(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "mapped"
    label(LabelConfig(out=str(out), device_map=json.dumps(SPLIT), **world["args"]), log=_quiet)
    assert_same_labels(world["single"], out)
    m = data.open_store(out).manifest
    assert m.teacher["placement"] == {"device_map": SPLIT, "modules_per_device": {"cpu": 5, "disk": 1}}
    assert "device_map" not in m.config  # where the teacher ran is not content


def test_device_map_auto_with_a_memory_budget_offloads(world: dict[str, Any], tmp_path: Path) -> None:
    """accelerate's own placement: with 60 kB of CPU memory allowed, what does not fit goes to disk."""
    out = tmp_path / "auto"
    label(LabelConfig(out=str(out), device_map="auto", max_memory="cpu=60KB", **world["args"]), log=_quiet)
    assert_same_labels(world["single"], out)
    placed = data.open_store(out).manifest.teacher["placement"]
    assert placed["device_map"] == "auto" and placed["max_memory"] == "cpu=60KB"
    assert placed["modules_per_device"].get("disk", 0) >= 1 and placed["modules_per_device"].get("cpu", 0) >= 1


def test_a_store_resumes_under_another_placement(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(world["single"], out)
    raw = rawstore.load(out)  # a crash after 2 of the units, on one device
    raw["complete"], raw["shards"] = False, raw["shards"][:2]
    rawstore.save(out, raw)
    result = label(LabelConfig(out=str(out), device_map=json.dumps(SPLIT), **world["args"]), log=_quiet)
    units = len(data.open_store(world["single"]).manifest.shards)
    assert result.resumed_units == 2 and result.labelled_units == units - 2
    assert_same_labels(world["single"], out)


def test_bad_placements_are_one_line_errors(world: dict[str, Any], tmp_path: Path) -> None:
    a = world["args"]
    good = ["label", "--teacher", a["teacher"], "--data", a["data"], "--out", str(tmp_path / "x")]
    (tmp_path / "list.json").write_text("[1, 2]")
    cases = {
        "is not one of auto": ["--device-map", "everywhere"],
        "nor a JSON object": ["--device-map", str(tmp_path / "list.json")],
        "not one of auto, balanced": ["--device-map", '{"lm_head": "gpu7"}'],
        "--max-memory applies with --device-map only": ["--max-memory", "cpu=1GiB"],
        "expected DEVICE=SIZE pairs": ["--device-map", "auto", "--max-memory", "lots"],
        "needs exactly 2 torchrun processes": ["--tensor-parallel", "2"],
        "not both": ["--device-map", "auto", "--tensor-parallel", "2"],
    }
    for message, extra in cases.items():
        result = CliRunner().invoke(cli, [*good, *extra])
        assert result.exit_code == 1 and message in result.output, (message, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_tensor_parallel_jobs_label_as_one_device(world: dict[str, Any], tmp_path: Path) -> None:
    """One job of 2 tensor-parallel ranks labels the whole input; two such jobs (data-parallel, as --num-shards
    parts) merge into the same store."""
    a = world["args"]
    common = ["label", "--teacher", a["teacher"], "--data", a["data"], "--top-k", "4", "--shard-size", "4"]
    common += ["--temperature", "2.0", "--tensor-parallel", "2"]
    proc = torchrun(*common, "--out", str(tmp_path / "tp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_labels(world["single"], tmp_path / "tp")
    assert data.open_store(tmp_path / "tp").manifest.teacher["placement"] == {"tensor_parallel": 2}
    parts = [str(tmp_path / f"part{i}") for i in range(2)]
    for i, part in enumerate(parts):
        proc = torchrun(*common, "--num-shards", "2", "--shard-index", str(i), "--out", part)
        assert proc.returncode == 0, proc.stderr[-3000:]
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "merged"), *parts])
    assert result.exit_code == 0, result.output
    assert_same_labels(world["single"], tmp_path / "merged")


def test_tensor_parallel_takes_the_whole_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 torchrun ranks with --tensor-parallel 2 (two groups in one job) are refused before anything loads."""
    from kd_pipeline.stages.placement import PlacementError, plan

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PlacementError, match="needs exactly 2 torchrun processes"):
        plan(None, None, 2, 1, 0)
