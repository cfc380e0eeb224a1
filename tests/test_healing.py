"""The healing schedule: init-student records it in the student's folder, `pipeline train` takes it as its
defaults for that student, a --config file and explicit options override it, and --freeze-embeddings keeps the
embeddings fixed (tiny models built from configs; nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from tests.tiny import labelling_world

# A schedule no default resembles, written into the student's init_student.json by the tests.
SCHEDULE = {"lr": 0.0123, "warmup": 3, "alpha": 0.25, "freeze_embeddings": True}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny teacher, a store it labelled, and a 1-block student cut from it by init-student."""
    w = labelling_world(tmp_path_factory.mktemp("healing"))
    root = w["root"]
    label(LabelConfig(teacher=str(root / "teacher"), data=str(w["data"]), out=str(root / "store"), top_k=8,
                      shard_size=8), log=lambda msg: None)  # fmt: skip
    cut = CliRunner().invoke(
        cli,
        ["init-student", "--teacher", str(root / "teacher"), "--layers", "1", "--out", str(root / "student"),
         "--data", str(w["data"]), "--calibration-length", "16", "--calibration-tokens", "64"],
        catch_exceptions=False,
    )  # fmt: skip
    assert cut.exit_code == 0, cut.output
    return w


def _student(world: dict[str, Any], tmp_path: Path, schedule: Any) -> Path:
    """A copy of the cut student whose init_student.json holds ``schedule`` as its healing schedule."""
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(world["root"] / "student", folder)
    info = json.loads((folder / "init_student.json").read_text())
    info["healing"] = schedule
    (folder / "init_student.json").write_text(json.dumps(info))
    return folder


def _train(world: dict[str, Any], student: Path, run: Path, *extra: str) -> Any:
    args = ["train", "--store", str(world["root"] / "store"), "--student", str(student), "--out", str(run),
            "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--save-every", "2", *extra]  # fmt: skip
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_init_student_records_a_schedule_that_train_takes(world: dict[str, Any], tmp_path: Path) -> None:
    """The schedule init-student writes names train options only, and a run of the untouched student uses it."""
    from kd_pipeline.stages.train import TrainConfig

    folder = world["root"] / "student"
    recorded = json.loads((folder / "init_student.json").read_text())["healing"]
    assert recorded and set(recorded) <= set(TrainConfig.__dataclass_fields__)
    result = _train(world, folder, tmp_path / "run")
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: used[k] for k in recorded} == recorded
    assert "cut from its teacher by init-student" in result.output


def test_schedule_is_the_default_and_options_override_it(world: dict[str, Any], tmp_path: Path) -> None:
    student = _student(world, tmp_path, SCHEDULE)
    result = _train(world, student, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text()) | SCHEDULE == json.loads(
        (tmp_path / "run" / "config.json").read_text()
    )
    assert "--lr 0.0123, --warmup 3, --alpha 0.25, --freeze-embeddings" in result.output
    # a --config file overrides the schedule, and options given on the command line override both
    (tmp_path / "train.toml").write_text("alpha = 0.75\nlr = 0.5\n")
    result = _train(world, student, tmp_path / "run2", "--config", str(tmp_path / "train.toml"), "--lr", "0.002",
                    "--no-freeze-embeddings")  # fmt: skip
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert (used["lr"], used["alpha"], used["freeze_embeddings"], used["warmup"]) == (0.002, 0.75, False, 3)
    assert "sets --warmup 3;" in result.output


def test_fresh_student_keeps_the_train_defaults(world: dict[str, Any], tmp_path: Path) -> None:
    """A student folder without init_student.json (here: the same weights, file removed) gets no schedule."""
    from kd_pipeline.stages.train import TrainConfig

    student = _student(world, tmp_path, SCHEDULE)
    (student / "init_student.json").unlink()
    result = _train(world, student, tmp_path / "run")
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (used["lr"], used["alpha"], used["freeze_embeddings"]) == (
        TrainConfig.lr,
        TrainConfig.alpha,
        TrainConfig.freeze_embeddings,
    )
    assert "init-student" not in result.output


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"lr": "fast"}, "'lr' must be float, got 'fast'"),
        ({"freeze_embeddings": 1}, "'freeze_embeddings' must be bool, got 1"),
        ({"learning_rate": 0.1}, "'learning_rate' is not a train option"),
        ({"store": "/elsewhere"}, "'store' is not a train option"),
        ([0.1], "must be an object of train options"),
    ],
)
def test_bad_schedule_is_a_one_line_error(world: dict[str, Any], tmp_path: Path, schedule: Any, message: str) -> None:
    result = _train(world, _student(world, tmp_path, schedule), tmp_path / "run")
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_embeddings(world: dict[str, Any], tmp_path: Path, freeze: bool) -> None:
    """Frozen: the input embeddings leave training bit-identical while the blocks change; not frozen: they change."""
    student = _student(world, tmp_path, {})
    flag = "--freeze-embeddings" if freeze else "--no-freeze-embeddings"
    result = _train(world, student, tmp_path / "run", flag, "--lr", "0.01")
    assert result.exit_code == 0, result.output
    before = load_file(student / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    key = "model.embed_tokens.weight"
    assert torch.equal(before[key], after[key]) is freeze
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
