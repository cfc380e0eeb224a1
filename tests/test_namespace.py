"""The package installs as ``kd_pipeline`` and works from a directory that holds a user's own ``data/``,
``stages/`` and ``pipeline.py`` (each of which exits with status 3 when imported: see tests/tiny.hostile_dir)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import write_store
from tests.tiny import hostile_dir

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "pipeline"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    return hostile_dir(tmp_path / "user-repo")


def test_the_hostile_directory_is_hostile(user_repo: Path) -> None:
    """The guard itself: importing the user's modules from there fails loudly, so the tests below mean something."""
    for mod in ("data", "stages", "pipeline"):
        out = _run([sys.executable, "-c", f"import {mod}"], user_repo)
        assert out.returncode == 3, (mod, out)


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_cli_runs_from_a_user_repository(user_repo: Path, tmp_path: Path, how: str) -> None:
    store = tmp_path / "store"
    write_store(store)
    cmd = [str(CONSOLE_SCRIPT)] if how == "console-script" else [sys.executable, "-m", "kd_pipeline"]
    verify = _run([*cmd, "verify", "--json", str(store)], user_repo)
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["ok"] is True
    inspect = _run([*cmd, "inspect", "--json", str(store)], user_repo)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["rows"] == 15


def test_import_beside_a_user_data_package(user_repo: Path, tmp_path: Path) -> None:
    """``import kd_pipeline.data`` from a directory whose own ``data`` package is importable too: both coexist."""
    store = tmp_path / "store"
    write_store(store)
    (user_repo / "data" / "__init__.py").write_text("USERS = True\n")  # a harmless user package this time
    code = (
        "import data, kd_pipeline.data as kd, kd_pipeline.stages.losses, kd_pipeline.pipeline.cli; "
        f"assert data.USERS and not hasattr(data, 'open_store'); print(len(kd.open_store({str(store)!r})))"
    )
    out = _run([sys.executable, "-c", code], user_repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "15"


def test_no_top_level_modules_in_the_wheel(tmp_path: Path, user_repo: Path) -> None:
    """A built wheel holds only ``kd_pipeline/...`` (the linked folders copied in), and runs from a user's
    repository without this checkout on the path."""
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources, which stay untouched
    src = tmp_path / "src"
    junk = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "runs", "bench", ".*cache")
    shutil.copytree(REPO, src, symlinks=True, ignore=junk)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    build = _run(
        [*pip_wheel, str(src)],
        tmp_path,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("kd_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("kd_pipeline/") for n in code), code
    for module in ("data/manifest.py", "stages/train.py", "pipeline/cli.py", "__main__.py"):
        assert f"kd_pipeline/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "pipeline = kd_pipeline.pipeline.cli:main" in entry_points

    site = tmp_path / "site"
    install = _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], tmp_path
    )
    assert install.returncode == 0, install.stderr
    code_check = "import kd_pipeline.data, sys; print(kd_pipeline.data.__file__)"
    # -I: isolated, so neither the checkout nor its editable install is on the path; the wheel's copy is used.
    out = _run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code_check}"], user_repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site / "kd_pipeline" / "data"))
