"""The key schedule: one session secret -> every SA key between a peer pair.

Theory of operation: a rekey makes one :class:`~qkdgate.keymix.combiner.SessionSecret`
(fresh ML-KEM, X25519 and QKD inputs). Every SA key of every tunnel between
the two gateways is an HKDF-Expand-SHA384 output of it under its own label
and context (tunnel id, direction, SPI or SCI+AN, generation), so 200 tunnels
get 400 independent keys from one QKD key, and knowing any set of SA keys
reveals nothing about the others (HKDF-Expand is a PRF keyed by S).

Directions are relative to the handshake roles, not to the local host:
``"i2r"`` protects traffic from initiator to responder, ``"r2i"`` the reverse.
Both ends therefore derive the same key for the same SA: the initiator's
outbound SA is the responder's inbound one.

Outputs (docs/keymix.md 6):

* ESP, rfc4106(gcm(aes)): 36 bytes, a 32-byte AES key then the 4-byte salt
  (RFC 4106 8.1 KEYMAT layout, which is what XFRM expects).
* MACsec GCM-AES-256: a 32-byte SAK; GCM-AES-XPN-256 adds a 12-byte salt and
  a 32-bit SSCI (IEEE 802.1AEbw / 802.1AE-2018 14.7); both need the 16-byte
  KEYID the kernel requires, derived from S so both ends agree and unique per
  SA (it is public: a PRF output under its own label reveals nothing of the SAK).
* WireGuard preshared key / strongSwan PPK (key consumers, docs/consumers.md):
  32 bytes per tunnel and generation under the consumer's own label, the
  same in both directions (WireGuard mixes its PSK into both directions of
  its Noise IKpsk2 handshake; an IKEv2 PPK, RFC 8784 3, is one value too).
* key confirmation: 32 bytes per role over the handshake transcript.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import NoReturn, SupportsIndex

from qkdgate.errors import AuthenticationFailed, LocalProtocolError
from qkdgate.keymix import labels as L
from qkdgate.keymix.ciphers import MacsecCipher
from qkdgate.keymix.combiner import SessionSecret, expand
from qkdgate.keymix.secret import SecretBytes

DIRECTIONS = ("i2r", "r2i")
ROLES = ("initiator", "responder")

ESP_KEY_LEN = 36            # RFC 4106 8.1: 32-byte AES-256 key || 4-byte salt
SAK_LEN = 32
XPN_SALT_LEN = 12           # IEEE 802.1AE-2018 14.7: 96-bit salt
KEYID_LEN = 16              # MACSEC_KEYID_LEN, include/uapi/linux/if_macsec.h
CONFIRM_LEN = 32
CONSUMER_KEY_LEN = 32       # WireGuard NOISE_SYMMETRIC_KEY_LEN; RFC 8784 PPK >= 256 bits

# The label of each key consumer that takes one key per generation. The
# SA-keyed consumers (xfrm: LABEL_ESP, macsec: LABEL_MACSEC_SAK) have their
# own functions above, since their context names an SPI or SCI+AN.
CONSUMER_LABELS = {"wireguard": L.LABEL_WIREGUARD_PSK, "strongswan": L.LABEL_STRONGSWAN_PPK}

# IEEE 802.1X-2020 (MKA) numbers SSCIs 1, 2, ... in the order of the SCIs of
# the CA. Each direction here has its own SAK, so only agreement matters: the
# SC carrying initiator-to-responder traffic is SSCI 1, the other SSCI 2.
_SSCI = {"i2r": 1, "r2i": 2}


@dataclass(frozen=True)
class MacsecKeys:
    """The keys of one MACsec SA. ``keyid`` and ``ssci`` are public."""

    sak: SecretBytes
    keyid: bytes
    salt: SecretBytes | None = None
    ssci: int | None = None

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("MacsecKeys cannot be pickled")


def _check_common(session: SessionSecret, tunnel_id: str, direction: str,
                  generation: int) -> tuple[bytes, bytes, bytes]:
    if not isinstance(session, SessionSecret):
        raise LocalProtocolError("need a SessionSecret from keymix.combiner.combine()")
    if not isinstance(tunnel_id, str) or not 0 < len(tunnel_id.encode("utf-8")) <= 255:
        raise LocalProtocolError("tunnel_id must be a non-empty string of at most 255 bytes")
    if direction not in DIRECTIONS:
        raise LocalProtocolError(f"direction must be 'i2r' or 'r2i', not {direction!r}")
    return L.lp16(tunnel_id), L.lp16(direction), L.u64(generation)


def esp_key(session: SessionSecret, tunnel_id: str, direction: str, spi: int,
            generation: int) -> SecretBytes:
    """36-byte KEYMAT for one rfc4106(gcm(aes)) ESP SA (docs/keymix.md 6.1)."""
    tun, dirn, gen = _check_common(session, tunnel_id, direction, generation)
    if not isinstance(spi, int) or not 0x100 <= spi <= 0xFFFFFFFF:  # RFC 4303 2.1
        raise LocalProtocolError(f"SPI {spi!r} not in 0x100..0xffffffff")
    return SecretBytes(expand(session, L.LABEL_ESP, ESP_KEY_LEN, tun, dirn, L.u32(spi), gen))


def macsec_keys(session: SessionSecret, tunnel_id: str, direction: str, sci: int, an: int,
                generation: int, cipher: MacsecCipher) -> MacsecKeys:
    """SAK, KEYID (and salt, SSCI for XPN) of one MACsec SA (docs/keymix.md 6.2)."""
    tun, dirn, gen = _check_common(session, tunnel_id, direction, generation)
    if not isinstance(cipher, MacsecCipher):
        raise LocalProtocolError(f"cipher must be a MacsecCipher, not {cipher!r}")
    if not isinstance(an, int) or not 0 <= an <= 3:   # IEEE 802.1AE-2018 9.6: 2-bit AN
        raise LocalProtocolError(f"MACsec AN {an!r} not in 0..3")
    fields = (L.lp16(cipher.value), tun, dirn, L.u64(sci), L.u8(an), gen)
    xpn = cipher is MacsecCipher.GCM_AES_XPN_256
    out = expand(session, L.LABEL_MACSEC_SAK, SAK_LEN + (XPN_SALT_LEN if xpn else 0), *fields)
    keyid = expand(session, L.LABEL_MACSEC_KEYID, KEYID_LEN, *fields)
    if not xpn:
        return MacsecKeys(SecretBytes(out), keyid)
    return MacsecKeys(SecretBytes(out[:SAK_LEN]), keyid, SecretBytes(out[SAK_LEN:]),
                      _SSCI[direction])


def consumer_key(session: SessionSecret, consumer: str, tunnel_id: str,
                 generation: int) -> SecretBytes:
    """32-byte key of ``generation`` for a key consumer's tunnel
    (docs/keymix.md 6.4): the WireGuard preshared key or the strongSwan PPK."""
    if not isinstance(session, SessionSecret):
        raise LocalProtocolError("need a SessionSecret from keymix.combiner.combine()")
    label = CONSUMER_LABELS.get(consumer)
    if label is None:
        raise LocalProtocolError(f"no per-generation key for consumer {consumer!r}")
    if not isinstance(tunnel_id, str) or not 0 < len(tunnel_id.encode("utf-8")) <= 255:
        raise LocalProtocolError("tunnel_id must be a non-empty string of at most 255 bytes")
    return SecretBytes(expand(session, label, CONSUMER_KEY_LEN, L.lp16(tunnel_id),
                              L.u64(generation)))


def confirmation_tag(session: SessionSecret, role: str, transcript_hash: bytes) -> bytes:
    """32-byte key-confirmation value that ``role`` sends over
    ``transcript_hash`` (docs/keymix.md 6.3). Proves possession of S."""
    if not isinstance(session, SessionSecret):
        raise LocalProtocolError("need a SessionSecret from keymix.combiner.combine()")
    if role not in ROLES:
        raise LocalProtocolError(f"role must be 'initiator' or 'responder', not {role!r}")
    if not isinstance(transcript_hash, (bytes, bytearray)) or not 0 < len(transcript_hash) <= 255:
        raise LocalProtocolError("transcript_hash must be 1..255 bytes")
    return expand(session, L.LABEL_CONFIRM, CONFIRM_LEN, L.lp16(role),
                  L.lp16(bytes(transcript_hash)))


def verify_confirmation(session: SessionSecret, role: str, transcript_hash: bytes,
                        tag: bytes) -> None:
    """Check the peer's tag in constant time; :class:`AuthenticationFailed` if wrong."""
    want = confirmation_tag(session, role, transcript_hash)
    if not isinstance(tag, (bytes, bytearray)) or not hmac.compare_digest(want, bytes(tag)):
        raise AuthenticationFailed(f"key confirmation from the {role} does not verify "
                                   f"(session {session.session_id.hex()})")
