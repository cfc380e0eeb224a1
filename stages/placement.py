"""Where the teacher's weights live when it does not fit one device: ``pipeline label --device-map`` (accelerate
spreads its layers over the visible GPUs, then CPU memory, then a disk offload folder) or ``--tensor-parallel N``
(transformers splits every layer's weights over N torchrun ranks, ``tp_plan="auto"``).

Both are decided before the teacher loads and recorded in the manifest's ``teacher.placement``: the request, and
how many modules went to each device (device map) or the tensor-parallel size. The placement is not compared when
a run resumes or parts merge: it changes where the arithmetic happens, not what is computed (labels equal a
single-device run's within float tolerance; tested on CPU).

Tensor parallelism takes a whole torchrun job (N ranks, one group): every rank runs the same batches and rank 0
writes. Data parallelism on top is several such jobs, each a ``--num-shards`` part, merged with ``pipeline merge``
(transformers 5 builds one mesh over the world and wraps any data-parallel dimension in FSDP, which fails for
inference: "FSDP requires a single root module").
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "NAMED_MAPS",
    "PLACEMENT_OPTIONS",
    "Placement",
    "PlacementError",
    "describe",
    "input_device",
    "parse_device_map",
    "parse_max_memory",
    "plan",
]

PLACEMENT_OPTIONS = ("device_map", "max_memory", "tensor_parallel")
"""The LabelConfig fields that say where the teacher runs: not part of a store's content."""

NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's named strategies: ``auto``/``balanced`` fill the GPUs evenly, ``sequential`` one after another;
then CPU memory, then disk."""


class PlacementError(ValueError):
    """A device map, memory budget or tensor-parallel size that cannot be used; the message says how to fix it."""


def parse_device_map(value: str) -> str | dict[str, int | str]:
    """A named strategy, or a JSON object (inline or in a file) mapping module names to devices: a GPU index,
    ``"cuda:N"``, ``"cpu"`` or ``"disk"``."""
    if value in NAMED_MAPS:
        return value
    path = Path(value).expanduser()
    try:
        raw = json.loads(path.read_text() if path.is_file() else value)
    except (OSError, json.JSONDecodeError):
        raw = None
    ok = isinstance(raw, dict) and raw and all(isinstance(k, str) for k in raw)
    if not ok or not all(_device_name(v) for v in raw.values()):
        raise PlacementError(
            f"--device-map {value!r} is not one of {', '.join(NAMED_MAPS)} nor a JSON object (inline or a file) "
            'mapping module names to devices, e.g. {"model.embed_tokens": 0, "model.layers.0": "cpu", '
            '"model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}'
        )
    return dict(raw)


def _device_name(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 0
    return isinstance(v, str) and (v in ("cpu", "disk", "meta") or v.startswith("cuda:") or v.isdigit())


def parse_max_memory(value: str) -> dict[int | str, str]:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (accelerate's form)."""
    out: dict[int | str, str] = {}
    for item in value.split(","):
        key, sep, budget = item.strip().partition("=")
        if not sep or not budget or not (key.isdigit() or key in ("cpu", "disk")):
            raise PlacementError(
                f"--max-memory {value!r}: expected DEVICE=SIZE pairs separated by commas, DEVICE a GPU index, cpu "
                "or disk, e.g. 0=70GiB,1=70GiB,cpu=200GiB"
            )
        out[int(key) if key.isdigit() else key] = budget
    return out


@dataclass(frozen=True)
class Placement:
    """How this process loads and feeds the teacher, and which part of a split run it labels.

    Attributes:
        load: keyword arguments for ``from_pretrained`` (empty: load whole, then move to the device).
        part, parts: this process's part of the work units (u % parts == part) and the number of parts.
        torchrun: launched by torchrun (parts write under ``OUT/.ranks`` and rank 0 merges them).
        writes: whether this process writes its part (False for the other ranks of a tensor-parallel group).
        request: what was asked, for the manifest.
    """

    load: dict[str, Any]
    part: int
    parts: int
    torchrun: bool
    writes: bool
    request: dict[str, Any]
    tensor_parallel: int = 1

    def writer(self, target: str, template: Any, overwrite: bool) -> Any:
        """The store writer of this part, or (the other ranks of a tensor-parallel group) a stand-in that writes
        nothing."""
        from .. import data

        return data.StoreWriter(target, template, overwrite=overwrite) if self.writes else _Follower(template)

    def committed(self, writer: Any, target: str) -> set[int]:
        """Units already committed to this part, as its writer found them (followers read them once the group's
        writer has opened the store)."""
        if self.tensor_parallel > 1:
            _barrier()
        if self.writes:
            return set(writer.committed_units)
        from .. import data
        from ..data.location import Location

        return {s.unit for s in data.read_manifest(Location(target)).shards}

    def finish(self, writer: Any, target: str, dataset: dict[str, Any]) -> Any:
        """Finish this part; every rank of a tensor-parallel group returns its writer's manifest."""
        from .. import data
        from ..data.location import Location

        manifest = writer.finish(dataset=dataset) if self.writes else None
        if self.tensor_parallel > 1:
            _barrier()
        return manifest if manifest is not None else data.read_manifest(Location(target))


