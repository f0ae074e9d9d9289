"""Per-peer protocol settings (:class:`SessionConfig`) and their validation.

Theory of operation: the daemon builds one :class:`SessionConfig` per peer
from the YAML file and hands it to
:class:`~qkdgate.gateway.protocol.session.PeerSession`. Validation here is
explicit (``validate()``, never ``assert``) and raises
:class:`~qkdgate.errors.ConfigError` naming the field, so a bad value is
refused at load/reload time rather than in the middle of an exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qkdgate.errors import ConfigError
from qkdgate.gateway.protocol import constants as C
from qkdgate.keymix.secret import SecretBytes

KEMS = ("ML-KEM-768", "ML-KEM-1024")
QKD_ROLES = (None, "master", "slave")
TUNNEL_KINDS = ("ipsec", "macsec", "wireguard", "strongswan")   # messages.TUNNEL_KIND_IDS


@dataclass(frozen=True, slots=True)
class TunnelRef:
    """A tunnel this peer pair keys. ``kind`` decides what the per-tunnel
    value in INIT/RESP means: an ESP SPI (``ipsec``), a MACsec AN, or 0 for
    the key consumers ``wireguard`` and ``strongswan`` (docs/protocol.md 4.2)."""

    tunnel_id: str
    kind: str = "ipsec"


@dataclass(frozen=True)
class SessionConfig:
    local_name: str
    peer_name: str
    tunnels: tuple[TunnelRef, ...] = ()
    kem: str = "ML-KEM-768"
    x25519: bool = True
    psk: SecretBytes | None = field(default=None, repr=False)
    # ETSI GS QKD 014: the master calls enc_keys and sends only key_IDs; the
    # slave calls dec_keys with them. None: this peer pair has no QKD link.
    qkd_role: str | None = None
    local_sae_id: str = ""
    peer_sae_id: str = ""
    qkd_key_bits: int = 256
    # Several QKD key sources (issue 13, docs/protocol.md 4.2, 9.1): the key size
    # in bits of each, in configuration order (the order their keys are
    # mixed in); empty: the one source above (plain key_IDs on the wire).
    # ``qkd_required`` of them must deliver (the rule's k; 0 means all).
    qkd_sources: tuple[int, ...] = ()
    qkd_required: int = 0
    # True if any tunnel to this peer allows the PQC fallback: the session may
    # then complete generations without QKD keys (flagged in the transcript).
    allow_pqc_only: bool = False
    # timers (gateway/protocol/timers.py); the retire grace of an old
    # generation is the tunnel layer's (rekey.grace), not the session's
    rekey_interval: float = C.REKEY_INTERVAL
    rekey_jitter: float = C.REKEY_JITTER
    retransmit_base: float = C.RETRANSMIT_BASE
    retransmit_max: float = C.RETRANSMIT_MAX
    exchange_timeout: float = C.EXCHANGE_TIMEOUT
    retry_base: float = C.RETRY_BASE
    retry_max: float = C.RETRY_MAX
    rate_per_second: float = C.RATE_PER_SECOND   # expensive INIT work per peer
    rate_burst: int = C.RATE_BURST
    initiate_on_start: bool = True
    # Highest generation already in the kernel (found by the daemon at start):
    # new generations are numbered above it, so a restart never reuses one.
    generation_floor: int = 0

    @property
    def qkd_multi(self) -> bool:
        """Several key sources: key_IDs travel in the sourced form."""
        return bool(self.qkd_sources)

    @property
    def qkd_k(self) -> int:
        """How many sources must deliver (1 for the single-source form)."""
        return self.qkd_required or len(self.qkd_sources) or 1

    def validate(self) -> None:
        def bad(path: str, expected: str, found: object) -> ConfigError:
            return ConfigError("invalid protocol setting", path=path, expected=expected,
                               found=repr(found))
        for name in ("local_name", "peer_name"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or len(v.encode()) > 255:
                raise bad(name, "a name of 1..255 bytes", v)
        if self.local_name == self.peer_name:
            raise bad("peer_name", "a name different from local_name", self.peer_name)
        if self.kem not in KEMS:
            raise bad("kem", " or ".join(KEMS), self.kem)
        if self.qkd_role not in QKD_ROLES:
            raise bad("qkd_role", "master, slave or none", self.qkd_role)
        if self.qkd_role is not None:
            for name in ("local_sae_id", "peer_sae_id"):
                if not getattr(self, name):
                    raise bad(name, "an SAE ID when qkd_role is set", getattr(self, name))
            if self.qkd_key_bits % 8 or not 128 <= self.qkd_key_bits <= 8192:
                raise bad("qkd_key_bits", "a multiple of 8 in 128..8192", self.qkd_key_bits)
            for i, bits in enumerate(self.qkd_sources):
                if not isinstance(bits, int) or bits % 8 or not 128 <= bits <= 8192:
                    raise bad(f"qkd_sources[{i}]", "a multiple of 8 in 128..8192", bits)
            if len(self.qkd_sources) > C.MAX_QKD_SOURCES:
                raise bad("qkd_sources", f"at most {C.MAX_QKD_SOURCES} sources",
                          len(self.qkd_sources))
            if not 0 <= self.qkd_required <= len(self.qkd_sources):
                raise bad("qkd_required", f"0..{len(self.qkd_sources)}", self.qkd_required)
        if self.psk is not None and len(self.psk) < 16:
            raise bad("psk", "at least 16 bytes", f"{len(self.psk)} bytes")
        seen = set()
        for i, t in enumerate(self.tunnels):
            if t.kind not in TUNNEL_KINDS:
                raise bad(f"tunnels[{i}].kind", " or ".join(TUNNEL_KINDS), t.kind)
            if not t.tunnel_id or len(t.tunnel_id.encode()) > 255 or t.tunnel_id in seen:
                raise bad(f"tunnels[{i}].tunnel_id", "a unique id of 1..255 bytes", t.tunnel_id)
            seen.add(t.tunnel_id)
        if len(self.tunnels) > C.MAX_SPIS:
            raise bad("tunnels", f"at most {C.MAX_SPIS} tunnels per peer", len(self.tunnels))
        for name, lo in (("rekey_interval", 1.0), ("retransmit_base", 0.01),
                         ("retransmit_max", 0.01), ("exchange_timeout", 0.1),
                         ("retry_base", 0.01), ("retry_max", 0.01),
                         ("rate_per_second", 0.001)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < lo:
                raise bad(name, f"a number >= {lo}", v)
        if not 0 <= self.rekey_jitter < 0.5:
            raise bad("rekey_jitter", "a fraction in [0, 0.5)", self.rekey_jitter)
        if not isinstance(self.rate_burst, int) or self.rate_burst < 1:
            raise bad("rate_burst", "an integer >= 1", self.rate_burst)
