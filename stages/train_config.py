"""``pipeline train``'s configuration: ``TrainConfig`` (every option, its default and its check) and the result.

Kept apart from ``stages/train.py``'s loop so that the modules the loop is built from (``train_setup``,
``train_eval``, ``batch_loss``) can name it without importing the loop; ``stages.train`` re-exports all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .losses import check_loss_options
from .sharding import FSDP_DTYPES

__all__ = ["VERIFY_MODES", "TrainConfig", "TrainConfigError", "TrainResult"]

VERIFY_MODES = ("first-read", "full", "none")
"""``--verify``: checksums on each shard's first load (default), the whole store up front, or sizes only."""

# The CLI's flag for each loss option, so that the losses' own validator names them in its messages.
_LOSS_FLAGS = {"kind": "--loss", "temperature": "--temperature", "beta": "--beta", "tail": "--tail", "alpha": "--alpha"}


class TrainConfigError(ValueError):
    """One or more configuration problems, all listed."""


@dataclass
class TrainConfig:
    """Everything ``pipeline train`` needs. Defaults live here and nowhere else."""

    store: str = ""
    """The soft-label store to train from (path or fsspec URL)."""
    student: str = ""
    """Student: a model folder (weights: fine-tune) or a config.json / folder with only a config (fresh model)."""
    out: str = ""
    """Run directory for checkpoints, metrics and the final model."""
    loss: str = "forward-kl"
    """Soft loss over the k+1 bins: forward-kl, reverse-kl, jsd, skew-kl, skew-rkl, tvd."""
    beta: float = 0.5
    """jsd: mixture weight in (0, 1); skew-kl / skew-rkl: skew in [0, 1)."""
    alpha: float = 0.5
    """Weight of the soft (distillation) term; 1 - alpha weighs the hard-label cross-entropy."""
    temperature: float | None = None
    """Must equal the store's labeling temperature (default: take it from the store)."""
    tail: str = "bin"
    """bin: the unbiased k+1-bin loss; renormalise: the usual biased top-k loss, for comparison only (in training
    and evaluation)."""
    loss_chunk: int | None = None
    """Positions per chunk of the output head + loss for students whose head is one linear layer (causal-lm): the
    (positions x vocabulary) logits are never built. Default: as many as fit one 256 MiB float32 block of logits
    (512 at a 131,072-id vocabulary); 0: the dense head and loss, for comparison."""
    steps: int | None = None
    """Optimizer steps (default: derived from --epochs)."""
    epochs: float = 1.0
    """Passes over the training examples, used when --steps is not given."""
    batch_size: int = 8
    """Examples per micro-batch (per rank)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    warmup: int = 10
    """Linear warm-up steps, then cosine decay to 10% of the peak."""
    freeze_embeddings: bool = False
    """Keep the input embeddings (and an output head tied to them) fixed: a student cut from the teacher has the
    teacher's already, and a step skips their gradient and update."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    eval_store: str | None = None
    """A separate store for evaluation (default: hold out --eval-fraction of --store's examples)."""
    eval_fraction: float = 0.1
    """Fraction of --store's examples held out for evaluation when there is no --eval-store, chosen by each
    example's content key, so the same examples whatever the shard size or number of ranks (0 disables)."""
    eval_every: int = 50
    """Evaluate every N optimizer steps (and at the end)."""
    eval_batches: int = 50
    """At most N batches per evaluation."""
    save_every: int = 100
    """Write a checkpoint every N optimizer steps (and at the end)."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""
    seed: int = 0
    """Seed of initialisation, shuffling and dropout."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:N."""
    workers: int = 0
    """DataLoader worker processes per rank."""
    resume: bool = False
    """Continue from the latest checkpoint in --out."""
    verify: str = "first-read"
    """When the store's checksums are checked: first-read (each shard's files when this process first loads
    them; remote files as they are downloaded), full (the whole store up front, as `pipeline verify`, on rank 0
    before step one), or none (sizes, decoding and value checks only; remote downloads are still checked)."""
    progress: bool | None = None
    """Show a progress bar (default: when stderr is a terminal)."""
    fsdp: bool = False
    """Shard the student's parameters, gradients and optimizer state over torchrun's ranks with FSDP (PyTorch's
    fully_shard) instead of replicating it with DDP: for students that do not fit on one device."""
    fsdp_dtype: str = "bfloat16"
    """With --fsdp: the dtype the parameters are gathered in for compute (bfloat16: mixed precision; float32).
    Weights, gradient reduction and AdamW stay float32."""
    cross_tokenizer: bool = False
    """Train a student whose tokenizer differs from the teacher's, from a store labelled with --spans: positions
    aligned through the text, shared tokens matched exactly, the rest by a sorted-probability term
    (stages/xtok_train.py; README, "Cross-tokenizer training"). Without it such a student is refused."""
    trace: bool = False
    """Write RUN_DIR/trace/rank-NNNNN.jsonl: per step, the [epoch, index] of each example this rank trained on and
    a SHA-256 of its weights after the step (for debugging data-parallel runs)."""

    def validate(self) -> None:
        """Collect every problem into one error."""
        p = []
        for name in ("store", "student", "out"):
            if not getattr(self, name):
                p.append(f"--{name} is required")
        # the losses' one validator: the same rules kd_loss and distill_loss enforce (T None: taken from the store)
        p += check_loss_options(self.loss, self.temperature, self.beta, self.tail, self.alpha, _LOSS_FLAGS)
        if self.steps is not None and self.steps < 1:
            p.append(f"--steps must be >= 1, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            p.append(f"--epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if self.loss_chunk is not None and self.loss_chunk < 0:
            p.append(f"--loss-chunk must be >= 0 (0: dense), got {self.loss_chunk}")
        if self.warmup < 0 or self.workers < 0:
            p.append("--warmup and --workers must be >= 0")
        if not 0 <= self.eval_fraction < 1:
            p.append(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.fsdp_dtype not in FSDP_DTYPES:
            p.append(f"--fsdp-dtype must be one of {', '.join(FSDP_DTYPES)}, got {self.fsdp_dtype!r}")
        if self.verify not in VERIFY_MODES:
            p.append(f"--verify {self.verify!r} is not one of {', '.join(VERIFY_MODES)}")
        if p:
            raise TrainConfigError("; ".join(p))


@dataclass
class TrainResult:
    out: str
    steps: int
    final_loss: float
    eval: dict[str, float]
    seconds: float
