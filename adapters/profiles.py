"""Vendor presets for ETSI GS QKD 014 KMEs.

Theory of operation: a profile is a handful of defaults -- which HTTP form
of enc_keys to use, the default key size, how SAE IDs look, which status a
KME uses for "pool empty" -- each backed by a public source named in
``sources``. We add no quirk we cannot cite: where public documentation
says nothing, the profile keeps the spec's behaviour and the client's
general tolerance (see :func:`qkdgate.adapters.etsi014_codec.classify_error`)
covers the rest. Every field can be overridden in the key source's
``options`` (docs/qkd.md, "Vendor profiles").
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from qkdgate.adapters.settings import to_int
from qkdgate.errors import ConfigError

SPEC = "ETSI GS QKD 014 V1.1.1 (2019-02), 5.2-5.4 and 6"


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    title: str
    enc_keys_method: str = "POST"       # "POST" or "GET" (GET only carries number and size)
    dec_keys_method: str = "POST"       # "POST" or "GET" (GET only for one key_ID)
    default_key_bits: int = 256
    sae_id_format: str = "string"       # "string", "uuid" or "integer"
    empty_pool_statuses: frozenset[int] = frozenset({503})
    sources: tuple[str, ...] = (SPEC,)

    def __post_init__(self) -> None:
        if self.enc_keys_method not in ("POST", "GET") \
                or self.dec_keys_method not in ("POST", "GET"):
            raise ConfigError("method must be POST or GET", path="options.enc_keys_method")
        if self.default_key_bits <= 0 or self.default_key_bits % 8:
            raise ConfigError("default key size must be a positive multiple of 8 bits",
                              path="options.key_size", found=str(self.default_key_bits))
        if self.sae_id_format not in ("string", "uuid", "integer"):
            raise ConfigError("unknown SAE ID format", path="options.sae_id_format",
                              expected="string, uuid or integer", found=self.sae_id_format)

    def check_sae_id(self, sae_id: str, where: str = "SAE ID") -> str:
        """Refuse an SAE ID this KME cannot have (it lands in a URL path)."""
        if not isinstance(sae_id, str) or not sae_id or len(sae_id) > 256 \
                or not sae_id.isprintable() or "/" in sae_id:
            raise ConfigError(f"invalid {where}", found=repr(sae_id)[:60])
        if self.sae_id_format == "uuid":
            try:
                uuid.UUID(sae_id)
            except ValueError:
                raise ConfigError(f"{where} must be a UUID for profile {self.name}",
                                  found=sae_id) from None
        elif self.sae_id_format == "integer" and not re.fullmatch(r"[0-9]+", sae_id):
            raise ConfigError(f"{where} must be an integer for profile {self.name}", found=sae_id)
        return sae_id


PROFILES: dict[str, Profile] = {
    "generic": Profile(
        name="generic", title="Generic ETSI GS QKD 014 KME (the spec as written)",
        sources=(SPEC,)),
    # ID Quantique Cerberis XG/XGR: key delivery over ETSI 014 with mutual TLS,
    # enc_keys requested with GET ...?number=N&size=S, 256-bit keys by default,
    # free-string SAE IDs. Sources: the public QURSA integration of a Cerberis
    # XGR (qursa-uc3m/qkd-etsi-api-c-wrapper, src/etsi014/backends/cerberis_xgr.c:
    # "enc_keys?number=%d&size=%d", DEFAULT_KEY_SIZE 256, SAE "CONSB") and the
    # shared spec summary (/work/shared/specs/etsi-gs-qkd-014.md). No empty-pool
    # code is documented publicly: the spec's 503 plus the general tolerance.
    "idq-cerberis-xgr": Profile(
        name="idq-cerberis-xgr", title="ID Quantique Cerberis XG/XGR (ETSI 014 key delivery)",
        enc_keys_method="GET", default_key_bits=256,
        sources=(SPEC, "github.com/qursa-uc3m/qkd-etsi-api-c-wrapper "
                       "src/etsi014/backends/cerberis_xgr.c (GET enc_keys?number&size, 256-bit)")),
    # Toshiba KMS/KME: ETSI 014 was developed from Toshiba's proposal
    # (Quantum Protocol Forum, "ETSI QKD key delivery API", qpf.org) and the
    # public material describes no deviation, so the profile is the spec.
    "toshiba": Profile(
        name="toshiba", title="Toshiba QKD KME (ETSI 014)",
        sources=(SPEC, "qpf.org/etsi-qkd-key-delivery-api: GS QKD 014 was based on a "
                       "proposal from Toshiba")),
}
PROFILES["idq"] = PROFILES["idq-cerberis-xgr"]


def _int_set(value: object) -> frozenset[int]:
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"expected a list of integers, not {type(value).__name__}")
    return frozenset(to_int(x) for x in value)


def get_profile(name: str, overrides: Mapping[str, object] | None = None) -> Profile:
    """The named profile with per-source ``options`` overrides applied."""
    base = PROFILES.get(name)
    if base is None:
        raise ConfigError("unknown KME profile", path="options.profile",
                          expected=", ".join(sorted(PROFILES)), found=str(name))
    if not overrides:
        return base
    changes: dict[str, Any] = {}
    convs: tuple[tuple[str, Callable[[object], object]], ...] = (
        ("enc_keys_method", lambda v: str(v).upper()),
        ("dec_keys_method", lambda v: str(v).upper()),
        ("key_size", to_int), ("default_key_bits", to_int),
        ("sae_id_format", str),
        ("empty_pool_statuses", _int_set))
    for key, conv in convs:
        if key in overrides:
            try:
                value = conv(overrides[key])
            except (TypeError, ValueError):
                raise ConfigError("bad value", path=f"options.{key}",
                                  found=repr(overrides[key])[:60]) from None
            changes["default_key_bits" if key == "key_size" else key] = value
    return replace(base, **changes)
