"""Labeling memory is flat in the size of the input: the peak RSS of a run on an input 10x larger stays within
15% + 16 MiB of the 1x run (each run a fresh process; bench/label_memory.py, which this test drives, measures it
at larger sizes). Holding the whole input (the records, then every token as a Python int and an int64 array)
grows the 10x run by ~(bytes of JSON + 16 bytes per token): at 1,500 records of 2,000 words that is far above
the bound, which the measured streaming runs stay well inside."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from label_memory import make_teacher, measure


def test_label_rss_is_flat_in_input_size(tmp_path: Path) -> None:
    teacher = make_teacher(tmp_path / "teacher")
    one, ten = (measure(tmp_path, teacher, 150, 2000, scale, pack=False) for scale in (1, 10))
    assert ten["input_bytes"] > 9 * one["input_bytes"]
    assert ten["maxrss_mib"] <= 1.15 * one["maxrss_mib"] + 16, (one, ten)
