"""The key service's pool secret: keys for outside SAEs from one hybrid generation.

Theory of operation: once both gateways have confirmed a generation's
session secret S (docs/keymix.md 4), each derives, for every key-service pool
it shares with the peer, a pool secret P under its own label. Every key the
pool can ever hand out, and its key_ID, is a PRF output of P, so the two
gateways hold the same keys without sending a byte of them, and the keys are
as strong as S: secret while either QKD or ML-KEM (or X25519) holds.

Byte-exact (docs/keymix.md 5, docs/keyservice.md 3)::

    P      = HKDF-Expand(S, lp16(ROOT) || lp16("key service pool")
                            || lp16(pool) || u64(generation), 48)
    key_i  = HKDF-Expand(P, lp16(ROOT) || lp16("key service key")
                            || lp16(master_SAE_ID) || lp16(slave_SAE_ID)
                            || u32(i) || u16(size_bits), size_bits / 8)
    id_i   = UUIDv8(HKDF-Expand(P, lp16(ROOT) || lp16("key service key id") || u32(i), 16))

UUIDv8 (RFC 9562 5.8): the 16 bytes with the version nibble (byte 6, high
four bits) set to 8 and the variant (byte 8, high two bits) to ``10``. The
key_ID is public: a PRF output under its own label, it reveals nothing of
the key, and it names one index of one generation of one pool.

A key is bound to the ordered SAE pair (ETSI GS QKD 014 5.3: master and
slave), so the key a dec_keys from any other SAE would get is not the one the
master holds. Which gateway serves which index (the generation's initiator
the even ones, the responder the odd ones) is :func:`serving_parity`.
"""

from __future__ import annotations

import uuid
from typing import NoReturn, SupportsIndex

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from qkdgate.errors import LocalProtocolError
from qkdgate.keymix import labels as L
from qkdgate.keymix.combiner import SessionSecret, expand
from qkdgate.keymix.secret import SecretBytes

POOL_SECRET_LEN = L.HASH_LEN
MIN_KEY_BITS = 64
MAX_KEY_BITS = 8192          # well inside HKDF-SHA384's 255 * 48 bytes (RFC 5869 2.3)
MAX_INDEX = 0xFFFFFFFF
ROLES = ("initiator", "responder")


def serving_parity(role: str) -> int:
    """The parity of the indices the gateway with this handshake ``role`` in
    the generation serves: the initiator even (0), the responder odd (1)."""
    if role not in ROLES:
        raise LocalProtocolError(f"role must be 'initiator' or 'responder', not {role!r}")
    return ROLES.index(role)


def _name(value: str, what: str) -> bytes:
    if not isinstance(value, str) or not 0 < len(value.encode("utf-8")) <= 255:
        raise LocalProtocolError(f"{what} must be a non-empty string of at most 255 bytes")
    return L.lp16(value)


def _index(i: int) -> bytes:
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= MAX_INDEX:
        raise LocalProtocolError(f"pool index {i!r} not in 0..{MAX_INDEX}")
    return L.u32(i)


class KeyPoolSecret:
    """P for one pool and one generation. Never prints its secret; wipe it
    when the generation expires (the key service's one timer owner does)."""

    __slots__ = ("_secret", "generation", "pool", "root_label")

    def __init__(self, secret: SecretBytes, root_label: str, pool: str, generation: int) -> None:
        if not isinstance(secret, SecretBytes) or len(secret) != POOL_SECRET_LEN:
            raise LocalProtocolError(f"pool secret must be {POOL_SECRET_LEN}-byte SecretBytes")
        self._secret = secret
        self.root_label = root_label
        self.pool = pool
        self.generation = generation

    @classmethod
    def derive(cls, session: SessionSecret, pool: str, generation: int) -> KeyPoolSecret:
        """P of ``pool`` from the session secret of ``generation``."""
        if not isinstance(session, SessionSecret):
            raise LocalProtocolError("need a SessionSecret from keymix.combiner.combine()")
        p = expand(session, L.LABEL_KS_POOL, POOL_SECRET_LEN, _name(pool, "pool"),
                   L.u64(generation))
        return cls(SecretBytes(p), session.root_label, pool, generation)

    def _expand(self, label: str, length: int, *fields: bytes) -> bytes:
        if not len(self._secret):
            raise LocalProtocolError(f"pool {self.pool} generation {self.generation}: "
                                     "secret already wiped")
        return HKDFExpand(algorithm=hashes.SHA384(), length=length,
                          info=L.info(self.root_label, label, *fields)
                          ).derive(self._secret.reveal())

    def key(self, master_sae: str, slave_sae: str, index: int, size_bits: int) -> SecretBytes:
        """key_i for the ordered pair (master, slave), ``size_bits`` long."""
        if not isinstance(size_bits, int) or size_bits % 8 \
                or not MIN_KEY_BITS <= size_bits <= MAX_KEY_BITS:
            raise LocalProtocolError(f"key size {size_bits!r} bits: need a multiple of 8 in "
                                     f"{MIN_KEY_BITS}..{MAX_KEY_BITS}")
        return SecretBytes(self._expand(
            L.LABEL_KS_KEY, size_bits // 8, _name(master_sae, "master SAE ID"),
            _name(slave_sae, "slave SAE ID"), _index(index), L.u16(size_bits)))

    def key_id(self, index: int) -> str:
        """The public key_ID of index ``index``: a UUIDv8 (RFC 9562 5.8)."""
        raw = bytearray(self._expand(L.LABEL_KS_KEY_ID, 16, _index(index)))
        raw[6] = 0x80 | (raw[6] & 0x0F)      # version 8
        raw[8] = 0x80 | (raw[8] & 0x3F)      # variant 10 (RFC 9562 4.1)
        return str(uuid.UUID(bytes=bytes(raw)))

    def wipe(self) -> None:
        self._secret.wipe()

    @property
    def wiped(self) -> bool:
        return not len(self._secret)

    def __repr__(self) -> str:
        return (f"<KeyPoolSecret pool={self.pool!r} generation={self.generation} "
                f"fp={self._secret.fingerprint()}>")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("KeyPoolSecret cannot be pickled")
