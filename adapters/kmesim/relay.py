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

Messages follow the ETSI GS QKD 020 draft "Interoperable Key Management
System API" (OpenAPI ``interop-kms.yaml``, Draft 0.5.1, work item
DGS/QKD-020_InteropKMS, forge.etsi.org/rep/qkd/gs020-interop-kms; quoted in
docs/qkd.md): a hop is an ``ext_key_container`` POSTed to
``/kmapi/v1/ext_keys`` (``keys[{key_id, value}]``, ``initiator_sae_id``,
``target_sae_ids``, ``ack_callback_url``, ``extension_mandatory``); the
answer comes later as an array of ack containers POSTed to the callback
(``key_ids[{key_id}]``, ``ack_status`` ``relayed``/``failed``/``voided``/
``key not present``, ``initiator_sae_id``, ``target_sae_id``, ``message``);
``/kmapi/v1/ext_keys/void`` discards keys not yet delivered. The draft moves
keys between KMSs *inside* a trusted node, in the clear under TLS;
qkdgate's part, labelled as such, is the mandatory vendor extension
``qkdgate_relay`` (route, hop, link key_ID, share, tag) and ``value``
holding the padded key instead of the key. A KME that does not implement
the extension must refuse the container (``extension_mandatory``), so the
padded value can never be taken for a key. The HTTPS transport is
:mod:`.interkme`; this module only builds and checks the messages.

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
# ETSI GS QKD 020 draft 0.5.1 (interop-kms.yaml) paths, all served by every node:
VERSIONS_PATH = "/kmapi/versions"             # GET: {"versions": [...]}
EXT_KEYS_PATH = "/kmapi/v1/ext_keys"          # POST ext_key_container -> 202 / 400 / 401
ACK_PATH = "/kmapi/v1/ext_keys/ack"           # POST [ack container] -> 200
VOID_PATH = "/kmapi/v1/ext_keys/void"         # POST void container -> 202, then an ack


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
    also: tuple[str, ...] = ()     # additional slave SAEs (ETSI 014 additional_slave_SAE_IDs)
    ack_url: str = ""              # the initiator KME's ack callback (ETSI 020 ack_callback_url)

    @property
    def src(self) -> str:
        return self.route[self.index]

    @property
    def dst(self) -> str:
        return self.route[self.index + 1]

    def next(self) -> Hop:
        return Hop(self.key_id, self.initiator_sae, self.target_sae, self.route, self.index + 1,
                   self.share, self.also, self.ack_url)


def seal(hop: Hop, link_key: LinkKey, material: bytes) -> bytes:
    """The wire form of one hop: the body of ``POST /kmapi/v1/ext_keys``
    (ETSI GS QKD 020 draft 0.5.1 ``ext_key_container``), JSON."""
    ext = {"route": list(hop.route), "hop": hop.index, "from_KME_ID": hop.src,
           "to_KME_ID": hop.dst, "link_key_ID": link_key.key_id, "share": list(hop.share),
           "otp": "xor", "mac": "poly1305-one-time"}
    container: dict[str, Any] = {
        "keys": [{"key_id": hop.key_id,
                  "value": base64.b64encode(_xor(material, link_key.pad)).decode("ascii")}],
        "initiator_sae_id": hop.initiator_sae,
        "target_sae_ids": [hop.target_sae, *hop.also],
        "ack_callback_url": hop.ack_url or f"https://{hop.route[0]}{ACK_PATH}",
        "extension_mandatory": [{EXT: ext}],
    }
    tag = Poly1305.generate_tag(link_key.mac_key, _canonical(container))
    ext["tag"] = base64.b64encode(tag).decode("ascii")
    return _canonical(container)


@dataclass(frozen=True, slots=True)
class Opened:
    hop: Hop
    material: bytes = field(repr=False)


# What a neighbour KME's garbage can raise while one of its containers is
# parsed: each becomes one specific RemoteProtocolError (its fault, not ours).
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, binascii.Error,
              json.JSONDecodeError, RecursionError)


def parse_hop(wire: bytes) -> Hop:
    """Where a relay container says it goes; RemoteProtocolError if it is
    not a well-formed one. Checks nothing cryptographic and spends nothing."""
    return _parse(wire)[0]


