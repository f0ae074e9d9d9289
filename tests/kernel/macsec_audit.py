"""Which key sealed a MACsec frame the receiver rejected: the evidence for
one Linux data-plane race, checked with scapy's MACsec layer.

The race (drivers/net/macsec.c, Linux 4.6 to at least 6.1 and mainline as
read on 2026-12-06): ``macsec_encrypt()`` takes the TX SA from
``tx_sc->sa[tx_sc->encoding_sa]`` (IEEE 802.1AE-2018 10.5.1), and later
``macsec_fill_sectag()`` reads ``tx_sc->encoding_sa`` *again* for the
SecTAG's AN (10.5.3). A frame being encrypted on one CPU while another
switches the encoding SA leaves with the new AN in its SecTAG, sealed with
the old SA's key and PN. The receiver verifies it with the new AN's SA,
the ICV fails, and the frame is counted InPktsNotValid (10.6.5) and
dropped. No ordering of netlink calls avoids it: whichever SA the switch
names, a frame can read the AN once on each side of it. docs/tunnels.md
("MACsec: one frame at the AN switch") has the patch that reads the AN
once.

So a rekey test cannot demand zero loss at a MACsec switch from this
kernel. It can demand that every loss there is *this* race and nothing of
ours: a frame on the wire that carries the new AN and opens with the
previous generation's key, whose plaintext is the very datagram the
receiver lost. A frame sealed with a key the receiver did not have yet, or
with no key we derived, is not explained, and the test fails.

This module needs no kernel: tests/unit/test_macsec_audit.py feeds it
frames scapy sealed the way the race does."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from kernel_traffic import PATTERN, in_window
from scapy.contrib.macsec import MACsec, MACsecSA
from scapy.layers.l2 import Ether

ETH_P_MACSEC = 0x88E5
TCI_SC = 0x20            # 802.1AE-2018 9.5: SCI present in the SecTAG
AN_MASK = 0x03


@dataclass(frozen=True)
class SecTag:
    an: int
    pn: int              # the lower 32 bits carried in the frame (9.8)
    sci: int


def sectag(frame: bytes) -> SecTag | None:
    """The SecTAG of an 802.1AE frame that carries its SCI, else None."""
    if len(frame) < 28 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_MACSEC:
        return None
    tci_an = frame[14]
    if not tci_an & TCI_SC:
        return None
    pn, sci = struct.unpack_from("!IQ", frame, 16)
    return SecTag(tci_an & AN_MASK, pn, sci)


@dataclass(frozen=True)
class SaKeys:
    """What scapy needs to open one SA's frames (public and secret parts)."""
    sak: bytes
    ssci: int | None = None
    salt: bytes | None = None

    @classmethod
    def of(cls, k: Any) -> SaKeys:
        """From keymix's MacsecKeys (docs/keymix.md 6.2)."""
        return cls(k.sak.reveal(), k.ssci, k.salt.reveal() if k.salt is not None else None)


def stream_seq(payload: bytes) -> int | None:
    """The sequence number of a kernel_traffic.Stream datagram in ``payload``."""
    at = payload.find(PATTERN)
    return None if at < 0 else struct.unpack_from("!Q", payload, at + len(PATTERN))[0]


@dataclass(frozen=True)
class Opened:
    """A frame one of our generations' keys opened."""
    seq: int             # the stream datagram inside
    wire_an: int         # the AN its SecTAG carries
    key_an: int          # the AN of the SA whose key sealed it
    generation: int
    pn: int


def open_frame(frame: bytes, sci: int, keys: SaKeys, seq_of: Callable[[bytes], int | None]
               ) -> int | None:
    """The stream sequence number inside ``frame`` if ``keys`` open it
    (ICV verified), else None."""
    xpn = keys.salt is not None
    sa = MACsecSA(sci=sci, an=0, pn=0, key=keys.sak, icvlen=16, encrypt=1, send_sci=1,
                  xpn_en=xpn, ssci=keys.ssci if xpn else None, salt=keys.salt)
    pkt = Ether(frame)
    if MACsec not in pkt:
        return None
    try:
        clear = sa.decrypt(pkt)
    except InvalidTag:
        return None
    return seq_of(bytes(clear[MACsec].payload))


def explain_lost(frames: Sequence[bytes], sci: int, lost: Sequence[int],
                 history: Sequence[tuple[int, int]], rotation_of: Callable[[int], int],
                 keys: Callable[[int, int], SaKeys], seq_of: Callable[[bytes], int | None],
                 reach: int = 48, wide: int = 2048) -> dict[int, Opened]:
    """For each lost datagram, the wire frame that carried it and the key that opens it.

    ``frames``: the capture; ``sci``: the sender's SC; ``history``: the
    sender's (generation, AN) per rotation, in order; ``rotation_of(seq)``:
    the index in ``history`` of the rotation whose window the datagram was
    sent in; ``keys(generation, an)``: that SA's keys. The sender's i-th
    frame carries about its i-th datagram (one sending thread; a frame or
    two of ARP/ND, and cross-CPU reordering on the wire bridge), so each
    lost datagram is looked for among the sender's frames ``reach`` either
    side of its number, opened with the keys of the rotations next to its
    own; one not found there is looked for ``wide`` either side (a capture
    that dropped frames, or many more ARP/ND frames beside a CPU hog, shifts
    the numbering). A lost datagram absent from the result was not found on
    the wire under any of those keys."""
    mine = [(f, t) for f in frames if (t := sectag(f)) is not None and t.sci == sci]

    def near(seq: int, r: int, candidates: list[tuple[int, int]]) -> Opened | None:
        for frame, tag in mine[max(0, seq - r):seq + r]:
            for gen, an in candidates:
                if open_frame(frame, sci, keys(gen, an), seq_of) == seq:
                    return Opened(seq, tag.an, an, gen, tag.pn)
        return None

    found: dict[int, Opened] = {}
    for seq in lost:
        k = rotation_of(seq)
        candidates = [history[i] for i in range(max(0, k - 2), min(len(history), k + 2))]
        opened = near(seq, reach, candidates) or near(seq, wide, candidates)
        if opened is not None:
            found[seq] = opened
    return found


def kernel_an_race(opened: Opened, history: Sequence[tuple[int, int]]) -> bool:
    """True when the frame is the race's signature: the new AN on the wire,
    the previous generation's key inside."""
    gens = [g for g, _ in history]
    i = gens.index(opened.generation)
    return i + 1 < len(history) and history[i + 1][1] == opened.wire_an != opened.key_an


def race_losses(frames: Sequence[bytes], sci: int, lost: Sequence[int], sent_at: Sequence[float],
                windows: list[tuple[float, float]], history: Sequence[tuple[int, int]],
                keys: Callable[[int, int], SaKeys]) -> tuple[list[int], dict[int, Opened]]:
    """Of the datagrams lost in rekey windows (``windows[i]`` the window of
    rotation ``history[i]``), those proven to be the race; and every frame
    found for them, for the test's report."""
    def rotation_of(seq: int) -> int:
        i = in_window(sent_at[seq], windows)
        if i is None:
            raise ValueError(f"datagram {seq} was not sent in a rekey window")
        return i
    opened = explain_lost(frames, sci, lost, history, rotation_of, keys, stream_seq)
    return [s for s, o in opened.items() if kernel_an_race(o, history)], opened
