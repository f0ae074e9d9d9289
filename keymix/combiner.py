"""The hybrid combiner: ML-KEM + X25519 + QKD -> one session secret.

Theory of operation: one rekey produces one :class:`SessionSecret` per peer
pair; :mod:`qkdgate.keymix.schedule` then derives every SA key from it.

Construction (docs/keymix.md 4, byte-exact)::

    Z'        = Z_mlkem || Z_x25519 || Z_qkd          (absent legs are empty)
    FixedInfo = lp16(ROOT) || lp16("session secret") || u8(presence)
                || lp16(kem_name) || u16(|Z_mlkem|) || u16(|Z_x25519|) || u16(|Z_qkd|)
                || u16(#key_ids) || lp16(key_id)...
                [|| (u8(source index) || u16(|key|))...  when several QKD sources]
                || lp16(transcript_hash)
    S         = HKDF-SHA384(salt=ROOT, IKM=Z', info=FixedInfo, L=48)

This is the hybrid shared secret of NIST SP 800-56C rev. 2 section 2
(``Z' = Z || T``: the FIPS-approved ML-KEM secret first, the others as the
auxiliary ``T``) fed to the two-step extract-then-expand KDF of SP 800-56C
rev. 2 section 5 (HMAC-SHA-384), which is also the concatenation combiner
(CatKDF) of ETSI TS 103 744. Which legs were present, the KEM, the secret
lengths and the QKD key IDs are all in FixedInfo *and* in ROOT, so a session
without QKD can never produce the secret of one with QKD even if the
concatenated bytes coincide.

Security holds while any one input stays secret: HMAC-SHA-384 keyed by a
salt is a randomness extractor/PRF over the whole of Z', so unpredictability
of any one component makes S pseudorandom (docs/keymix.md 7 argues it).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import NoReturn, SupportsIndex

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from qkdgate.errors import LocalProtocolError
from qkdgate.keymix import labels as L
from qkdgate.keymix.kem import LIBOQS_PREFIX
from qkdgate.keymix.secret import SecretBytes

log = logging.getLogger(__name__)

MIN_QKD_KEY = 16        # bytes; ETSI GS QKD 014 keys are usually 32
MAX_SOURCE_INDEX = 15   # sourced key_IDs carry a 4-bit-range index (docs/protocol.md 4.2, 9.1)
MIN_TRANSCRIPT_HASH = 32
MAX_TRANSCRIPT_HASH = 64


@dataclass(frozen=True)
class HybridInputs:
    """Everything the combiner mixes. Secrets are :class:`SecretBytes`; the
    transcript hash and QKD key IDs are public and bound into FixedInfo."""

    kem_name: str
    kem_secret: SecretBytes
    x25519_secret: SecretBytes | None
    qkd_key: SecretBytes | None
    qkd_key_ids: tuple[str, ...]
    transcript_hash: bytes
    # Several QKD sources (docs/keymix.md 4.5): for each key_ID, the index of
    # its source in the configuration order and its key's length in bytes;
    # ``qkd_key`` is those keys concatenated in that order. Empty: one source.
    qkd_sources: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        # The derivation names the algorithm, not the library that ran it, so
        # a pyca peer and a liboqs peer ("liboqs:ML-KEM-768") interoperate.
        if isinstance(self.kem_name, str) and self.kem_name.startswith(LIBOQS_PREFIX):
            object.__setattr__(self, "kem_name", self.kem_name.removeprefix(LIBOQS_PREFIX))

    def validate(self) -> None:
        """Raise :class:`LocalProtocolError` if the inputs are inconsistent
        (these come from our own protocol layer, not from the peer)."""
        if not isinstance(self.kem_name, str) or not self.kem_name.isprintable() \
                or not 0 < len(self.kem_name) <= 64:
            raise LocalProtocolError("kem_name must be a printable name of 1..64 characters")
        if not isinstance(self.kem_secret, SecretBytes) or not 16 <= len(self.kem_secret) <= 255:
            raise LocalProtocolError("kem_secret must be SecretBytes of 16..255 bytes")
        if self.x25519_secret is not None and (not isinstance(self.x25519_secret, SecretBytes)
                                               or len(self.x25519_secret) != 32):
            raise LocalProtocolError("x25519_secret must be 32-byte SecretBytes or None")
        if self.qkd_key is not None:
            if not isinstance(self.qkd_key, SecretBytes) \
                    or not MIN_QKD_KEY <= len(self.qkd_key) <= 0xFFFF:
                raise LocalProtocolError(f"qkd_key must be SecretBytes of at least "
                                         f"{MIN_QKD_KEY} bytes")
            if not self.qkd_key_ids:
                raise LocalProtocolError("a QKD key needs its key IDs (ETSI GS QKD 014 key_ID)")
        elif self.qkd_key_ids:
            raise LocalProtocolError("QKD key IDs given without a QKD key")
        if self.qkd_sources:
            if not isinstance(self.qkd_sources, tuple) or self.qkd_key is None \
                    or len(self.qkd_sources) != len(self.qkd_key_ids):
                raise LocalProtocolError("qkd_sources needs one (index, length) per QKD key ID")
            idx = [s[0] for s in self.qkd_sources]
            lengths = [s[1] for s in self.qkd_sources]
            if not all(isinstance(i, int) and 0 <= i <= MAX_SOURCE_INDEX for i in idx) \
                    or any(a >= b for a, b in itertools.pairwise(idx)):
                raise LocalProtocolError("QKD source indices must increase within 0..15")
            if not all(isinstance(n, int) and MIN_QKD_KEY <= n <= 0xFFFF for n in lengths) \
                    or sum(lengths) != len(self.qkd_key):
                raise LocalProtocolError(f"each sourced QKD key must have at least "
                                         f"{MIN_QKD_KEY} bytes and they must add up to qkd_key")
        if not isinstance(self.qkd_key_ids, tuple) or len(self.qkd_key_ids) > 255 or not all(
                isinstance(k, str) and 0 < len(k.encode("utf-8")) <= 255 for k in self.qkd_key_ids):
            raise LocalProtocolError("qkd_key_ids must be a tuple of up to 255 non-empty strings")
        if not isinstance(self.transcript_hash, (bytes, bytearray)) or not \
                MIN_TRANSCRIPT_HASH <= len(self.transcript_hash) <= MAX_TRANSCRIPT_HASH:
            raise LocalProtocolError(f"transcript_hash must be {MIN_TRANSCRIPT_HASH}.."
                                     f"{MAX_TRANSCRIPT_HASH} bytes")


@dataclass(frozen=True)
class Provenance:
    """Which inputs made a session secret. Public: safe to log and print."""

    kem_name: str
    x25519: bool
    qkd_key_ids: tuple[str, ...]
    # The configured source index of each key_ID (several sources); empty: one source
    qkd_sources: tuple[int, ...] = ()

    @property
    def qkd(self) -> bool:
        return bool(self.qkd_key_ids)

    @property
    def root_label(self) -> str:
        return L.root_label(self.kem_name, self.x25519, self.qkd)

    def __str__(self) -> str:
        ids = self.qkd_key_ids if not self.qkd_sources else tuple(
            f"#{i}:{k}" for i, k in zip(self.qkd_sources, self.qkd_key_ids, strict=True))
        qkd = f"QKD[{','.join(ids)}]" if self.qkd else "no QKD"
        return f"{self.kem_name}, {'X25519' if self.x25519 else 'no X25519'}, {qkd}"


class SessionSecret:
    """The combined secret of one exchange (one generation, one peer pair).

    ``secret`` never prints; ``session_id`` is a public 16-byte handle derived
    from it (label "session id") that both ends compute identically.
    """

    __slots__ = ("provenance", "root_label", "secret", "session_id")

    def __init__(self, secret: SecretBytes, provenance: Provenance) -> None:
        if not isinstance(secret, SecretBytes) or len(secret) != L.HASH_LEN:
            raise LocalProtocolError(f"session secret must be {L.HASH_LEN}-byte SecretBytes")
        self.secret = secret
        self.provenance = provenance
        self.root_label = provenance.root_label
        self.session_id = expand(self, L.LABEL_SESSION_ID, 16)

    def __repr__(self) -> str:
        return (f"<SessionSecret {self.session_id.hex()} {self.root_label!r} "
                f"fp={self.secret.fingerprint()}>")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("SessionSecret cannot be pickled")

    def wipe(self) -> None:
        """Forget the secret (best effort, see keymix.secret)."""
        self.secret.wipe()


def fixed_info(inputs: HybridInputs) -> bytes:
    """FixedInfo of SP 800-56C rev. 2 5.8.2 for these inputs (docs/keymix.md 4.2)."""
    x, q = inputs.x25519_secret is not None, inputs.qkd_key is not None
    presence = L.PRESENT_KEM | (L.PRESENT_X25519 if x else 0) | (L.PRESENT_QKD if q else 0) \
        | (L.PRESENT_QKD_SOURCED if inputs.qkd_sources else 0)
    return b"".join([
        L.lp16(L.root_label(inputs.kem_name, x, q)),
        L.lp16(L.LABEL_SESSION),
        L.u8(presence),
        L.lp16(inputs.kem_name),
        L.u16(len(inputs.kem_secret)),
        L.u16(len(inputs.x25519_secret) if inputs.x25519_secret is not None else 0),
        L.u16(len(inputs.qkd_key) if inputs.qkd_key is not None else 0),
        L.u16(len(inputs.qkd_key_ids)),
        *(L.lp16(k) for k in inputs.qkd_key_ids),
        # docs/keymix.md 4.5: which source gave each key and how long it is
        *(L.u8(i) + L.u16(n) for i, n in inputs.qkd_sources),
        L.lp16(bytes(inputs.transcript_hash)),
    ])


def combine(inputs: HybridInputs) -> SessionSecret:
    """Mix the inputs into one :class:`SessionSecret` (docs/keymix.md 4)."""
    inputs.validate()
    x, q = inputs.x25519_secret is not None, inputs.qkd_key is not None
    root = L.root_label(inputs.kem_name, x, q)
    # NIST SP 800-56C rev. 2 section 2: Z' = Z || T, approved (ML-KEM) secret first.
    z = bytearray(inputs.kem_secret.reveal())
    if x:
        z += inputs.x25519_secret.reveal()  # type: ignore[union-attr]
    if q:
        z += inputs.qkd_key.reveal()  # type: ignore[union-attr]
    try:
        # NIST SP 800-56C rev. 2 section 5: HMAC extract with salt, then expand with FixedInfo.
        kdf = HKDF(algorithm=hashes.SHA384(), length=L.HASH_LEN, salt=root.encode("utf-8"),
                   info=fixed_info(inputs))
        session = SessionSecret(SecretBytes(kdf.derive(bytes(z))),
                                Provenance(inputs.kem_name, x, tuple(inputs.qkd_key_ids),
                                           tuple(i for i, _ in inputs.qkd_sources)))
    finally:
        z[:] = bytes(len(z))
    log.debug("combined session %s from %s", session.session_id.hex(), session.provenance)
    return session


def expand(session: SessionSecret, label: str, length: int, *fields: bytes) -> bytes:
    """HKDF-Expand-SHA384(S, info(ROOT, label, fields), length): one node of
    the label tree (RFC 5869 2.3). Returns bytes; callers wrap secrets."""
    return HKDFExpand(algorithm=hashes.SHA384(), length=length,
                      info=L.info(session.root_label, label, *fields)
                      ).derive(session.secret.reveal())
