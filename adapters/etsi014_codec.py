"""ETSI GS QKD 014 V1.1.1 message encoding and validation, without I/O.

Theory of operation: the HTTP client (:mod:`qkdgate.adapters.etsi014`) and
the KME simulator both speak through these functions, so the rules live in
one place and can be fuzzed without sockets. Decoders take the raw response
bytes a KME sent and either return validated values or raise
:class:`~qkdgate.errors.KeySourceProtocolError` -- never ``KeyError``,
``ValueError``, ``UnicodeDecodeError`` or ``binascii.Error`` (the h11 rule:
"parse, or the remote error, nothing else").

:func:`classify_error` turns a non-200 answer into the error class that says
whose fault it is. It follows the spec where the spec is clear and tolerates
what deployed KMEs do where it is not (see docs/qkd.md "Tolerated
deviations"): empty pools answered with 400, 404 or 503, HTML 401 bodies,
fewer keys than asked.

Key bytes are wrapped in :class:`~qkdgate.keymix.secret.SecretBytes` the
moment they are decoded; errors name key_IDs and sizes, never key material.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qkdgate.errors import (
    KeyNotFound,
    KeySourceAuthError,
    KeySourceError,
    KeySourceProtocolError,
    KeyUnavailable,
)
from qkdgate.interfaces import QkdKey
from qkdgate.keymix.secret import SecretBytes

# ETSI GS QKD 014 6 (Error): the 400 messages the spec fixes.
MSG_SIZE_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MSG_EXT_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
MSG_EXT_MANDATORY_UNMET = "not all extension_mandatory request options could be met"
MSG_EXT_OPTIONAL_UNHANDLED = "not all extension_optional request options handled"
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
SPEC_400_MESSAGES = frozenset({MSG_SIZE_MULTIPLE_OF_8, MSG_EXT_MANDATORY_UNSUPPORTED,
                               MSG_EXT_MANDATORY_UNMET, MSG_EXT_OPTIONAL_UNHANDLED,
                               MSG_KEYS_NOT_FOUND})

# A KME answer is small (status, or a few hundred keys); anything much larger
# is an attack or a broken proxy, refused before json.loads spends memory.
MAX_BODY_BYTES = 4 * 1024 * 1024

# Messages deployed KMEs use for "no key now" when they answer 400/404
# instead of 503 (words, not exact texts: vendors differ).
_EMPTY_POOL_WORDS = re.compile(r"(not enough|insufficient|no (more )?keys?|empty|exhaust"
                               r"|unavailable|available keys|key pool|out of key)", re.I)


@dataclass(frozen=True, slots=True)
class Status:
    """ETSI GS QKD 014 6.1 Status, every field."""

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_SAE_ID_count: int
    status_extension: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KeyContainer:
    """ETSI GS QKD 014 6.3 Key container, decoded and checked."""

    keys: list[QkdKey]
    key_ID_extensions: dict[str, object] = field(default_factory=dict)   # key_ID -> extension
    key_extensions: dict[str, object] = field(default_factory=dict)
    key_container_extension: Mapping[str, object] | None = None


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """ETSI GS QKD 014 6.5 Error. ``message`` is cleaned for logs; ``json``
    says whether the body was the spec's JSON or something else (HTML...)."""

    message: str
    details: tuple[object, ...] = ()
    json: bool = True


# --------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------

def key_request(number: int | None = None, size: int | None = None,
                additional_slave_sae_ids: Sequence[str] = (),
                extension_mandatory: Sequence[Mapping[str, object]] = (),
                extension_optional: Sequence[Mapping[str, object]] = ()) -> dict[str, object]:
    """A Key request body (ETSI GS QKD 014 6.2); absent fields are left out
    so the KME applies its own defaults."""
    body: dict[str, object] = {}
    if number is not None:
        body["number"] = number
    if size is not None:
        body["size"] = size
    if additional_slave_sae_ids:
        body["additional_slave_SAE_IDs"] = list(additional_slave_sae_ids)
    if extension_mandatory:
        body["extension_mandatory"] = [dict(e) for e in extension_mandatory]
    if extension_optional:
        body["extension_optional"] = [dict(e) for e in extension_optional]
    return body


def key_ids_request(key_ids: Sequence[str],
                    key_IDs_extension: Mapping[str, object] | None = None) -> dict[str, object]:
    """A Key IDs body (ETSI GS QKD 014 6.4)."""
    body: dict[str, object] = {"key_IDs": [{"key_ID": k} for k in key_ids]}
    if key_IDs_extension:
        body["key_IDs_extension"] = dict(key_IDs_extension)
    return body


def can_use_get(body: Mapping[str, object]) -> bool:
    """ETSI GS QKD 014 5.2: the GET form of enc_keys carries only number and size."""
    return set(body) <= {"number", "size"}


# --------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------

