"""Labeling inputs: read records from local files, tokenise them, pack or truncate, mask for MLM.

Accepted data: a JSONL, Parquet, CSV or plain-text file; a directory of such files (read in name order);
or a folder written by ``datasets.Dataset.save_to_disk`` (its ``data-*.arrow`` files). Each record has a
text field (``--text-field``) or pre-tokenised ids (``input_ids``), and for classification a label field.
A plain-text file is one document per blank-line-separated paragraph block.

The result is a list of examples in a fixed order (the order of the records), so that work unit ``u`` is
always the same examples: that is what makes a resumed or multi-process run equal a single uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_CORPUS",
    "DataError",
    "Example",
    "default_corpus",
    "input_files",
    "iter_records",
    "load_records",
    "prepare_examples",
    "row_labels",
    "scan_files",
    "token_ids",
]

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


_BLOCK = 1 << 20  # bytes read at a time
_ROWS = 1024  # Parquet rows decoded at a time


class DataError(ValueError):
    """The input data is missing, empty, or lacks a field; the message says what was expected."""


@dataclass
class Example:
    """One example to label.

    Attributes:
        input_ids: (L,) int64 ids fed to the teacher (masked for masked-lm).
        label: class index (seq-cls), or None.
        positions: (P,) masked positions (masked-lm), or None.
        mlm_labels: (P,) original ids at the masked positions (masked-lm), or None.
        source: with ``--spans``: the example's source text as UTF-8 (cut after its last kept token) and each
            input token's byte span in it, (L, 2) int32; None otherwise.
    """

    input_ids: np.ndarray[Any, Any]
    label: int | None = None
    positions: np.ndarray[Any, Any] | None = None
    mlm_labels: np.ndarray[Any, Any] | None = None
    source: tuple[bytes, np.ndarray[Any, Any]] | None = None


def _files(path: Path) -> list[tuple[Path, str]]:
    if path.is_file():
        kind = _SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(_SUFFIXES)}")
        return [(path, kind)]
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        arrows = sorted(path.glob("*.arrow"))
        if not arrows:
            raise DataError(f"{path} looks like a saved `datasets` folder but has no .arrow files")
        return [(p, "arrow") for p in arrows]
    found = [(p, _SUFFIXES[p.suffix.lower()]) for p in sorted(path.iterdir()) if p.suffix.lower() in _SUFFIXES]
    if not found:
        raise DataError(f"{path} holds no data files ({', '.join(_SUFFIXES)})")
    return found


def _iter_file(path: Path, kind: str) -> Iterator[dict[str, Any]]:
    """The records of one file, read a bounded piece at a time (memory flat in the file's size)."""
    if kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: not a JSON object per line ({e.msg})") from None
    elif kind == "text":
        # exactly ``text.split("\n\n")`` over the whole file, streamed: the last, possibly partial, block of
        # each piece is carried into the next
        rest = ""
        with open(path, encoding="utf-8") as f:
            while piece := f.read(_BLOCK):
                *blocks, rest = (rest + piece).split("\n\n")
                yield from ({"text": b.strip()} for b in blocks if b.strip())
        if rest.strip():
            yield {"text": rest.strip()}
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROWS):
            yield from batch.to_pylist()
    elif kind == "csv":
        import pyarrow.csv as pcsv

        for batch in pcsv.open_csv(path):
            yield from batch.to_pylist()
    else:
        for batch in _arrow_batches(path):
            yield from batch.to_pylist()


def _arrow_batches(path: Path) -> Iterator[Any]:
    """Record batches of a `datasets` Arrow file (an IPC stream, or an IPC file), memory-mapped."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            stream = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            yield from stream


def input_files(data: str) -> list[tuple[Path, str]]:
    """The data path's files, in reading order, with their kinds."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"--data {data} does not exist; pass a JSONL/Parquet/CSV/text file or a folder of them")
    return _files(path)


