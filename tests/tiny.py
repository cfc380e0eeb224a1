"""Tiny, real models and data for tests: a word-level tokenizer trained on the spot, 2-layer models from configs.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on a few sentences, the models are built with
``from_config`` and saved with ``save_pretrained``, so the stages load them through the same code paths as real
checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SENTENCES = [
    "the teacher labels the data once and the student learns from the cached soft labels",
    "a small student model is trained on the top k log probabilities of a large teacher",
    "knowledge distillation transfers dark knowledge from one network to another",
    "the tail mass keeps the probability that the top k ids do not cover",
    "stores are shared across teams and verified with checksums before training",
    "every shard is committed by an atomic rewrite of the manifest",
    "python is a programming language with readable syntax and many libraries",
    "the loader streams shards in a shuffled order that does not depend on the number of workers",
]
SPECIALS = ["[PAD]", "[UNK]", "[MASK]", "[EOS]", "[CLS]"]


def make_tokenizer(folder: Path) -> Any:
    """A word-level fast tokenizer over the words of SENTENCES, with pad/unk/mask/eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES * 2, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        eos_token="[EOS]",
        cls_token="[CLS]",
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def make_model(
    folder: Path,
    task: str,
    *,
    vocab_size: int,
    num_labels: int = 3,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    pad_rows: int = 0,
    tied: bool = False,
) -> Any:
    """A 2-layer Llama (causal-lm / seq-cls) or BERT (masked-lm) saved to ``folder`` with a tokenizer beside it;
    ``tied``: the Llama's head shares its embedding matrix (as SmolLM2's does)."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(folder)
    rows = vocab_size + pad_rows
    if task == "masked-lm":
        cfg = BertConfig(
            vocab_size=rows,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            pad_token_id=0,
        )
        model: Any = BertForMaskedLM(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=rows,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=tied,
        )
        if task == "seq-cls":
            cfg.num_labels = num_labels
            cfg.id2label = {i: f"class{i}" for i in range(num_labels)}
            cfg.label2id = {f"class{i}": i for i in range(num_labels)}
            model = LlamaForSequenceClassification(cfg)
        else:
            model = LlamaForCausalLM(cfg)
    # sharper-than-random logits, so top-k captures a real share of the mass
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    return model


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hostile_dir(path: Path) -> Path:
    """A working directory like a user's ML repository: its own ``data/`` and ``stages/`` packages and a
    ``pipeline.py`` that exit with status 3 when anything imports them, so a run that picks them up fails."""
    path.mkdir(parents=True, exist_ok=True)
    shout = "import sys\nsys.stderr.write('the user\\'s own {} was imported\\n')\nsys.exit(3)\n"
    for pkg in ("data", "stages"):
        (path / pkg).mkdir(exist_ok=True)
        (path / pkg / "__init__.py").write_text(shout.format(pkg + "/"))
    (path / "pipeline.py").write_text(shout.format("pipeline.py"))
    return path


def labelling_world(root: Path) -> dict[str, Any]:
    """A tiny causal-LM teacher (3 padded embedding rows) and a JSONL corpus of the test sentences with class
    labels, under ``root``: what the sampled and hybrid labeling tests label."""
    vocab = len(make_tokenizer(root / "tok"))
    docs = [{"text": s, "label": i % 3} for i, s in enumerate(SENTENCES * 4)]
    out: dict[str, Any] = {"root": root, "vocab": vocab, "data": write_jsonl(root / "docs.jsonl", docs)}
    out["teacher"] = make_model(root / "teacher", "causal-lm", vocab_size=vocab, pad_rows=3)
    return out