class _Follower:
    """A tensor-parallel rank's stand-in for the store writer: its group's first rank writes the same shards."""

    def __init__(self, template: Any) -> None:
        self.manifest = template

    def __enter__(self) -> _Follower:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def write_shard(self, unit: int, shard: Any, stats: Any = None) -> None:
        pass


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _init_process_group() -> None:
    """The job's process group, with a timeout that outlasts a long labeling run (groups finish hours apart)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from . import process_group

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        process_group.init(backend, timeout=timedelta(hours=24))


def plan(
    device_map: str | None, max_memory: str | None, tensor_parallel: int, num_shards: int, shard_index: int
) -> Placement:
    """The placement for this process, from the options and torchrun's environment. Raises PlacementError."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and num_shards > 1 and tensor_parallel == 1:
        raise PlacementError("use either torchrun or --num-shards/--shard-index, not both")
    if device_map is not None and tensor_parallel > 1:
        raise PlacementError("use either --device-map (layers over devices) or --tensor-parallel, not both")
    if max_memory is not None and device_map is None:
        raise PlacementError("--max-memory applies with --device-map only")
    if tensor_parallel < 1:
        raise PlacementError(f"--tensor-parallel must be >= 1, got {tensor_parallel}")
    if tensor_parallel > 1:
        if world != tensor_parallel:
            raise PlacementError(
                f"--tensor-parallel {tensor_parallel} needs exactly {tensor_parallel} torchrun processes (WORLD_SIZE "
                f"is {world}): torchrun --nproc-per-node {tensor_parallel} -m kd_pipeline label ...; for data "
                "parallelism run several such jobs with --num-shards N --shard-index I and `pipeline merge` them "
                "(transformers wraps a data-parallel mesh dimension in FSDP, which inference cannot use)"
            )
        from transformers import DistributedConfig

        _init_process_group()
        tp_load = {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=tensor_parallel)}
        asked = {"tensor_parallel": tensor_parallel}
        return Placement(tp_load, shard_index, num_shards, False, rank == 0, asked, tensor_parallel=tensor_parallel)
    load: dict[str, Any] = {}
    request: dict[str, Any] = {}
    if device_map is not None:
        mapping = parse_device_map(device_map)
        load["device_map"] = request["device_map"] = mapping
        if max_memory is not None:
            load["max_memory"] = parse_max_memory(max_memory)
            request["max_memory"] = max_memory
        load["offload_folder"] = _offload_folder()
    if world > 1:
        return Placement(load, rank, world, True, True, request)
    return Placement(load, shard_index, num_shards, False, True, request)


def _offload_folder() -> str:
    """A folder of this process's own for weights a device map puts on "disk", removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="kd-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def describe(model: Any, placement: Placement) -> dict[str, Any]:
    """``teacher.placement`` for the manifest: the request, and where the modules went (device map: modules per
    device; tensor parallel: the size)."""
    if not placement.request:
        return {}
    out = dict(placement.request)
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        out["modules_per_device"] = dict(sorted(Counter(str(d) for d in device_map.values()).items()))
    return out


def input_device(model: Any, fallback: Any) -> Any:
    """The device the teacher's inputs go to: its input embedding's under a device map, else ``fallback``."""
    import torch

    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return fallback
    first = next(iter(device_map.values()))
    return torch.device(f"cuda:{first}" if isinstance(first, int) else ("cpu" if first in ("disk", "meta") else first))