def scan_files(files: list[tuple[Path, str]]) -> tuple[str, int]:
    """The input's fingerprint (SHA-256 of the files' names and bytes) and an estimate of its number of records
    for the progress bar (newlines or blank lines counted in the same pass; Parquet/Arrow row counts), read a
    block at a time."""
    h = hashlib.sha256()
    estimate = 0
    for f, kind in files:
        h.update(f.name.encode() + b"\0")
        sep = {"jsonl": b"\n", "csv": b"\n", "text": b"\n\n"}.get(kind)
        with open(f, "rb") as fh:
            while block := fh.read(_BLOCK):
                h.update(block)
                estimate += block.count(sep) if sep else 0
        try:
            if kind == "parquet":
                import pyarrow.parquet as pq

                estimate += pq.ParquetFile(f).metadata.num_rows
            elif kind == "arrow":
                estimate += sum(b.num_rows for b in _arrow_batches(f))
        except Exception as e:  # pyarrow failures on user files
            raise _unreadable(f, kind, e) from e
    return h.hexdigest(), estimate


def _unreadable(f: Path, kind: str, e: Exception) -> DataError:
    return DataError(f"{f}: cannot be read as {kind} ({type(e).__name__}: {str(e).splitlines()[0]})")


def iter_records(files: list[tuple[Path, str]]) -> Iterator[dict[str, Any]]:
    """Every record of the files, in order, streamed."""
    for f, kind in files:
        try:
            yield from _iter_file(f, kind)
        except DataError:
            raise
        except Exception as e:  # pyarrow / decoding failures on user files
            raise _unreadable(f, kind, e) from e


def load_records(data: str) -> tuple[list[dict[str, Any]], str]:
    """All records of the data path, and its fingerprint. Holds the whole input in memory: for small inputs and
    tests; ``pipeline label`` streams instead (``stages.units``)."""
    files = input_files(data)
    records = list(iter_records(files))
    if not records:
        raise DataError(f"--data {data} holds no records; nothing to label")
    return records, scan_files(files)[0]


def _field(records: list[dict[str, Any]], name: str, what: str, first: int = 0) -> list[Any]:
    missing = next((i for i, r in enumerate(records) if name not in r or r[name] is None), None)
    if missing is not None:
        fields = ", ".join(sorted(records[missing])) or "none"
        raise DataError(
            f"record {first + missing} has no {what} field {name!r} (its fields: {fields}); pass --{what}-field"
        )
    return [r[name] for r in records]


def token_ids(
    records: list[dict[str, Any]], tokenizer: Any, text_field: str, *, special: bool, first: int = 0
) -> list[np.ndarray[Any, Any]]:
    """Each record's ids: its pre-tokenised ``input_ids`` (when no record of the batch has the text field), or
    its text tokenised in one call (with the tokenizer's special tokens when ``special``). ``first`` is the index
    of the first record in the input, for messages."""
    if all("input_ids" in r for r in records) and not any(text_field in r for r in records):
        return [np.asarray(r["input_ids"], dtype=np.int64) for r in records]
    texts = [str(t) for t in _field(records, text_field, "text", first)]
    encoded = tokenizer(texts, add_special_tokens=special, truncation=False)["input_ids"]
    return [np.asarray(e, dtype=np.int64) for e in encoded]


def prepare_examples(
    records: list[dict[str, Any]],
    tokenizer: Any,
    *,
    task: str,
    text_field: str,
    label_field: str | None,
    max_length: int,
    pack: bool,
    label2id: dict[str, int] | None = None,
    num_labels: int | None = None,
    mlm_probability: float = 0.15,
    seed: int = 0,
    first: int = 0,
    spans: bool = False,
) -> list[Example]:
    """Tokenise (or take pre-tokenised ``input_ids``), then pack or truncate; labels and MLM masks. ``first``:
    the index of ``records[0]`` in the input, for messages. ``spans``: also each example's source text and token
    spans (``Example.source``; causal-lm, unpacked, text records)."""
    if spans:
        from .source_spans import with_spans

        texts = [str(t) for t in _field(records, text_field, "text", first)]
        return with_spans(texts, tokenizer, max_length, first)
    ids = token_ids(records, tokenizer, text_field, special=not pack, first=first)
    labels: list[int | None] = [None] * len(ids)
    if task == "seq-cls" and label_field:
        values = _field(records, label_field, "label", first)
        labels = [_label(v, label2id, num_labels, first + i) for i, v in enumerate(values)]
    if pack:
        if task != "causal-lm":
            raise DataError("--pack applies to causal-lm only (it joins documents into fixed-length sequences)")
        eos = tokenizer.eos_token_id
        sep = [np.array([eos], dtype=np.int64)] if eos is not None else []
        stream = np.concatenate([part for doc in ids for part in ([doc, *sep])]) if ids else np.zeros(0, np.int64)
        ids = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
        labels = [None] * len(ids)
    else:
        ids = [x[:max_length] for x in ids]
    keep = [i for i, x in enumerate(ids) if len(x) >= (2 if task == "causal-lm" else 1)]
    examples = [Example(ids[i], labels[i]) for i in keep]
    if task == "masked-lm":
        _mask(examples, tokenizer, mlm_probability, seed)
    return examples


