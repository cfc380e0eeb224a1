"""The store's manifest: format version, provenance, and the list of committed shards.

``manifest.json`` is the commit point of a store. A shard that is not listed in it does not exist for
readers; the file is replaced atomically after every committed shard and marked ``complete`` at the end.
Version 1 lists every shard record inline; version 2 (written by default) names immutable segment files that
hold the records (data/segments.py), so that a commit and an open cost the same at any store size.

A manifest from another team is untrusted input, so :meth:`Manifest.from_dict` checks every field a reader
relies on (types, ranges, dtypes, and that every path stays inside the store) before anything is read.
Provenance sections (teacher, tokenizer, dataset, config, versions) are free-form JSON objects, kept as
written and never interpreted beyond the few keys named here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import ManifestError, UnsupportedFormatError

__all__ = [
    "ENCODINGS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ID_DTYPES",
    "METHODS",
    "TASKS",
    "VALUE_DTYPES",
    "FileRecord",
    "Manifest",
    "ShardRecord",
    "TargetSpec",
    "Totals",
    "check_entries",
    "default_encoding",
    "id_dtype_for",
]

FORMAT_NAME = "kd-soft-labels"
# Version 2 keeps shard records in segment files named by a small root (data/segments.py); version 1 (every
# record inline in manifest.json) stays readable, and a version-1 store resumes as version 1.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

# task -> granularity of the stored distributions
TASKS: dict[str, str] = {"causal-lm": "token", "masked-lm": "token", "seq-cls": "example"}
# "topk": the k most probable ids with their log-probs and the exact tail mass; "sample": the unique ids of
# num_samples draws (with replacement) from the teacher at T, with their counts (an unbiased estimate of p);
# "hybrid": the top-k exactly as "topk", plus the counts of num_samples draws from the teacher restricted to the
# other ids (the tail's shape, unbiased, beside an exact head). A reader that predates a method refuses its stores
# by this list ("targets.method='hybrid' is not one of topk, sample"), so the format version stays 1.
METHODS = ("topk", "sample", "hybrid")
# How a sampled or hybrid store's ids were drawn (stages.soft_targets): "multinomial" (independent draws with
# replacement; every store written before this field existed, which lacks it) or "systematic" (one uniform offset
# and N evenly spaced points through the distribution: each id's count is floor or ceil of N p). Both are unbiased
# and read the same way (count / num_samples); the field says how the store was made.
DRAW_SCHEMES = ("systematic", "multinomial")
_MAX_SAMPLES = (1 << 16) - 1  # counts are stored as uint8 (<= 255 samples) or uint16
# float16 keeps log-probs ~16x more precisely than bfloat16 for the same 2 bytes; float32 is exact; "q8" is the
# documented lossy option: 8-bit codes on a 1/16-nat grid, decoded to float32 (see data/codecs.py).
VALUE_DTYPES = ("float16", "float32", "q8")
# How the target_logprobs column is stored (data/codecs.py): "plain" values (every store written before this
# field existed), "delta" (lossless: float bit patterns delta-coded along k) or "q8" (the codes of q8 values).
ENCODINGS = ("plain", "delta", "q8")
ID_DTYPES = ("uint16", "uint32")
BACKENDS = ("zarr", "arrow")

# Bounds that no honest store reaches; they stop a hostile manifest from causing huge allocations.
_MAX_COUNT = 1 << 40
_MAX_K = 1 << 20
_MAX_VOCAB = 1 << 32
_MAX_FILES_PER_SHARD = 256
_SHARD_PATH = re.compile(r"^shards/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def default_encoding(backend: str, value_dtype: str) -> str:
    """The encoding an "auto" spec gets: q8 values as q8 codes; float values delta-coded (lossless) on zarr and
    plain on arrow, the interchange format, so that pyarrow, polars and DuckDB read real log-probabilities."""
    if value_dtype == "q8":
        return "q8"
    return "delta" if backend == "zarr" else "plain"


def id_dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned integer dtype that holds every id below ``vocab_size``.

    uint16 below 65,536 ids, else uint32; there is no cap below 2**32.
    """
    if vocab_size <= 0 or vocab_size > _MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise ManifestError(f"manifest: {where} must be a JSON object, got {type(d).__name__}")
    if key not in d:
        raise ManifestError(f"manifest: {where} has no '{key}'")
    value = d[key]
    # bool is an int subclass; a count of `true` is never valid
    if isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"manifest: {where}.{key} must be {kind}, got a boolean")
    if not isinstance(value, kind):
        raise ManifestError(f"manifest: {where}.{key} has type {type(value).__name__}, expected {kind}")
    return value


