"""Aligning two tokenizations of one text, and the two vocabularies, for cross-tokenizer distillation.

Both tokenizations are given as byte spans into the same UTF-8 text, (L, 2) [start, end) per token (a special
token the tokenizer added has an empty span; it is not part of the text and takes part in no group).

A **clean cut** of one tokenization is a byte offset that no token straddles: the start of its first text token,
the end of its last, and on both sides of every place where one token ends at or before the next one starts (a
character split over two byte-level tokens gives both the same span: no clean cut between them). The cuts common
to both tokenizations split the text into **groups**: runs of teacher tokens and runs of student tokens that cover
the same bytes. At the start of a group both models have read exactly the same text, so the teacher's
distribution over its next token and the student's over its next token are distributions over "what text comes
next" conditioned on the same prefix: those two positions are an **aligned pair**. Positions inside a group
(where one model is in the middle of a token that the other has not finished) have no counterpart and get the
student's hard-label term only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Group", "aligned_positions", "clean_cuts", "groups", "vocab_map"]

Group = tuple[int, int, int, int]
"""(t0, t1, s0, s1): teacher tokens [t0, t1) and student tokens [s0, s1) cover the same bytes (indices into the
full token sequences, special tokens included)."""


def clean_cuts(spans: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """(C,) int64 ascending: the byte offsets no token of this tokenization straddles (see the module docstring)."""
    s = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    s = s[s[:, 1] > s[:, 0]]  # text tokens only
    if not len(s):
        return np.zeros(0, dtype=np.int64)
    between = s[:-1, 1] <= s[1:, 0]  # (n - 1,) no overlap between token i and i + 1
    cuts = np.concatenate([s[:1, 0], s[:-1, 1][between], s[1:, 0][between], s[-1:, 1]])
    return np.unique(cuts)


def groups(teacher: np.ndarray[Any, Any], student: np.ndarray[Any, Any]) -> list[Group]:
    """The groups of two tokenizations of one text (see the module docstring), in text order.

    A group where one side has no text token (bytes the other tokenizer leaves between tokens, e.g. whitespace a
    word-level tokenizer skips) is left out.
    """
    t = np.asarray(teacher, dtype=np.int64).reshape(-1, 2)
    s = np.asarray(student, dtype=np.int64).reshape(-1, 2)
    cuts = np.intersect1d(clean_cuts(t), clean_cuts(s))  # (C,) ascending
    out: list[Group] = []
    t_first, s_first = _first_at(t, cuts), _first_at(s, cuts)  # (C,) first text token starting at or after a cut
    for c in range(len(cuts) - 1):
        t0, t1, s0, s1 = int(t_first[c]), int(t_first[c + 1]), int(s_first[c]), int(s_first[c + 1])
        if t0 < t1 and s0 < s1:
            out.append((t0, t1, s0, s1))
    return out


def _first_at(spans: np.ndarray[Any, Any], cuts: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """(C,) for each cut, the index of the first text token starting at or after it (one past the last text token
    if none)."""
    idx = np.flatnonzero(spans[:, 1] > spans[:, 0])  # (n,) indices of the text tokens, whose starts ascend
    if not len(idx):
        return np.zeros_like(cuts)
    k = np.searchsorted(spans[idx, 0], cuts, side="left")  # (C,)
    return np.where(k < len(idx), idx[np.minimum(k, len(idx) - 1)], idx[-1] + 1)


def aligned_positions(teacher: np.ndarray[Any, Any], student: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """(N, 2) int64: the aligned (teacher position, student position) pairs of two tokenizations of one text.

    Position i of a causal LM predicts token i + 1, so a group whose first tokens are t0 and s0 pairs teacher
    position t0 - 1 with student position s0 - 1; a group at the very start of the text has no pair unless both
    tokenizations put a token (e.g. BOS) before it.
    """
    pairs = [(t0 - 1, s0 - 1) for t0, _, s0, _ in groups(teacher, student) if t0 >= 1 and s0 >= 1]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def vocab_map(teacher: list[str | None], student: list[str | None]) -> np.ndarray[Any, Any]:
    """(V_teacher,) int64: for each teacher id, the student id with the same string, or -1 (no such student token,
    or a teacher id without a string of its own). One to one: where a string occurs more than once on a side, its
    lowest id is the one matched."""
    index: dict[str, int] = {}
    for sid, text in enumerate(student):
        if text is not None:
            index.setdefault(text, sid)
    out = np.full(len(teacher), -1, dtype=np.int64)
    for tid, text in enumerate(teacher):
        if text is not None and text in index:
            out[tid] = index.pop(text)
    return out