def _label(value: Any, label2id: dict[str, int] | None, num_labels: int | None, i: int) -> int:
    if isinstance(value, str) and label2id and value in label2id:
        return int(label2id[value])
    try:
        label = int(value)
    except (TypeError, ValueError):
        known = ", ".join(sorted(label2id)) if label2id else f"0..{(num_labels or 1) - 1}"
        raise DataError(f"record {i}: label {value!r} is not one of the teacher's classes ({known})") from None
    if num_labels is not None and not 0 <= label < num_labels:
        raise DataError(
            f"record {i}: label {label} is outside the teacher's {num_labels} classes (0..{num_labels - 1})"
        )
    return label


def _mask(examples: list[Example], tokenizer: Any, probability: float, seed: int) -> None:
    """Choose masked positions per example, seeded by (seed, content), and replace them with the mask token.

    Every chosen position becomes the mask token (no 80/10/10 split: the teacher's distribution at a
    [MASK] is what the student is taught). Special tokens are never masked; at least one position is.
    """
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise DataError("masked-lm needs a tokenizer with a mask token; this teacher's tokenizer has none")
    special = set(tokenizer.all_special_ids)
    for ex in examples:
        content = hashlib.blake2b(ex.input_ids.astype("<u4").tobytes(), digest_size=8).digest()
        rng = np.random.default_rng([seed, int.from_bytes(content, "little")])
        candidates = np.array([i for i, t in enumerate(ex.input_ids.tolist()) if t not in special], dtype=np.int64)
        if not len(candidates):
            candidates = np.arange(len(ex.input_ids))
        n = max(1, round(probability * len(candidates)))
        positions = np.sort(rng.choice(candidates, size=n, replace=False))
        ex.mlm_labels = ex.input_ids[positions].copy()
        ex.positions = positions
        ex.input_ids = ex.input_ids.copy()
        ex.input_ids[positions] = mask_id


DEFAULT_CORPUS = "pydoc_data.topics (the Python documentation's topics, shipped with Python)"


def row_labels(examples: list[Example], batch: list[int], task: str) -> np.ndarray:
    """(N,) int64 hard labels of the rows a batch of ``examples`` stores, in row order (-1 where there is none):
    the next tokens (causal-lm), the masked tokens (masked-lm), or one class per example (seq-cls)."""
    if task == "causal-lm":
        parts = [examples[i].input_ids[1:] for i in batch]
    elif task == "masked-lm":
        parts = [np.asarray(examples[i].mlm_labels) for i in batch]
    else:
        parts = [np.array([-1 if examples[i].label is None else examples[i].label]) for i in batch]
    return np.concatenate(parts).astype(np.int64)


def default_corpus(say: Any) -> Path:
    """The built-in English corpus as JSONL in the cache (one record per topic, sorted by topic name)."""
    from pydoc_data.topics import topics

    from ..data.reader import default_cache_dir

    path = default_cache_dir() / f"pydoc-topics-py{sys.version_info[0]}{sys.version_info[1]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps({"topic": k, "text": topics[k]}) + "\n" for k in sorted(topics)))
        os.replace(tmp, path)
    say(f"no --data: using the built-in corpus {DEFAULT_CORPUS}")
    return path
