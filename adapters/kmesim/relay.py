"""Trusted-node key relay between the simulator's KMEs, hop by hop.

Theory of operation: a key for SAEs whose KMEs share no QKD link travels
along a route of trusted nodes. On every hop the sending node takes fresh
key material from that hop's QKD link (:class:`LinkKeyStore`, fed from the
link model's pool) and

* encrypts the key with a one-time pad: ``c = k XOR pad``, ``|pad| = |k|``;
* authenticates the message with Poly1305 under a one-time 32-byte key also
  drawn from the link: a Wegman-Carter authenticator (an almost-Delta-universal
  hash plus a one-time pad), whose forgery bound does not depend on any
  computational assumption when its key is uniform and used once
  (Bernstein, "The Poly1305-AES message-authentication code", FSE 2005, 3;
  Wegman and Carter, JCSS 22 (1981)). The library is pyca/cryptography's
  ``Poly1305``; nothing here is a home-made primitive.

The receiving node checks the tag (constant time), removes the pad, and
holds the key in the clear: every trusted node on the route sees it. That is
the trust the network asks for; :mod:`.kme` records what compromised nodes
saw. The security argument is in docs/qkd.md ("Trusted-node relay").

Messages follow the ETSI GS QKD 020 draft's KME-to-KME "ext_keys" container
(OpenAPI "Interoperable Key Management System API", draft 0.4.1, work item
DGS/QKD-020_InteropKMS: ``POST /kmapi/v1/ext_keys`` with ``keys[{key_id,
value, extension}]``, ``initiator_sae_id``, ``target_sae_ids``,
``ack_callback_url``; the answer an ack container with ``key_ids``,
``ack_status`` ``relayed``/``failed``, ``initiator_sae_id``,
``target_sae_id``, ``message``). The draft moves keys between KMSs *inside*
a trusted node, in the clear under TLS; qkdgate's part, labelled as such, is
the vendor extension ``qkdgate_relay`` on each key that carries the hop,
route, link key_ID and tag, and ``value`` holding the padded key instead of
the key. The simulator delivers the containers in-process (encoded to JSON
and decoded again), not over HTTP: ``ack_callback_url`` names the path a
KME would serve.

Pure: no I/O, randomness injected.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from qkdgate.errors import AuthenticationFailed, RemoteProtocolError

MAC_KEY_BYTES = 32          # Poly1305 one-time key (r, s)
TAG_BYTES = 16
EXT = "qkdgate_relay"       # vendor extension: ETSI 014 6.1 / 020 prefix convention
EXT_KEYS_PATH = "/kmapi/v1/ext_keys"          # ETSI GS QKD 020 draft
ACK_PATH = "/kmapi/v1/ext_keys/ack"           # ETSI GS QKD 020 draft


def link_bits(size_bits: int) -> int:
    """Link key one hop consumes to relay a key of ``size_bits``: the pad
    plus the one-time MAC key."""
    return size_bits + 8 * MAC_KEY_BYTES


@dataclass(frozen=True, slots=True)
class LinkKey:
    key_id: str
    pad: bytes = field(repr=False)
    mac_key: bytes = field(repr=False)


class LinkKeyStore:
    """The key material both ends of one QKD link hold, by link key_ID.

    In a real network each end has its own copy from the QKD devices; the
    simulator keeps one copy for both. The sender draws, the receiver takes
    by ID, and a link key serves one message only."""

    def __init__(self, rng: Callable[[int], bytes]) -> None:
        self._rng = rng
        self._keys: dict[str, LinkKey] = {}

    def draw(self, pad_bytes: int) -> LinkKey:
        key = LinkKey(str(uuid.UUID(bytes=self._rng(16), version=4)), self._rng(pad_bytes),
                      self._rng(MAC_KEY_BYTES))
        self._keys[key.key_id] = key
        return key

    def take(self, key_id: str) -> LinkKey | None:
        return self._keys.pop(key_id, None)

    def __len__(self) -> int:
        return len(self._keys)


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("pad and key differ in length")   # our bug
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _canonical(container: dict[str, Any]) -> bytes:
    return json.dumps(container, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Hop:
    """Where one relay message goes and what it is part of."""
    key_id: str
    initiator_sae: str
    target_sae: str
    route: tuple[str, ...]
    index: int                     # 0: from route[0] to route[1]
    share: tuple[int, int] = (1, 1)   # (i, k): share i of k, XORed at the end

    @property
    def src(self) -> str:
        return self.route[self.index]

    @property
    def dst(self) -> str:
        return self.route[self.index + 1]


def seal(hop: Hop, link_key: LinkKey, material: bytes) -> bytes:
    """The wire form of one hop: an ETSI 020 ext_keys container, JSON."""
    ext = {"route": list(hop.route), "hop": hop.index, "from_KME_ID": hop.src,
           "to_KME_ID": hop.dst, "link_key_ID": link_key.key_id, "share": list(hop.share),
           "otp": "xor", "mac": "poly1305-one-time"}
    container: dict[str, Any] = {
        "keys": [{"key_id": hop.key_id,
                  "value": base64.b64encode(_xor(material, link_key.pad)).decode("ascii"),
                  "extension": {EXT: ext}}],
        "initiator_sae_id": hop.initiator_sae,
        "target_sae_ids": [hop.target_sae],
        "ack_callback_url": f"https://{hop.src}{ACK_PATH}",
    }
    tag = Poly1305.generate_tag(link_key.mac_key, _canonical(container))
    ext["tag"] = base64.b64encode(tag).decode("ascii")
    return _canonical({"ext_key_container": container})


@dataclass(frozen=True, slots=True)
class Opened:
    hop: Hop
    material: bytes = field(repr=False)


def open_hop(wire: bytes, receiver: str,
             links: Callable[[str, str], LinkKeyStore | None]) -> Opened:
    """Check and unpad one hop at ``receiver``. Raises RemoteProtocolError
    for a malformed container, AuthenticationFailed for a bad tag; the link
    key is spent either way (a forger gets one try per link key)."""
    try:
        doc = json.loads(wire)
        container = doc["ext_key_container"]
        (item,) = container["keys"]
        ext = item["extension"][EXT]
        tag = base64.b64decode(ext.pop("tag"), validate=True)
        (target,) = container["target_sae_ids"]
        hop = Hop(str(item["key_id"]), str(container["initiator_sae_id"]), str(target),
                  tuple(str(n) for n in ext["route"]), int(ext["hop"]),
                  (int(ext["share"][0]), int(ext["share"][1])))
        padded = base64.b64decode(item["value"], validate=True)
        link_key_id = str(ext["link_key_ID"])
        if hop.dst != receiver or ext["to_KME_ID"] != receiver or ext["from_KME_ID"] != hop.src:
            raise RemoteProtocolError("relay message for another node")
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error,
            json.JSONDecodeError) as exc:
        raise RemoteProtocolError(f"malformed ETSI 020 ext_keys container: {type(exc).__name__}") \
            from None
    store = links(hop.src, hop.dst)
    link_key = store.take(link_key_id) if store is not None else None
    if link_key is None:
        raise RemoteProtocolError("unknown or spent link key_ID")
    try:
        Poly1305.verify_tag(link_key.mac_key, _canonical(container), tag)
    except InvalidSignature:
        raise AuthenticationFailed(f"relay hop {hop.src}->{hop.dst}: Poly1305 tag mismatch") \
            from None
    if len(padded) != len(link_key.pad):
        raise RemoteProtocolError("padded key of the wrong length")
    return Opened(hop, _xor(padded, link_key.pad))


def split(material: bytes, k: int, rng: Callable[[int], bytes]) -> list[bytes]:
    """k XOR shares of ``material``: any k-1 of them are uniform and
    independent of it (one share per node-disjoint path)."""
    shares = [rng(len(material)) for _ in range(k - 1)]
    last = material
    for s in shares:
        last = _xor(last, s)
    return [*shares, last]


def join(shares: Sequence[bytes]) -> bytes:
    out = shares[0]
    for s in shares[1:]:
        out = _xor(out, s)
    return out