def _count(d: dict[str, Any], key: str, where: str, upper: int = _MAX_COUNT) -> int:
    value: int = _get(d, key, int, where)
    if not 0 <= value <= upper:
        raise ManifestError(f"manifest: {where}.{key}={value} is outside [0, {upper}]")
    return value


def _choice(d: dict[str, Any], key: str, where: str, allowed: tuple[str, ...]) -> str:
    value: str = _get(d, key, str, where)
    if value not in allowed:
        raise ManifestError(f"manifest: {where}.{key}={value!r} is not one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class TargetSpec:
    """What the stored distributions are.

    Attributes:
        method: "topk": the k most probable ids per position; "sample": the unique ids of ``num_samples`` ids
            drawn with replacement from softmax(logits / T) per position, with their counts (ragged per position);
            "hybrid": the k most probable ids as for "topk", plus the unique ids and counts of ``num_samples``
            draws from softmax(logits / T) restricted to the other ids (ragged ``tail_*`` columns).
        k: ids kept per position (topk, hybrid: 1 <= k < num_classes, so that a tail exists to draw from); for
            "sample", a bound on the unique ids of any position, min(num_samples, num_classes).
        temperature: the labeling temperature T; log-probs are log softmax(logits / T) over the full vocabulary.
        num_classes: size of the distribution's support: the teacher's logit width (vocabulary including padded
            embedding rows) for LMs, the number of classes for classification. Every stored id is below it.
        value_dtype: precision of the stored log-probabilities: "float16", "float32", or "q8" (lossy 8-bit codes,
            read back as float32).
        id_dtype: dtype of the stored ids (and of the input ids), the narrowest that holds them.
        encoding: how the target_logprobs column is stored, one of ENCODINGS (see data/codecs.py); "auto" lets
            the writer choose for its backend (never written to a manifest). Absent in a manifest: "plain".
        num_samples: "sample" and "hybrid": draws per position (>= 1; hybrid: from the tail, at every position
            whose tail_mass is above 0); None for "topk" (absent from its manifest). Sampled stores have no log-prob
            column, so their value_dtype and encoding are unused (always "plain"); hybrid stores encode their
            (P, K) log-probs as top-k stores do.
        draws: "sample" and "hybrid": how the ids were drawn, one of DRAW_SCHEMES (not given, or absent in a
            manifest: "multinomial"); None for "topk" (absent from its manifest).
    """

    method: str
    k: int
    temperature: float
    num_classes: int
    value_dtype: str = "float16"
    id_dtype: str = "uint16"
    encoding: str = "auto"
    num_samples: int | None = None
    draws: str | None = None

    def __post_init__(self) -> None:
        if self.draws is None and self.method in ("sample", "hybrid"):  # what every store before the field drew
            object.__setattr__(self, "draws", "multinomial")

    @property
    def sampled(self) -> bool:
        """True for a store of sampled ids and counts ("sample"), False for top-k log-probs."""
        return self.method == "sample"

    @property
    def hybrid(self) -> bool:
        """True for a store of top-k log-probs plus counts of ids drawn from the tail ("hybrid")."""
        return self.method == "hybrid"

    @property
    def tail_bound(self) -> int:
        """hybrid: the most unique tail ids a position can hold, min(num_samples, num_classes - k); 0 otherwise."""
        return min(self.num_samples or 0, self.num_classes - self.k) if self.hybrid else 0

    @property
    def count_dtype(self) -> str:
        """The dtype of a sampled or hybrid store's counts: uint8 when num_samples <= 255, else uint16."""
        return "uint8" if (self.num_samples or 0) <= 255 else "uint16"

    @property
    def logprob_dtype(self) -> str:
        """The dtype of the log-probs in memory (what writers take and readers return): float32 for q8."""
        return "float32" if self.value_dtype == "q8" else self.value_dtype

    def resolved(self, backend: str) -> TargetSpec:
        """This spec with an "auto" encoding replaced by :func:`default_encoding` for ``backend``."""
        if self.encoding != "auto":
            return self
        if self.sampled:  # no log-prob column to encode
            return replace(self, encoding="plain")
        return replace(self, encoding=default_encoding(backend, self.value_dtype))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.num_samples is None:  # top-k manifests stay as they were before sampled targets existed
            del d["num_samples"]
        if self.draws is None:
            del d["draws"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetSpec:
        w = "targets"
        spec = cls(
            method=_choice(d, "method", w, METHODS),
            k=_count(d, "k", w, _MAX_K),
            temperature=float(_get(d, "temperature", (int, float), w)),
            num_classes=_count(d, "num_classes", w, _MAX_VOCAB),
            value_dtype=_choice(d, "value_dtype", w, VALUE_DTYPES),
            id_dtype=_choice(d, "id_dtype", w, ID_DTYPES),
            encoding=_choice(d, "encoding", w, ENCODINGS) if "encoding" in d else "plain",
            num_samples=_count(d, "num_samples", w, _MAX_SAMPLES) if d.get("num_samples") is not None else None,
        )
        if spec.method != "topk" and "draws" in d:
            spec = replace(spec, draws=_choice(d, "draws", w, DRAW_SCHEMES))
        if spec.sampled:
            if spec.num_samples is None or spec.num_samples < 1:
                raise ManifestError(f"manifest: targets.num_samples={spec.num_samples} must be in [1, {_MAX_SAMPLES}]")
            if spec.k > spec.num_samples or spec.value_dtype == "q8" or spec.encoding != "plain":
                raise ManifestError(
                    f"manifest: a sampled spec needs k <= num_samples and a plain float encoding, got k={spec.k}, "
                    f"num_samples={spec.num_samples}, value_dtype={spec.value_dtype!r}, encoding={spec.encoding!r}"
                )
        elif spec.hybrid:
            if spec.num_samples is None or spec.num_samples < 1 or spec.k >= spec.num_classes:
                raise ManifestError(
                    f"manifest: a hybrid spec needs num_samples in [1, {_MAX_SAMPLES}] and k < num_classes (a tail "
                    f"to draw from), got num_samples={spec.num_samples}, k={spec.k}, num_classes={spec.num_classes}"
                )
        elif spec.num_samples is not None:
            raise ManifestError(f"manifest: targets.num_samples is set, but method={spec.method!r} takes none")
        elif "draws" in d:
            raise ManifestError(f"manifest: targets.draws is set, but method={spec.method!r} draws nothing")
        if (spec.value_dtype == "q8") != (spec.encoding == "q8"):
            raise ManifestError(
                f"manifest: targets.encoding={spec.encoding!r} does not fit value_dtype={spec.value_dtype!r} "
                "(q8 values are stored, and only stored, in the q8 encoding)"
            )
        if spec.k < 1 or spec.k > spec.num_classes:
            raise ManifestError(f"manifest: targets.k={spec.k} must be in [1, num_classes={spec.num_classes}]")
        if not spec.temperature > 0:
            raise ManifestError(f"manifest: targets.temperature={spec.temperature} must be > 0")
        if spec.id_dtype == "uint16" and spec.num_classes > 1 << 16:
            raise ManifestError(f"manifest: uint16 ids cannot hold num_classes={spec.num_classes}")
        return spec


@dataclass(frozen=True)
class FileRecord:
    """One file of a shard: its size in bytes and its SHA-256."""

    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> FileRecord:
        digest = _get(d, "sha256", str, where)
        if not _SHA256.match(digest):
            raise ManifestError(f"manifest: {where}.sha256 is not a hex SHA-256")
        return cls(bytes=_count(d, "bytes", where), sha256=digest)


@dataclass(frozen=True)
class ShardRecord:
    """A committed shard.

    Attributes:
        name: shard name, unique in the store (zero-padded work-unit index, e.g. ``shard-000012``).
        path: the shard's location relative to the store root, always ``shards/<name>[.arrow]``.
        unit: index of the work unit (a fixed range of input examples) the shard holds; used to resume.
        rows: examples in the shard.
        tokens: input tokens in the shard.
        positions: labelled positions (rows for per-example stores).
        files: every file of the shard, relative to ``path`` (for a single-file shard: its own name).
        stats: sums the labeler measured on exact values (e.g. ``entropy_sum``, ``kept_mass_sum``).
        entries: sampled stores: the (position, unique id) entries of the shard, the length U of its ragged
            ``target_ids`` / ``target_counts`` columns; hybrid stores: the same for its ``tail_ids`` /
            ``tail_counts``; None (absent from the manifest) for top-k stores.
    """

    name: str
    path: str
    unit: int
    rows: int
    tokens: int
    positions: int
    files: dict[str, FileRecord]
    stats: dict[str, float] = field(default_factory=dict)
    entries: int | None = None
    text_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for optional in ("entries", "text_bytes"):
            if d[optional] is None:
                del d[optional]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], i: int) -> ShardRecord:
        w = f"shards[{i}]"
        path = _get(d, "path", str, w)
        if not _SHARD_PATH.match(path):
            raise ManifestError(
                f"manifest: {w}.path={path!r} is not a plain 'shards/<name>' path inside the store; refusing it"
            )
        files_raw = _get(d, "files", dict, w)
        if not 0 < len(files_raw) <= _MAX_FILES_PER_SHARD:
            raise ManifestError(f"manifest: {w} lists {len(files_raw)} files, expected 1..{_MAX_FILES_PER_SHARD}")
        files = {}
        for rel, rec in files_raw.items():
            parts = rel.split("/")
            if len(parts) > 8 or not all(_FILE_PART.match(p) and p not in (".", "..") for p in parts):
                raise ManifestError(f"manifest: {w} file path {rel!r} leaves the shard or is not plain; refusing it")
            files[rel] = FileRecord.from_dict(rec, f"{w}.files[{rel!r}]")
        stats_raw = d.get("stats", {})
        if not isinstance(stats_raw, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in stats_raw.values()
        ):
            raise ManifestError(f"manifest: {w}.stats must map names to numbers")
        return cls(
            name=_get(d, "name", str, w),
            path=path,
            unit=_count(d, "unit", w),
            rows=_count(d, "rows", w),
            tokens=_count(d, "tokens", w),
            positions=_count(d, "positions", w),
            files=files,
            stats={str(k): float(v) for k, v in stats_raw.items()},
            entries=_count(d, "entries", w) if d.get("entries") is not None else None,
            text_bytes=_count(d, "text_bytes", w) if d.get("text_bytes") is not None else None,
        )


