"""Under torchrun, when rank 0 cannot merge the ranks' stores, every other rank stops with a one-line store error
that carries rank 0's reason (it used to die in gloo's "Connection closed by peer" traceback at the barrier
after rank 0 had exited). Two real gloo processes run ``stages.scale_out.merge_ranks`` here; rank 0's merge fails
because the ranks' stores it should merge do not exist."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

from kd_pipeline.data.errors import StoreError


def _rank(rank: int, out: str, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from kd_pipeline.stages.scale_out import merge_ranks

    try:
        merge_ranks(out, 2, rank, lambda msg: None)
        outcome = {"raised": None}
    except Exception as e:
        outcome = {"raised": type(e).__name__, "store_error": isinstance(e, StoreError), "message": str(e)}
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcome))
    # leave as `pipeline` does under torchrun (pipeline/cli.py main): the group that merge_ranks left after the
    # error is torn down, and the interpreter's finalisation, where gloo's threads abort a process, is skipped
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)


def test_other_ranks_stop_with_rank_0s_merge_error(tmp_path: Path) -> None:
    out = tmp_path / "store"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(str(out), port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["raised"] and first["store_error"], first  # rank 0's own error, as before
    assert second["store_error"] and "\n" not in second["message"], second
    assert second["message"] == (
        f"rank 1 stops: rank 0 could not merge the ranks' stores into {out}: {first['message']}"
    ), second
