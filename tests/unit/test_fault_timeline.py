"""The fault matrix's "delivered after hard lifetime" counter (bench/ SaTimeline).

Fed synthetic kernel readings: it must count packets an SA accepted past its
hard lifetime (a deliberately expired SA), and must not count from a larval
SA (XFRM_MSG_ALLOCSPI's reservation) that the exchange keyed seconds later
under the same SPI -- the cause of the two non-zero cells in docs/faults.md.
"""

from __future__ import annotations

import sys
from ipaddress import ip_address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from fault_observe import SaTimeline

from qkdgate.gateway.demo.kernelwatch import Reading, SaView

GB = "10.0.0.2"
SRC, DST = ip_address("10.0.0.1"), ip_address(GB)
HARD = 12.0


def esp(spi: int, packets: int, *, added: int = 1000, keyed: bool = True) -> SaView:
    return SaView("esp", (SRC, DST, spi), True, packets, added, keyed)


def feed(tl: SaTimeline, t: float, *sas: SaView) -> None:
    tl.feed("gb", Reading(t, t + 0.01, tuple(sas)))


def test_counts_packets_on_an_sa_kept_past_its_hard_lifetime() -> None:
    tl = SaTimeline(HARD, {"gb": GB})
    for i in range(20):        # one SA, read every second, 10 packets a second
        feed(tl, float(i), esp(0xC0000001, 10 * i))
    # deadline = first read + 12 + 1.5 slack; gains after reads requested past it
    assert tl.after_hard(0, 30) == 10 * (19 - 14)


def test_larval_sa_keyed_later_does_not_start_the_clock() -> None:
    tl = SaTimeline(HARD, {"gb": GB})
    for i in range(8):         # the exchange waits 8 s for QKD keys holding its SPI
        feed(tl, float(i), esp(0xC0000002, 0, added=1000, keyed=False))
    for i in range(8, 20):        # keyed at 8 s, receives for 11 s: within its lifetime
        feed(tl, float(i), esp(0xC0000002, 10 * (i - 8), added=1008))
    assert tl.after_hard(0, 30) == 0


def test_new_add_time_under_the_same_spi_is_a_new_sa() -> None:
    tl = SaTimeline(HARD, {"gb": GB})
    for i in range(10):
        feed(tl, float(i), esp(0xC0000003, 0, added=1000))
    for i in range(10, 22):       # deleted and keyed again between two reads, 0 -> 0
        feed(tl, float(i), esp(0xC0000003, 10 * (i - 10), added=1010))
    assert tl.after_hard(0, 30) == 0


def test_outbound_sas_are_not_the_receivers() -> None:
    tl = SaTimeline(HARD, {"gb": "10.0.0.9"})
    for i in range(20):
        feed(tl, float(i), esp(0xC0000004, 10 * i))
    assert tl.after_hard(0, 30) == 0