def check_entries(targets: TargetSpec, s: ShardRecord) -> None:
    """Refuse a shard record whose ``entries`` do not fit the store's method.

    A sampled shard's ragged columns have ``entries`` rows: between 1 and k per position; a hybrid shard's between
    0 (a position whose tail is 0 has no draws) and tail_bound per position; a top-k shard has none.
    """
    if targets.method == "topk" and s.entries is not None:
        raise ManifestError(f"manifest: shard {s.name} records entries, but a top-k store has none")
    if targets.hybrid and (s.entries is None or not 0 <= s.entries <= s.positions * targets.tail_bound):
        raise ManifestError(
            f"manifest: shard {s.name} has entries={s.entries}; a hybrid store needs between 0 and "
            f"positions * min(num_samples, num_classes - k)={s.positions * targets.tail_bound}"
        )
    if targets.sampled and (s.entries is None or not s.positions <= s.entries <= s.positions * targets.k):
        raise ManifestError(
            f"manifest: shard {s.name} has entries={s.entries}; a sampled store needs between "
            f"positions={s.positions} and positions * k={s.positions * targets.k}"
        )


@dataclass(frozen=True)
class Totals:
    """Sums over a store's shard records, kept in a version-2 root so that summaries read no segment.

    Attributes:
        shards, rows, tokens, positions, bytes, entries: sums of the records' fields (``bytes`` over their files;
            ``entries`` counts 0 for records without).
        stats: each stats key summed over the records that have it; keys ending in ``_max`` take the maximum.
        kept_mass_count: the ``count`` of the records that have ``kept_mass_sum`` (the denominator of the mean
            kept mass).
    """

    shards: int = 0
    rows: int = 0
    tokens: int = 0
    positions: int = 0
    bytes: int = 0
    entries: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    kept_mass_count: float = 0.0

    def plus(self, s: ShardRecord) -> Totals:
        """These totals with one more record (O(stats keys): a commit never sums over the store)."""
        stats = dict(self.stats)
        for key, value in s.stats.items():
            old = stats.get(key)
            stats[key] = value if old is None else (max(old, value) if key.endswith("_max") else old + value)
        counted = "kept_mass_sum" in s.stats and bool(s.stats.get("count"))
        return Totals(
            shards=self.shards + 1,
            rows=self.rows + s.rows,
            tokens=self.tokens + s.tokens,
            positions=self.positions + s.positions,
            bytes=self.bytes + sum(f.bytes for f in s.files.values()),
            entries=self.entries + (s.entries or 0),
            stats=stats,
            kept_mass_count=self.kept_mass_count + (s.stats["count"] if counted else 0.0),
        )

    @classmethod
    def of(cls, records: Iterable[ShardRecord]) -> Totals:
        t = cls()
        for s in records:
            t = t.plus(s)
        return t

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Totals:
        w = "totals"
        stats = _get(d, "stats", dict, w)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in stats.values()):
            raise ManifestError("manifest: totals.stats must map names to numbers")
        return cls(
            shards=_count(d, "shards", w),
            rows=_count(d, "rows", w),
            tokens=_count(d, "tokens", w),
            positions=_count(d, "positions", w),
            bytes=_count(d, "bytes", w, 1 << 62),
            entries=_count(d, "entries", w, 1 << 62),
            stats={str(k): float(v) for k, v in stats.items()},
            kept_mass_count=float(_get(d, "kept_mass_count", (int, float), w)),
        )


