"""Aligning two tokenizations of one text: hand-checked spans, then two real tokenizers built here (a word-level
one and a byte-level BPE trained on a few paragraphs) on strings with whitespace, unicode and a word each splits
differently."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kd_pipeline.stages.source_spans import encode_with_spans, token_strings
from kd_pipeline.stages.xtok_align import aligned_positions, clean_cuts, groups, vocab_map

PARAGRAPHS = [
    "Knowledge distillation trains a small student to match a large teacher. The teacher runs once; its soft "
    "labels are cached and streamed into training.",
    "A café in the naïve town served crème brûlée – the student learned from the teacher's probabilities.",
    "Tokenizers differ: one splits words into pieces, another keeps whole words. The text is what they share.",
]


def test_whitespace_a_word_level_tokenizer_skips() -> None:
    # "the cat  sat": a byte-level teacher keeps the spaces, a word-level student skips them
    teacher = [[0, 3], [3, 7], [7, 8], [8, 12]]  # "the", " cat", " ", " sat"
    student = [[0, 3], [4, 7], [9, 12]]  # "the", "cat", "sat"
    assert clean_cuts(np.array(teacher)).tolist() == [0, 3, 7, 8, 12]
    assert clean_cuts(np.array(student)).tolist() == [0, 3, 4, 7, 9, 12]
    assert groups(np.array(teacher), np.array(student)) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 4, 2, 3)]
    # position i predicts token i + 1: "cat" after "the" on both sides, "sat" after "the cat"
    assert aligned_positions(np.array(teacher), np.array(student)).tolist() == [[0, 0], [1, 1]]
    # "a  b": the teacher has the two spaces as tokens of their own, which no student token covers: no group
    teacher, student = [[0, 1], [1, 2], [2, 3], [3, 4]], [[0, 1], [3, 4]]
    assert groups(np.array(teacher), np.array(student)) == [(0, 1, 0, 1), (3, 4, 1, 2)]
    assert aligned_positions(np.array(teacher), np.array(student)).tolist() == [[2, 0]]


def test_overlapping_spans_have_no_cut_between_them() -> None:
    # a tokenizer whose normaliser maps one character to two tokens can report overlapping ranges: no cut at 2 or 3
    teacher, student = [[0, 3], [2, 5]], [[0, 2], [2, 5]]
    assert clean_cuts(np.array(teacher)).tolist() == [0, 5]
    assert groups(np.array(teacher), np.array(student)) == [(0, 2, 0, 2)]


def test_unicode_split_inside_a_character() -> None:
    # "naïve café": ï and é are 2 bytes; the teacher splits ï into two byte-level tokens with the same span
    teacher = [[0, 2], [2, 4], [2, 4], [4, 6], [6, 12]]  # "na", ï (piece 1), ï (piece 2), "ve", " café"
    student = [[0, 6], [7, 12]]  # "naïve", "café"
    assert clean_cuts(np.array(teacher)).tolist() == [0, 2, 4, 6, 12]  # no cut between the two pieces of ï
    assert groups(np.array(teacher), np.array(student)) == [(0, 4, 0, 1), (4, 5, 1, 2)]
    assert aligned_positions(np.array(teacher), np.array(student)).tolist() == [[3, 0]]


def test_word_split_differently_with_special_tokens() -> None:
    # "distillation works": the teacher has BOS (empty span) and EOS, the student neither
    teacher = [[0, 0], [0, 4], [4, 12], [12, 18], [18, 18]]  # BOS "dist" "illation" " works" EOS
    student = [[0, 6], [6, 12], [12, 16], [16, 18]]  # "distil" "lation" " wor" "ks"
    assert groups(np.array(teacher), np.array(student)) == [(1, 3, 0, 2), (3, 4, 2, 4)]
    # the first group has a teacher position before it (BOS) but no student one: no pair
    assert aligned_positions(np.array(teacher), np.array(student)).tolist() == [[2, 1]]
    both = [[0, 0], *student]  # with a student BOS too, the text's first group pairs the two BOS positions
    assert aligned_positions(np.array(teacher), np.array(both)).tolist() == [[0, 0], [2, 2]]


def test_vocab_map_is_one_to_one_by_string() -> None:
    teacher = ["a", None, " b", "c", "a"]
    student = ["c", "a", "x", "a"]
    # "a" twice on each side: the lowest ids (teacher 0, student 1) are matched, the others are not
    assert vocab_map(teacher, student).tolist() == [1, -1, -1, 0, -1]


@pytest.fixture(scope="module")
def tokenizers() -> tuple[Any, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(PARAGRAPHS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(PARAGRAPHS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    return (
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]"),
        PreTrainedTokenizerFast(tokenizer_object=bpe),
    )


def _check_groups(text: str, teacher: np.ndarray[Any, Any], student: np.ndarray[Any, Any]) -> list[Any]:
    """Every group covers the same text on both sides (up to the whitespace one side leaves out), no clean cut
    of both lies strictly inside a group, and every text token of both sides is in exactly one group, except one
    that covers only bytes the other side leaves out (whitespace a word-level tokenizer skips)."""
    raw = text.encode()
    found = groups(teacher, student)
    for t0, t1, s0, s1 in found:
        a = raw[teacher[t0, 0] : teacher[t1 - 1, 1]]
        b = raw[student[s0, 0] : student[s1 - 1, 1]]
        assert a.strip() == b.strip(), (a, b)
        inner = {int(x) for x in teacher[t0:t1].ravel()} & {int(x) for x in student[s0:s1].ravel()}
        lo, hi = max(teacher[t0, 0], student[s0, 0]), min(teacher[t1 - 1, 1], student[s1 - 1, 1])
        common = set(clean_cuts(teacher).tolist()) & set(clean_cuts(student).tolist())
        assert not {c for c in inner & common if lo < c < hi}, "a common cut inside a group"
    for spans, other, side in ((teacher, student, 0), (student, teacher, 2)):
        covered = [i for g in found for i in range(g[side], g[side + 1])]
        assert len(covered) == len(set(covered))
        for i in range(len(spans)):
            if spans[i, 1] > spans[i, 0] and i not in covered:
                s, e = spans[i]
                assert not np.any((other[:, 0] < e) & (other[:, 1] > s)), (i, raw[s:e])
                assert raw[s:e].strip() == b""
    return found


def test_real_tokenizers_on_hand_checked_strings(tokenizers: tuple[Any, Any]) -> None:
    words, bpe = tokenizers
    text = "The  teacher's naïve café – distillation works."
    ((_, t_spans),) = encode_with_spans(words, [text])
    ((s_ids, s_spans),) = encode_with_spans(bpe, [text])
    raw = text.encode()
    # the word-level tokenizer's "naïve" is 6 bytes, hand-checked: "The  teacher's " is 15 bytes
    assert [raw[s:e].decode() for s, e in t_spans.tolist()][:6] == ["The", "teacher", "'", "s", "naïve", "café"]
    assert t_spans.tolist()[4] == [15, 21]
    found = _check_groups(text, t_spans, s_spans)
    # "distillation" is one word-level token; the 300-id BPE splits " distillation" into pieces: one group, whose
    # student pieces join to the word (the space before it is a BPE token of its own, in no group)
    d = next(g for g in found if raw[t_spans[g[0], 0] : t_spans[g[1] - 1, 1]] == b"distillation")
    assert d[1] - d[0] == 1 and d[3] - d[2] >= 2
    assert b"".join(raw[s:e] for s, e in s_spans[d[2] : d[3]].tolist()) == b"distillation"
    assert "".join(bpe.decode([i]) for i in s_ids[d[2] : d[3]]) == "distillation"
    # "ï" (2 bytes) is two byte-level BPE tokens here, both with the character's span; they share one group
    i = s_spans.tolist().index([17, 19])
    assert s_spans[i + 1].tolist() == [17, 19] and raw[17:19].decode() == "ï"
    assert any(g[2] <= i and i + 1 < g[3] for g in found)
    # every byte-level piece of a character shares the character's span, so none ends inside it
    starts = {int(s) for s, _ in s_spans.tolist()}
    assert all(raw[s] & 0xC0 != 0x80 for s in starts if s < len(raw))


def test_real_tokenizers_on_the_paragraphs(tokenizers: tuple[Any, Any]) -> None:
    words, bpe = tokenizers
    for text in PARAGRAPHS:
        ((_, t_spans),) = encode_with_spans(words, [text])
        ((_, s_spans),) = encode_with_spans(bpe, [text])
        _check_groups(text, t_spans, s_spans)
        pairs = aligned_positions(t_spans, s_spans)
        raw = text.encode()
        # a pair's next tokens both start where the same text prefix ends (up to skipped whitespace)
        for tp, sp in pairs.tolist():
            assert raw[: t_spans[tp + 1, 0]].rstrip() == raw[: s_spans[sp + 1, 0]].rstrip()


def test_shared_strings_of_the_two_tokenizers(tokenizers: tuple[Any, Any]) -> None:
    words, bpe = tokenizers
    t, s = token_strings(words, len(words)), token_strings(bpe, len(bpe))
    m = vocab_map(t, s)
    for tid, sid in enumerate(m.tolist()):
        if sid >= 0:
            assert t[tid] == s[sid] == bpe.decode([sid]) == words.convert_ids_to_tokens(tid)
    assert t[words.unk_token_id] is None
    # "The" starts the text in both (no leading space), so both have it; " teacher" (BPE) is not "teacher"
    assert m[words.convert_tokens_to_ids("The")] >= 0


@pytest.mark.parametrize("decoder", ["metaspace", "llama-sequence"])
def test_sentencepiece_pieces_keep_their_word_boundary(decoder: str) -> None:
    """A Metaspace tokenizer decodes "\u2581cat" alone as "cat" (the leading space stripped), the same as the
    mid-word piece "cat": token_strings must read the marker as a space, so that only the word-initial piece
    shares a string with a byte-level BPE's " cat"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "\u2581the", "\u2581cat", "cat", "\u2581con", "<0x41>", "\u2581"]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    if decoder == "metaspace":
        tok.decoder = decoders.Metaspace()
    else:  # how Llama-2 / Mistral fast tokenizers decode
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert fast.decode([2]) == fast.decode([3]) == "cat"  # what decoding alone loses
    byte = "A" if decoder == "llama-sequence" else "<0x41>"  # a byte piece as decoded (with byte fallback: A)
    assert token_strings(fast, len(fast)) == [None, " the", " cat", "cat", " con", byte, " "]
