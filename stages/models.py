"""Loading Hugging Face models and tokenizers for the stages, and the digests that identify them.

A store records which teacher and which tokenizer produced it: the weights digest is the SHA-256 of the
weight files on disk (safetensors / bin / gguf, in name order), the tokenizer digest the SHA-256 of its
vocabulary (token -> id, sorted). Two tokenizers with equal digests map every id to the same token, which is
what a student needs to share a store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .. import data
from .soft_targets import HEAD_DTYPES

__all__ = [
    "AUTO_CLASSES",
    "ModelLoadError",
    "OutputHead",
    "copy_tokenizer",
    "declared_task",
    "load_model",
    "load_student",
    "load_tokenizer",
    "output_width",
    "resolve_device",
    "resolve_dtype",
    "student_tokenizer_digest",
    "tokenizer_digest",
    "weights_digest",
]

# task -> transformers auto class name
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to pass instead."""


def resolve_device(device: str) -> torch.device:
    """ "auto" is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"--device {device!r} is not a torch device (expected auto, cpu, cuda, cuda:0)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for CUDA but no CUDA device is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto": bfloat16 on GPU (tensor cores, no overflow), float32 on CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"--dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def _check_source(name: str, what: str, gguf_file: str | None) -> None:
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise ModelLoadError(f"{what} path {name} does not exist; pass a model folder, a hub id, or --gguf-file")
    if gguf_file and path.is_dir() and not (path / gguf_file).is_file():
        raise ModelLoadError(f"--gguf-file {gguf_file} is not in {name}")


def load_tokenizer(
    name: str, *, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The tokenizer of a model folder, hub id or GGUF file."""
    from transformers import AutoTokenizer

    _check_source(name, "tokenizer", gguf_file)
    try:
        return AutoTokenizer.from_pretrained(
            name, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {name}: {str(e).splitlines()[0]}") from e


def load_model(
    name: str,
    task: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    placement: dict[str, Any] | None = None,
) -> Any:
    """A model for ``task`` in eval mode on ``device``, or placed by ``placement`` (``from_pretrained`` keyword
    arguments: a device map, or a tensor-parallel plan; stages/placement.py). Raises ModelLoadError."""
    import transformers

    _check_source(name, "model", gguf_file)
    cls = getattr(transformers, AUTO_CLASSES[task])
    try:
        model = cls.from_pretrained(
            name,
            gguf_file=gguf_file,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            **(placement or {}),
        )
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise ModelLoadError(f"cannot load a {task} model from {name}: {str(e).splitlines()[0]}") from e
    return (model if placement else model.to(device)).eval()


def output_width(model: Any) -> int:
    """Width of the model's output distribution: LM-head rows (vocabulary incl. padding) or number of classes."""
    if hasattr(model.config, "num_labels") and type(model).__name__.endswith("ForSequenceClassification"):
        return int(model.config.num_labels)
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of the vocabulary (token -> id, sorted by id)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def weights_digest(name: str, gguf_file: str | None = None) -> str | None:
    """SHA-256 over the model's weight files (name order); None for a hub id not present locally."""
    root = Path(name).expanduser()
    if not root.exists():
        return None
    if gguf_file:
        files = [root / gguf_file]
    elif root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            hashlib.file_digest(fh, lambda: h)  # adds the file's bytes to the running digest
    return h.hexdigest()


class OutputHead:
    """Logits at selected positions only: hidden (N, H) -> logits (N, V) float32.

    Causal LMs run their backbone once and apply the output head only to the positions that matter (real, not
    padding; in chunks when labeling; together with the loss in ``losses.chunked`` when training), so the
    (batch, seq, V) logits tensor is never built. The head's output transform, as the model's own forward applies
    it: ``scale`` (Cohere's logit_scale, 1 / Granite's logits_scaling), then ``softcap`` (Gemma 2's
    final_logit_softcapping). Models without a
    separable linear head
    (masked-lm heads with transforms, classifiers) run their full forward; their logits are small or only a
    few positions are read.

    ``head_dtype`` is the precision of the head's matmul (one of :data:`HEAD_DTYPES`). "model" runs it in the
    model's own dtype and upcasts the result: for a bf16 teacher the logits are rounded to bf16 first (8
    significant bits: 0.125 apart between 16 and 32, 8x the float16 spacing there, 0.0156). "float32" and
    "auto" keep a float32 copy of the head weight (made once, here: V x H x 4 bytes, 4 GB for 128k x 8k) and
    upcast the hidden rows before the matmul, so the logits are exact to float32 given the hidden states. A
    float32 model has nothing to upcast: no copy, the same computation as "model". A model whose head is not
    split off gives its logits from its own forward, in its own dtype: "auto" leaves it so (``logit_dtype`` says
    which precision resulted), and "float32" is refused for such a model unless it is float32 already.
    Training uses "model": the student's head must stay its own parameter.
    """

    def __init__(self, model: Any, task: str, head_dtype: str = "model") -> None:
        if head_dtype not in HEAD_DTYPES:
            raise ValueError(f"head_dtype {head_dtype!r} is not one of {', '.join(HEAD_DTYPES)}")
        self.model = model
        head: Any = model.get_output_embeddings() if task == "causal-lm" else None
        backbone = getattr(model, "base_model", None) if head is not None else None
        self.split = isinstance(head, torch.nn.Linear) and backbone is not None and backbone is not model
        self.head: Any = head
        self.backbone: Any = backbone
        self.softcap: float | None = getattr(model.config, "final_logit_softcapping", None) or None
        # Cohere multiplies the head's output by logit_scale, Granite divides it by logits_scaling: one factor here,
        # applied before the soft cap, as the models' own forward does
        scale = getattr(model.config, "logit_scale", None) or 1.0
        divisor = getattr(model.config, "logits_scaling", None) or 1.0
        self.scale: float | None = float(scale) / float(divisor) if (scale, divisor) != (1.0, 1.0) else None
        # the float32 copy of the head's weight and bias; None: the head runs as it is
        self.weight32: torch.Tensor | None = None
        self.bias32: torch.Tensor | None = None
        own = head.weight.dtype if self.split else next(model.parameters()).dtype
        if head_dtype != "model" and own != torch.float32:
            if self.split:
                # detached: labeling needs no gradient, and the copy is made once, not per chunk; a tensor-parallel
                # head's shards are gathered (every rank computes the whole logits, as the model's head returns them)
                self.weight32 = _whole(head.weight, "weight").float()
                self.bias32 = _whole(head.bias, "bias").float() if head.bias is not None else None
            elif head_dtype == "float32":
                raise ModelLoadError(
                    f"--head-dtype float32 needs a causal-lm teacher with a separate linear output head; "
                    f"{type(model).__name__} ({task}) computes its logits in its own forward, in "
                    f"{_dtype_name(own)}: use --dtype float32, or --head-dtype auto / model"
                )
        self.logit_dtype = "float32" if self.weight32 is not None else _dtype_name(own)
        """The precision the logits are computed in: "float32", or the model's dtype (a manifest records it)."""

    def hidden_or_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) hidden states when the head is split off, else (B, L, V) / (B, C) logits."""
        if self.split:
            hidden: torch.Tensor = self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]
            return hidden
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden or (N, V) logits -> (N, V) float32 logits (scale and softcap applied in float32)."""
        if not self.split:
            return rows.float()
        if self.weight32 is not None:
            z = torch.nn.functional.linear(rows.float().to(self.weight32.device), self.weight32, self.bias32)
        else:
            z = self.head(rows).float()
        if self.scale:
            z = z * float(self.scale)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _whole(param: torch.Tensor, what: str) -> torch.Tensor:
    """A head parameter as one plain tensor: a tensor-parallel shard gathered; refused when offloaded to disk."""
    full = getattr(param, "full_tensor", None)  # a DTensor
    value = full() if full is not None else param.detach()
    if value.device.type == "meta":
        raise ModelLoadError(
            f"the output head's {what} is offloaded (meta device) by the device map, so no float32 copy can be made: "
            'put "lm_head" on a GPU or "cpu" in --device-map, or use --head-dtype model'
        )
    return value.detach()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------- students