def _parse(wire: bytes) -> tuple[Hop, dict[str, Any], bytes, bytes, str]:
    """(hop, container without the tag, tag, padded value, link key_ID);
    RemoteProtocolError if it is not a well-formed relay container."""
    try:
        container = json.loads(wire)
        if not isinstance(container, dict):
            raise TypeError("not an object")
        (item,) = container["keys"]
        (mandatory,) = container["extension_mandatory"]
        ext = mandatory[EXT]
        if set(mandatory) != {EXT}:
            raise ValueError("unsupported mandatory extension")
        tag = base64.b64decode(ext.pop("tag"), validate=True)
        target, *also = container["target_sae_ids"]
        hop = Hop(str(item["key_id"]), str(container["initiator_sae_id"]), str(target),
                  tuple(str(n) for n in ext["route"]), int(ext["hop"]),
                  (int(ext["share"][0]), int(ext["share"][1])), tuple(str(a) for a in also),
                  str(container["ack_callback_url"]))
        padded = base64.b64decode(item["value"], validate=True)
        link_key_id = str(ext["link_key_ID"])
        if not 0 <= hop.index < len(hop.route) - 1 or not 1 <= hop.share[0] <= hop.share[1]:
            raise ValueError("hop or share out of range")
        if ext["to_KME_ID"] != hop.dst or ext["from_KME_ID"] != hop.src:
            raise ValueError("from/to do not match the route")
    except _MALFORMED as exc:
        raise RemoteProtocolError(f"malformed ETSI 020 ext_key_container: {type(exc).__name__}") \
            from None
    return hop, container, tag, padded, link_key_id


def open_hop(wire: bytes, receiver: str,
             links: Callable[[str, str], LinkKeyStore | None], *,
             sender: str | None = None) -> Opened:
    """Check and unpad one hop at ``receiver``. Raises RemoteProtocolError
    for a malformed container, one for another node, or a replayed one (its
    link key is spent); AuthenticationFailed when ``sender`` (the KME the
    TLS client certificate names) is not the hop's sender, or for a bad tag.
    The link key is spent by a bad tag (a forger gets one try per link
    key), never by a container refused before the tag check."""
    hop, container, tag, padded, link_key_id = _parse(wire)
    if hop.dst != receiver:
        raise RemoteProtocolError("relay message for another node")
    if sender is not None and sender != hop.src:
        raise AuthenticationFailed(f"relay hop from {hop.src} sent by {sender}")
    store = links(hop.src, hop.dst)
    link_key = store.take(link_key_id) if store is not None else None
    if link_key is None:
        raise RemoteProtocolError("unknown or spent link key_ID (replayed container?)")
    try:
        Poly1305.verify_tag(link_key.mac_key, _canonical(container), tag)
    except InvalidSignature:
        raise AuthenticationFailed(f"relay hop {hop.src}->{hop.dst}: Poly1305 tag mismatch") \
            from None
    if len(padded) != len(link_key.pad):
        raise RemoteProtocolError("padded key of the wrong length")
    return Opened(hop, _xor(padded, link_key.pad))


# ETSI GS QKD 020 draft 0.5.1: ack_status values of the ack container.
RELAYED, FAILED, VOIDED, NOT_PRESENT = "relayed", "failed", "voided", "key not present"
ACK_STATUSES = (RELAYED, FAILED, VOIDED, NOT_PRESENT, "failed to void")


@dataclass(frozen=True, slots=True)
class Ack:
    key_ids: tuple[str, ...]
    status: str
    initiator_sae: str
    target_sae: str
    message: str = ""


def ack_body(acks: Sequence[Ack]) -> bytes:
    """The body of ``POST /kmapi/v1/ext_keys/ack``: an array of ack containers."""
    return _canonical([{"key_ids": [{"key_id": k} for k in a.key_ids], "ack_status": a.status,
                        "initiator_sae_id": a.initiator_sae, "target_sae_id": a.target_sae,
                        "message": a.message} for a in acks])   # type: ignore[arg-type]


def parse_acks(wire: bytes) -> list[Ack]:
    try:
        doc = json.loads(wire)
        items = doc if isinstance(doc, list) else [doc]
        out = [Ack(tuple(str(k["key_id"]) for k in a["key_ids"]), str(a["ack_status"]),
                   str(a["initiator_sae_id"]), str(a["target_sae_id"]), str(a.get("message", "")))
               for a in items]
        if not out or any(a.status not in ACK_STATUSES or not a.key_ids for a in out):
            raise ValueError("bad ack_status or no key_ids")
    except _MALFORMED as exc:
        raise RemoteProtocolError(f"malformed ETSI 020 ack container: {type(exc).__name__}") \
            from None
    return out


def void_body(key_ids: Sequence[str], initiator_sae: str, targets: Sequence[str],
              ack_url: str) -> bytes:
    """The body of ``POST /kmapi/v1/ext_keys/void``."""
    return _canonical({"key_ids": [{"key_id": k} for k in key_ids],
                       "initiator_sae_id": initiator_sae, "target_sae_ids": list(targets),
                       "ack_callback_url": ack_url})


def parse_void(wire: bytes) -> tuple[tuple[str, ...], str, tuple[str, ...], str]:
    try:
        doc = json.loads(wire)
        ids = tuple(str(k["key_id"]) for k in doc["key_ids"])
        out = (ids, str(doc["initiator_sae_id"]),
               tuple(str(t) for t in doc["target_sae_ids"]), str(doc["ack_callback_url"]))
        if not ids:
            raise ValueError("no key_ids")
    except _MALFORMED as exc:
        raise RemoteProtocolError(f"malformed ETSI 020 void container: {type(exc).__name__}") \
            from None
    return out


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
