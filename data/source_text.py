"""What a store labelled with ``--spans`` holds beyond the targets, for students with another tokenizer.

Per example (shard columns, data/shard.py): the source text as UTF-8 and each input token's byte span in it.
Per store: the teacher's vocabulary as strings, ``tokens.json`` in the store's root, a JSON list with one entry per
teacher id: the id's text (what the teacher's tokenizer decodes it to) or null where the id has no text of its
own (special tokens, a byte-level piece of a character). It is written once, when the store is created, and
the manifest's ``tokenizer["token_strings"]`` records its size and SHA-256 (``{"path", "bytes", "sha256"}``),
so that a reader checks it like any shard file. The manifest's ``dataset["spans"]`` is ``"utf-8"`` in such a
store; a store without it (every store labelled before this addition) has no spans.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import CorruptShardError, IncompatibleStoreError
from .location import Location
from .manifest import Manifest

__all__ = ["SPANS", "TOKEN_STRINGS_FILE", "has_spans", "read_token_strings", "token_strings_record"]

SPANS = "utf-8"
"""``dataset["spans"]`` of a store with spans: token spans are byte offsets into the UTF-8 source text."""

TOKEN_STRINGS_FILE = "tokens.json"

# 4 MiB per 100k ids is ample (SmolLM2's 49,152 strings take ~0.5 MB); a larger file is refused unread.
_MAX_BYTES_PER_ID = 256


def has_spans(manifest: Manifest) -> bool:
    """Whether the store was labelled with ``--spans`` (source texts, token spans and the teacher's strings)."""
    return manifest.dataset.get("spans") == SPANS and isinstance(manifest.tokenizer.get("token_strings"), dict)


def token_strings_record(strings: list[str | None]) -> tuple[bytes, dict[str, Any]]:
    """The body of ``tokens.json`` and the manifest record that names it."""
    body = json.dumps(strings, ensure_ascii=False, separators=(",", ":")).encode()
    return body, {"path": TOKEN_STRINGS_FILE, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def read_token_strings(location: Location, manifest: Manifest) -> list[str | None]:
    """The teacher's strings of a store with spans, checked against the manifest's size and SHA-256.

    Raises:
        IncompatibleStoreError: the store has no spans (labelled without ``--spans``, or before they existed).
        CorruptShardError: the file is missing, too large, does not match its record, or is not a list of
            strings and nulls with one entry per teacher id.
    """
    if not has_spans(manifest):
        raise IncompatibleStoreError(
            f"{location} has no source texts and token spans (labelled without --spans, or before they existed); "
            "cross-tokenizer training needs them: label the data again with `pipeline label --spans`"
        )
    rec = manifest.tokenizer["token_strings"]
    where = f"{location}: {TOKEN_STRINGS_FILE}"
    width = manifest.targets.num_classes
    if rec.get("path") != TOKEN_STRINGS_FILE or not isinstance(rec.get("bytes"), int):
        raise CorruptShardError(f"{where}: the manifest's record {rec!r} is not {{path: {TOKEN_STRINGS_FILE}, ...}}")
    if rec["bytes"] > _MAX_BYTES_PER_ID * width + 1024:
        raise CorruptShardError(f"{where}: {rec['bytes']} bytes for {width} ids; refusing to read it")
    size = location.size(TOKEN_STRINGS_FILE) if location.resolves_inside(TOKEN_STRINGS_FILE) else None
    if size is None:
        raise CorruptShardError(f"{where}: missing (or leads outside the store); the manifest names it")
    if size != rec["bytes"]:
        raise CorruptShardError(f"{where}: {size} bytes on disk, the manifest says {rec['bytes']}")
    body = location.read_bytes(TOKEN_STRINGS_FILE)
    if hashlib.sha256(body).hexdigest() != rec.get("sha256"):
        raise CorruptShardError(f"{where}: does not match its SHA-256 in the manifest")
    try:
        strings = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptShardError(f"{where}: not JSON ({e})") from None
    if not isinstance(strings, list) or len(strings) != width:
        n = len(strings) if isinstance(strings, list) else type(strings).__name__
        raise CorruptShardError(f"{where}: {n} entries; expected a list of one string or null per teacher id ({width})")
    if not all(s is None or isinstance(s, str) for s in strings):
        raise CorruptShardError(f"{where}: holds entries that are neither strings nor null")
    return strings