def _load_object(raw: bytes, what: str) -> dict[str, object]:
    if len(raw) > MAX_BODY_BYTES:
        raise KeySourceProtocolError(f"{what}: body of {len(raw)} bytes is too large")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise KeySourceProtocolError(f"{what}: body is not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise KeySourceProtocolError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _int_field(doc: Mapping[str, object], name: str, what: str, *, minimum: int = 0) -> int:
    v = doc.get(name)
    # bool is an int subclass in Python; JSON true is not a count.
    if not isinstance(v, int) or isinstance(v, bool):
        raise KeySourceProtocolError(f"{what}: {name} must be an integer, got {_kind(v)}")
    if v < minimum:
        raise KeySourceProtocolError(f"{what}: {name}={v} is below {minimum}")
    return v


def _id_field(doc: Mapping[str, object], name: str, what: str) -> str:
    v = doc.get(name)
    # SAE and KME IDs are strings in the spec; some KMEs send integers.
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise KeySourceProtocolError(f"{what}: {name} must be a string, got {_kind(v)}")
    return v


def _kind(v: object) -> str:
    return "nothing" if v is None else type(v).__name__


def _ext(doc: Mapping[str, object], name: str, what: str) -> Mapping[str, object] | None:
    v = doc.get(name)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise KeySourceProtocolError(f"{what}: {name} must be an object, got {_kind(v)}")
    return v


def parse_status(raw: bytes) -> Status:
    """Decode a Status body (ETSI GS QKD 014 6.1)."""
    what = "status"
    doc = _load_object(raw, what)
    ints = {n: _int_field(doc, n, what) for n in (
        "key_size", "stored_key_count", "max_key_count", "max_key_per_request",
        "max_key_size", "min_key_size")}
    # max_SAE_ID_count is mandatory in the spec, but early KMEs omit it:
    # absent means no multicast, which is the safe reading.
    ints["max_SAE_ID_count"] = (_int_field(doc, "max_SAE_ID_count", what)
                                if "max_SAE_ID_count" in doc else 0)
    if ints["min_key_size"] > ints["max_key_size"]:
        raise KeySourceProtocolError(f"{what}: min_key_size {ints['min_key_size']} > "
                                     f"max_key_size {ints['max_key_size']}")
    ids = {n: _id_field(doc, n, what) for n in (
        "source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")}
    return Status(
        source_KME_ID=ids["source_KME_ID"], target_KME_ID=ids["target_KME_ID"],
        master_SAE_ID=ids["master_SAE_ID"], slave_SAE_ID=ids["slave_SAE_ID"],
        key_size=ints["key_size"], stored_key_count=ints["stored_key_count"],
        max_key_count=ints["max_key_count"], max_key_per_request=ints["max_key_per_request"],
        max_key_size=ints["max_key_size"], min_key_size=ints["min_key_size"],
        max_SAE_ID_count=ints["max_SAE_ID_count"],
        status_extension=_ext(doc, "status_extension", what) or {})


def _decode_key(text: object, key_id: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise KeySourceProtocolError(f"{what}: key for {key_id} is {_kind(text)}, not base64 text")
    try:
        # RFC 4648 4: strict alphabet, padding required (validate=True refuses
        # whitespace and stray characters instead of silently dropping them).
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise KeySourceProtocolError(f"{what}: key for {key_id} is not valid base64") from None


def parse_key_container(raw: bytes, *, size_bits: int | None = None,
                        max_keys: int | None = None, what: str = "enc_keys") -> KeyContainer:
    """Decode a Key container (ETSI GS QKD 014 6.3).

    Every key_ID must be a UUID and unique; every key valid base64 of exactly
    ``size_bits`` (when given) and never empty; at most ``max_keys`` keys.
    The count against the request is the caller's business (fewer keys than
    asked is a pool shortage, more is a protocol violation).
    """
    doc = _load_object(raw, what)
    items = doc.get("keys")
    if not isinstance(items, list):
        raise KeySourceProtocolError(f"{what}: 'keys' must be an array, got {_kind(items)}")
    if max_keys is not None and len(items) > max_keys:
        raise KeySourceProtocolError(
            f"{what}: {len(items)} keys returned, at most {max_keys} asked")
    keys: list[QkdKey] = []
    id_ext: dict[str, Any] = {}
    key_ext: dict[str, Any] = {}
    seen: set[str] = set()
    try:
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise KeySourceProtocolError(f"{what}: keys[{i}] is {_kind(item)}, not an object")
            key_id = normalise_key_id(item.get("key_ID"), f"{what}: keys[{i}].key_ID")
            if key_id in seen:
                raise KeySourceProtocolError(f"{what}: key_ID {key_id} appears twice")
            seen.add(key_id)
            material = _decode_key(item.get("key"), key_id, what)
            if not material:
                raise KeySourceProtocolError(f"{what}: key {key_id} is empty")
            if size_bits is not None and len(material) * 8 != size_bits:
                raise KeySourceProtocolError(
                    f"{what}: key {key_id} has {len(material) * 8} bits, {size_bits} asked")
            keys.append(QkdKey(key_id, SecretBytes(material)))
            del material
            for name, table in (("key_ID_extension", id_ext), ("key_extension", key_ext)):
                ext = _ext(item, name, f"{what}: keys[{i}]")
                if ext is not None:
                    table[key_id] = ext
        container_ext = _ext(doc, "key_container_extension", what)
    except KeySourceProtocolError:
        for k in keys:   # never leave half a batch of key material behind
            k.key.wipe()
        raise
    return KeyContainer(keys, id_ext, key_ext, container_ext)


def normalise_key_id(value: object, where: str = "key_ID") -> str:
    """The canonical lower-case UUID text of a key_ID (ETSI GS QKD 014 6.3:
    key_ID is a UUID, RFC 4122 text form)."""
    if not isinstance(value, str) or len(value) != 36:
        raise KeySourceProtocolError(f"{where} is not a UUID")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise KeySourceProtocolError(f"{where} is not a UUID") from None


def parse_key_ids(raw: bytes) -> list[str]:
    """Decode a Key IDs body (ETSI GS QKD 014 6.4) -- what a slave sends to
    its KME; the simulator uses it, tests replay the spec example."""
    doc = _load_object(raw, "key_IDs")
    items = doc.get("key_IDs")
    if not isinstance(items, list) or not items:
        raise KeySourceProtocolError("key_IDs: 'key_IDs' must be a non-empty array")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise KeySourceProtocolError(f"key_IDs[{i}] is {_kind(item)}, not an object")
        out.append(normalise_key_id(item.get("key_ID"), f"key_IDs[{i}].key_ID"))
    return out


def parse_error(raw: bytes) -> ErrorBody:
    """Decode an Error body (ETSI GS QKD 014 6.5) leniently: KMEs send HTML
    or plain text on 401 and behind proxies. Never raises."""
    text = raw[:4096].decode("utf-8", "replace")
    try:
        doc = json.loads(text) if len(raw) <= 4096 else None
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        details = doc.get("details")
        return ErrorBody(_clean(doc["message"]),
                         tuple(details) if isinstance(details, list) else (), True)
    return ErrorBody(_clean(re.sub(r"<[^>]*>", " ", text)), (), False)


def _clean(text: str, limit: int = 160) -> str:
    """Printable, one line, bounded: KME text ends up in logs and CLI output."""
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


# --------------------------------------------------------------------------
# error classification
# --------------------------------------------------------------------------

def classify_error(method: str, http_status: int, raw: bytes, *,
                   empty_pool_statuses: frozenset[int] = frozenset({503}),
                   kme: str = "KME") -> KeySourceError:
    """The error for a non-200 answer to ``method`` ("status", "enc_keys",
    "dec_keys"), by whose fault it is.

    * 401 -- we were refused (ETSI GS QKD 014 5.1: wrong SAE certificate, or
      not named as a slave for these keys). Body ignored: often HTML.
    * dec_keys 400/404 -- the key is not on the KME (never issued, or already
      delivered: dec_keys is not idempotent). KeyNotFound, so the protocol
      layer reports "key lost" and the rekey aborts.
    * enc_keys 400 with one of the spec's fixed request-format messages --
      the KME refuses what we asked (size, extensions): a configuration
      mismatch, reported as a protocol error naming the KME's reason.
    * enc_keys 400/404 otherwise, and 503 -- no key now (vendors differ in
      which code they use for an empty pool). KeyUnavailable.
    * anything else -- the KME broke the protocol.
    """
    err = parse_error(raw)
    msg = f"{kme} {method}: HTTP {http_status}" + (f": {err.message}" if err.message else "")
    if http_status == 401 or http_status == 403:
        return KeySourceAuthError(f"{kme} {method}: refused (HTTP {http_status}): "
                                  "check the SAE certificate and that this SAE was named as slave")
    if method == "dec_keys" and http_status in (400, 404):
        if err.message == MSG_SIZE_MULTIPLE_OF_8:  # cannot happen for dec_keys: a broken KME
            return KeySourceProtocolError(msg)
        return KeyNotFound(msg)
    if http_status in empty_pool_statuses or http_status == 503:
        return KeyUnavailable(msg)
    if method == "enc_keys" and http_status in (400, 404):
        if err.message in SPEC_400_MESSAGES - {MSG_KEYS_NOT_FOUND}:
            return KeySourceProtocolError(f"{msg} (request refused: check key size and "
                                          "extensions against the KME status)")
        if http_status == 404 or _EMPTY_POOL_WORDS.search(err.message):
            return KeyUnavailable(msg)
        return KeySourceProtocolError(msg)
    if 500 <= http_status < 600:
        return KeyUnavailable(msg)
    return KeySourceProtocolError(msg)