@dataclass(frozen=True)
class Manifest:
    """The whole manifest. Frozen: a writer derives a new one per commit with :meth:`with_shard`.

    Attributes:
        backend: "zarr" (one Zarr v3 group per shard) or "arrow" (one Arrow IPC file per shard).
        task: "causal-lm", "masked-lm" or "seq-cls".
        targets: what the stored distributions are.
        vocab_size: input ids are below this (the tokenizer's size including padded embedding rows).
        teacher: provenance: name_or_path, revision, weights_digest, dtype, logit_dtype (the precision of the
            output head's matmul; absent in stores from before it was recorded, whose logits were in ``dtype``),
            gguf_file.
        tokenizer: provenance: digest, vocab_size, pad/eos ids.
        dataset: provenance: source, fingerprint, fields, max_length, packing.
        config: the resolved labeling configuration.
        versions: library versions of the labeling run.
        created: ISO-8601 UTC time the store was started.
        complete: True once the labeling run finished; readers refuse incomplete stores unless asked.
        shards: committed shards, in unit order: a tuple (version 1, templates), or a version-2 store's lazy
            sequence (data/segments.py) that reads segment files on demand and carries the root's ``totals``.
        format_version: 1 or 2; a new store is written in FORMAT_VERSION.
    """

    backend: str
    task: str
    targets: TargetSpec
    vocab_size: int
    teacher: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    complete: bool = False
    shards: Sequence[ShardRecord] = ()
    format_version: int = FORMAT_VERSION

    @property
    def granularity(self) -> str:
        """ "token" (one distribution per position of a sequence) or "example" (one per example)."""
        return TASKS[self.task]

    @property
    def totals(self) -> Totals:
        """Sums over the shard records: a version-2 store's come from its root (no segment is read)."""
        lazy = getattr(self.shards, "totals", None)
        return lazy if isinstance(lazy, Totals) else Totals.of(self.shards)

    @property
    def rows(self) -> int:
        return self.totals.rows

    @property
    def tokens(self) -> int:
        return self.totals.tokens

    @property
    def positions(self) -> int:
        return self.totals.positions

    @property
    def bytes(self) -> int:
        return self.totals.bytes

    @property
    def entries(self) -> int:
        """Sampled and hybrid stores: the (position, id) entries of every shard; 0 for top-k stores."""
        return self.totals.entries

    @property
    def kept_mass_mean(self) -> float | None:
        """The teacher's mean probability mass on the stored ids per position (top-k and hybrid: the kept mass of
        the top-k; sampled: the mass on the ids drawn), from the labeler's shard stats; None when no shard
        recorded it."""
        t = self.totals
        if not t.kept_mass_count or "kept_mass_sum" not in t.stats:
            return None
        return t.stats["kept_mass_sum"] / t.kept_mass_count

    def with_shard(self, shard: ShardRecord) -> Manifest:
        """A new manifest with ``shard`` added (replacing a shard of the same name), kept in unit order."""
        kept = [s for s in self.shards if s.name != shard.name]
        return replace(self, shards=tuple(sorted([*kept, shard], key=lambda s: (s.unit, s.name))))

    def provenance_key(self) -> dict[str, Any]:
        """The fields that must match for a run to resume into (or merge with) this store.

        An "auto" encoding counts as the backend's default, so a template compares equal to the store it made.
        A teacher without ``logit_dtype`` (stores from before it was recorded) computed its logits in its
        ``dtype``, so it counts as that: such a store resumes and merges with runs that do the same.
        """
        # where the teacher ran (device map, tensor parallel) is provenance, not content: not compared
        teacher = {k: v for k, v in self.teacher.items() if k != "placement"}
        teacher["logit_dtype"] = self.teacher.get("logit_dtype", self.teacher.get("dtype"))
        return {
            "backend": self.backend,
            "task": self.task,
            "targets": self.targets.resolved(self.backend).to_dict(),
            "vocab_size": self.vocab_size,
            "teacher": teacher,
            "tokenizer": self.tokenizer,
            "dataset": self.dataset,
            "config": self.config,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every field, the shard records inline (the version-1 layout; for a version-2 store this reads every
        segment: writers of version 2 write the root of data/segments.py instead)."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "complete": self.complete,
            "backend": self.backend,
            "task": self.task,
            "granularity": self.granularity,
            "targets": self.targets.to_dict(),
            "vocab_size": self.vocab_size,
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "dataset": self.dataset,
            "config": self.config,
            "versions": self.versions,
            "created": self.created,
            "totals": {
                "rows": self.rows,
                "tokens": self.tokens,
                "positions": self.positions,
                "bytes": self.bytes,
            },
            "shards": [s.to_dict() for s in self.shards],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Parse and check an untrusted manifest with its shard records inline (a version-1 manifest, or the
        copy of any manifest an export embeds); raises ManifestError / UnsupportedFormatError. A version-2 root
        names segment files instead: read it with ``read_manifest`` (data/segments.py)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise ManifestError(f"manifest: not a {FORMAT_NAME} manifest (its 'format' field is missing or wrong)")
        version = _get(d, "format_version", int, "manifest")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedFormatError(
                f"store format version {version} is not supported (this code reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade kd-pipeline, or re-label the "
                "data with this version"
            )
        if "shards" not in d and "segments" in d:
            raise ManifestError("manifest: a version-2 root keeps its shard records in segment files; open its store")
        task = _choice(d, "task", "manifest", tuple(TASKS))
        targets = TargetSpec.from_dict(_get(d, "targets", dict, "manifest"))
        vocab_size = _count(d, "vocab_size", "manifest", _MAX_VOCAB)
        if vocab_size < 1 or (targets.id_dtype == "uint16" and vocab_size > 1 << 16):
            raise ManifestError(f"manifest: vocab_size={vocab_size} does not fit id dtype {targets.id_dtype}")
        shards_raw = _get(d, "shards", list, "manifest")
        shards = tuple(ShardRecord.from_dict(s, i) for i, s in enumerate(shards_raw))
        names = [s.name for s in shards]
        paths = [s.path for s in shards]
        if len(set(names)) != len(names) or len(set(paths)) != len(paths):
            raise ManifestError("manifest: two shards share a name or a path")
        for s in shards:
            check_entries(targets, s)
        return cls(
            backend=_choice(d, "backend", "manifest", BACKENDS),
            task=task,
            targets=targets,
            vocab_size=vocab_size,
            teacher=_get(d, "teacher", dict, "manifest"),
            tokenizer=_get(d, "tokenizer", dict, "manifest"),
            dataset=_get(d, "dataset", dict, "manifest"),
            config=_get(d, "config", dict, "manifest"),
            versions=_get(d, "versions", dict, "manifest"),
            created=_get(d, "created", str, "manifest"),
            complete=_get(d, "complete", bool, "manifest"),
            shards=shards,
            format_version=version,
        )
