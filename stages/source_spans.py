"""Source texts, token byte spans and token strings: what ``pipeline label --spans`` records, and what
cross-tokenizer training computes the same way for the student's tokenizer.

Spans are byte offsets into the text's UTF-8 encoding (a Hugging Face fast tokenizer gives character offsets
into the Python string; :func:`byte_spans` converts them), so that they stay exact whatever the characters.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from .inputs import DataError, Example

__all__ = ["byte_spans", "encode_with_spans", "token_strings", "with_spans"]


def byte_spans(text: str, offsets: Any) -> np.ndarray[Any, Any]:
    """(L, 2) int32 byte ranges of ``text.encode()`` from (L, 2) character ranges of ``text``.

    Raises:
        UnicodeEncodeError: the text holds a lone surrogate (it has no UTF-8 encoding).
    """
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (C,) code points; refuses lone surrogates
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)  # UTF-8 bytes per character
    start = np.concatenate([[0], np.cumsum(width)])  # (C + 1,) byte offset of each character index
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans: np.ndarray[Any, Any] = start[off].astype(np.int32)
    # a special token the tokenizer added has no text: an empty range where the text before it ends, so that
    # ranges stay in text order (tokenizers report (0, 0) for them, also at the end of a sequence)
    ends = 0
    for t in range(len(spans)):
        if spans[t, 0] == spans[t, 1]:
            spans[t] = ends
        ends = max(ends, int(spans[t, 1]))
    return spans


def encode_with_spans(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], np.ndarray[Any, Any]]]:
    """Each text's ids (with the tokenizer's special tokens) and their byte spans, (L, 2) int32.

    Raises:
        DataError: the tokenizer cannot report offsets (not a fast tokenizer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"token spans need a fast (Rust) tokenizer, which reports each token's offsets; "
            f"{type(tokenizer).__name__} does not: use a tokenizer with a tokenizer.json"
        )
    enc = tokenizer(texts, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
    return [
        (list(ids), byte_spans(text, offsets))
        for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def with_spans(texts: list[str], tokenizer: Any, max_length: int, first: int) -> list[Example]:
    """Causal-lm examples of ``texts`` (truncated to ``max_length`` tokens), each with its source: the text as
    UTF-8, cut after the last kept token, and the tokens' byte spans. ``first``: index of ``texts[0]`` in the
    input, for messages."""
    raw = []
    for i, text in enumerate(texts):
        try:
            raw.append(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise DataError(
                f"record {first + i}: its text holds a lone surrogate, which has no UTF-8 encoding; fix the record "
                "or label without --spans"
            ) from None
    out = []
    for (ids, spans), source in zip(encode_with_spans(tokenizer, texts), raw, strict=True):
        ids, spans = ids[:max_length], spans[:max_length]
        if len(ids) < 2:
            continue
        cut = int(spans[:, 1].max())
        out.append(Example(np.asarray(ids, dtype=np.int64), source=(source[:cut], spans)))
    return out


METASPACE = "\u2581"
"""SentencePiece's word-boundary marker: a piece "\u2581cat" is " cat" in the text."""


def token_strings(tokenizer: Any, width: int) -> list[str | None]:
    """Each of ``width`` ids' text as the tokenizer decodes it alone, or None: a special token, an id past the
    tokenizer's size (padded embedding rows), or one that decodes to no text of its own (empty, or a byte-level
    piece of a character, which decodes to U+FFFD). Two tokenizers share a token when these strings are equal.

    A SentencePiece-style tokenizer (its decoder turns the marker U+2581 into a space) strips that space from a
    piece decoded alone, so that "\u2581cat" and "cat" would both read "cat": its pieces are read with the marker
    as a space instead (" cat", as a byte-level BPE's piece for " cat" decodes); its byte-fallback pieces
    (<0x41>) as decoded.
    """
    special = set(tokenizer.all_special_ids)
    metaspace = _uses_metaspace(tokenizer)
    out: list[str | None] = []
    for i in range(width):
        if i in special or i >= len(tokenizer):
            out.append(None)
            continue
        piece = tokenizer.convert_ids_to_tokens(i) if metaspace else None
        if isinstance(piece, str) and not _BYTE_PIECE.fullmatch(piece):
            s = piece.replace(METASPACE, " ")
        else:
            s = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        out.append(s if s and "\ufffd" not in s else None)
    return out


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _uses_metaspace(tokenizer: Any) -> bool:
    """Whether a fast tokenizer's decoder turns U+2581 into a space (Metaspace, or Replace within a Sequence)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder")
    return decoder is not None and METASPACE in json.dumps(decoder, ensure_ascii=False)
