"""The healing schedule: how ``pipeline train`` trains a student cut from the teacher by ``pipeline init-student``.

A cut student is the teacher with blocks missing: its weights are a good start, and how it is trained back
(learning rate, warm-up, alpha, whether its embeddings move) decides how close it gets. ``init-student`` records
``HEALING_SCHEDULE`` in the student's ``init_student.json`` (key ``"healing"``); ``pipeline train`` reads it as
its defaults for that student, below a ``--config`` file and the options given on the command line, and says
which values it took. The values were chosen by measurement (``bench/healing.py``; BENCHMARKS.md, section 8).
``stages.train.run`` itself takes its config as given: a Python caller passes the schedule explicitly, e.g.
``TrainConfig(**student_schedule(folder), store=..., ...)`` (as ``pipeline demo`` does).

No torch here: the CLI reads the schedule before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["HEALING_KEY", "HEALING_SCHEDULE", "HealingScheduleError", "student_schedule"]

HEALING_KEY = "healing"
HEALING_SCHEDULE: dict[str, Any] = {
    "lr": 1e-3,
    "warmup": 1,
    "alpha": 0.5,
    "freeze_embeddings": False,
}
"""TrainConfig fields and their values for healing a cut student (measured: BENCHMARKS.md, section 8)."""


class HealingScheduleError(ValueError):
    """A student folder's recorded healing schedule cannot be used; the message says what to fix."""


def student_schedule(student: str) -> dict[str, Any]:
    """The healing schedule recorded in ``student``'s ``init_student.json``; ``{}`` for any other student.

    Raises:
        HealingScheduleError: the file names fields that ``pipeline train`` does not have, or values of the
            wrong type (a hand-edited or foreign file).
    """
    from dataclasses import fields

    from .init_student import INFO_FILE
    from .train import TrainConfig

    path = Path(student).expanduser() / INFO_FILE
    if not path.is_file():
        return {}
    try:
        schedule = json.loads(path.read_text()).get(HEALING_KEY, {})
    except (OSError, ValueError, AttributeError) as e:
        raise HealingScheduleError(
            f"{path} is not a readable JSON object ({e}); re-run pipeline init-student"
        ) from None
    if not isinstance(schedule, dict):
        raise HealingScheduleError(f"{path}: {HEALING_KEY!r} must be an object of train options, got {schedule!r}")
    # the field's annotation, e.g. "float" or "int | None" (a string: this package uses postponed annotations)
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    types = {f.name: kinds.get(str(f.type).split("|")[0].strip()) for f in fields(TrainConfig)}
    problems = []
    for key, value in schedule.items():
        want = types.get(key)
        if want is None or key in ("store", "student", "out"):
            problems.append(f"{key!r} is not a train option")
        elif not _fits(value, want):
            problems.append(f"{key!r} must be {want.__name__}, got {value!r}")
    if problems:
        raise HealingScheduleError(
            f"{path}: the {HEALING_KEY!r} schedule has " + "; ".join(problems) + "; fix or remove it"
        )
    return dict(schedule)


def _fits(value: Any, want: type) -> bool:
    """JSON's types against a field's: an int is a float too, a bool is not a number."""
    if isinstance(value, bool) or want is bool:
        return isinstance(value, bool) and want is bool
    return isinstance(value, want) or (want is float and isinstance(value, int))
