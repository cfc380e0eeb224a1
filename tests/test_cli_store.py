"""`pipeline verify` and `pipeline inspect` through click's CliRunner, and import discipline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline.pipeline.cli import cli
from tests.conftest import write_store


def test_verify_ok_and_bad(tmp_path: Path, backend: str) -> None:
    write_store(tmp_path / "s", backend)
    runner = CliRunner()
    result = runner.invoke(cli, ["verify", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "intact" in result.output
    victim = max((p for p in (tmp_path / "s" / "shards").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(b"\0" + victim.read_bytes()[1:])
    result = runner.invoke(cli, ["verify", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "BAD" in result.output and "SHA-256" in result.output
    result = runner.invoke(cli, ["verify", "--json", str(tmp_path / "s")])
    assert result.exit_code == 1 and json.loads(result.stdout)["ok"] is False


def test_inspect_text_and_json(tmp_path: Path, backend: str) -> None:
    written = write_store(tmp_path / "s", backend)
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "bytes/token" in result.output and "kept mass" in result.output and "k=4" in result.output
    result = runner.invoke(cli, ["inspect", "--json", str(tmp_path / "s")])
    summary = json.loads(result.stdout)
    positions = sum(len(ex["tail_mass"]) for ex in written)
    assert summary["positions"] == positions and summary["rows"] == 15
    assert summary["bytes_per_position"] == summary["bytes"] / positions
    tokens = sum(len(ex["input_ids"]) for ex in written)
    assert summary["tokens"] == tokens and summary["bytes_per_input_token"] == summary["bytes"] / tokens
    per_token, per_position = summary["bytes"] / tokens, summary["bytes"] / positions
    text = runner.invoke(cli, ["inspect", str(tmp_path / "s")]).output
    assert f"= {per_token:.1f} bytes/token ({per_position:.1f} bytes/position)" in text
    expected_mean = sum(float((1 - ex["tail_mass"].astype("float32")).sum()) for ex in written) / positions
    assert abs(summary["kept_mass"]["mean"] - expected_mean) < 1e-5
    kept = np.concatenate([1 - ex["tail_mass"].astype("float32").astype("float64") for ex in written])
    for q in (5, 50, 95):
        assert summary["kept_mass"][f"p{q}"] == pytest.approx(np.percentile(kept, q), rel=1e-12)
    assert summary["teacher_entropy_mean"] == 1.0


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (["verify", str(tmp_path / "nope")], ["inspect", str(tmp_path)]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1
        assert "Traceback" not in result.output
        assert result.output.startswith("Error: ")
        assert len(result.output.strip().splitlines()) == 1


def test_imports_stay_light() -> None:
    """`import kd_pipeline.pipeline.cli` pulls no torch; `import kd_pipeline.data` pulls no transformers or torch."""
    code = (
        "import sys, kd_pipeline.pipeline.cli, kd_pipeline.data; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_python_dash_m_pipeline_help() -> None:
    out = subprocess.run([sys.executable, "-m", "kd_pipeline", "--help"], capture_output=True, text=True, check=True)
    assert "verify" in out.stdout and "inspect" in out.stdout
