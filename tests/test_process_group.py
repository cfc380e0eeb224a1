"""stages/process_group.py: the group pipeline starts is destroyed at the end of its command, one a caller started
is left alone (a 1-process gloo group here; the 2-rank runs in tests/test_fsdp.py and tests/test_scale_out.py go
through the same calls)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from kd_pipeline.stages import process_group


def test_a_group_pipeline_started_is_destroyed_and_a_callers_group_is_kept(tmp_path: Path) -> None:
    kwargs = {"rank": 0, "world_size": 1}
    process_group.init("gloo", init_method=f"file://{tmp_path / 'a'}", **kwargs)
    assert dist.is_initialized()
    process_group.init("gloo", init_method=f"file://{tmp_path / 'b'}", **kwargs)  # already there: no second group
    process_group.teardown()
    assert not dist.is_initialized()
    # a group the caller started
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'c'}", **kwargs)
    try:
        process_group.init("gloo", init_method=f"file://{tmp_path / 'd'}", **kwargs)
        process_group.teardown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
