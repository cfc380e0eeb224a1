"""The run directory's metrics file across a kill and a resume."""

from __future__ import annotations

import json
from pathlib import Path

from kd_pipeline.stages.run_dir import truncate_metrics


def test_truncate_metrics_drops_later_rows_and_a_torn_last_row(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 6)]
    # a kill while appending step 6's row: the file ends inside it, without a newline
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "split": "tr')
    truncate_metrics(path, 4)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:4])
    truncate_metrics(path, 10)  # nothing after the checkpoint: unchanged, and every row still ends a line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