def load_student(student: str, manifest: data.Manifest) -> tuple[Any, Path | None]:
    """The student model (pretrained weights, or fresh from a config) and the folder of its tokenizer, if any."""
    import transformers

    path = Path(student).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--student {student} does not exist; pass a model folder or a config.json")
    cls = getattr(transformers, AUTO_CLASSES[manifest.task])
    folder = path if path.is_dir() else path.parent
    has_weights = path.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in path.iterdir())
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    try:
        if has_weights:
            model = cls.from_pretrained(path, dtype="float32")
        else:
            config_file = path / "config.json" if path.is_dir() else path
            raw = json.loads(config_file.read_text())
            config = transformers.AutoConfig.for_model(**raw)
            if manifest.task == "seq-cls":
                config.num_labels = manifest.targets.num_classes
            model = cls.from_config(config)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot load a {manifest.task} student from {student}: {str(e).splitlines()[0]}") from e
    return model, (folder if has_tokenizer else None)


_ARCH_SUFFIXES = {"ForCausalLM": "causal-lm", "ForMaskedLM": "masked-lm", "ForSequenceClassification": "seq-cls"}


def declared_task(student: str) -> str | None:
    """The task a student's config declares through its ``architectures`` (None when it declares none)."""
    path = Path(student).expanduser()
    config = path / "config.json" if path.is_dir() else path
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    tasks = {task for arch in archs for suffix, task in _ARCH_SUFFIXES.items() if str(arch).endswith(suffix)}
    return tasks.pop() if len(tasks) == 1 else None


def student_tokenizer_digest(folder: Path | None) -> str | None:
    """The tokenizer digest of a student folder, or None where it has no tokenizer."""
    if folder is None:
        return None
    return tokenizer_digest(load_tokenizer(str(folder)))


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Save the tokenizer in ``src`` into ``dst`` (a run's final folder), as transformers writes it."""
    load_tokenizer(str(src)).save_pretrained(dst)
