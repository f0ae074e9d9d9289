"""The demo's kernel watch: a stream is "blocked" only while the kernel held
no key for its path (issue 10), read from SA dumps, never from when a
daemon event of some other tunnel reached the demo."""

from __future__ import annotations

import ipaddress

from qkdgate.gateway.demo.kernelwatch import (
    KernelWatch,
    Path,
    Reading,
    SaView,
    blocked_intervals,
    overlay_blocked,
    transition_intervals,
)
from qkdgate.gateway.demo.traffic import loss_by_phase

GA, GB = "192.0.2.1", "192.0.2.2"
A, B = ipaddress.ip_address(GA), ipaddress.ip_address(GB)


def esp(src, dst, spi):
    return SaView("esp", (src, dst, spi), True, 0)


def rd(t, *sas, enc=None):
    return Reading(t, t + 0.001, tuple(sas), enc)


def test_esp_path_needs_the_same_spi_at_both_ends():
    p = Path("hA->hB", "esp", "gA", "gB", GA, GB)
    assert p.keyed(rd(0, esp(A, B, 0x10)), rd(0, esp(A, B, 0x10)))
    # the receiver removed it (blocked first): nothing can be carried
    assert not p.keyed(rd(0, esp(A, B, 0x10)), rd(0, esp(A, B, 0x11)))
    # the other direction's SAs do not carry this stream
    assert not p.keyed(rd(0, esp(B, A, 0x10)), rd(0, esp(B, A, 0x10)))


def test_macsec_path_needs_active_tx_on_the_encoding_an_and_active_rx_on_it():
    p = Path("gA->gB (MACsec)", "macsec", "gA", "gB")
    def tx(an: int, act: bool = True) -> SaView:
        return SaView("tx", (an,), act, 0)

    def rx(an: int, act: bool = True) -> SaView:
        return SaView("rx", (an,), act, 0)

    assert p.keyed(rd(0, tx(1), enc=1), rd(0, rx(1)))
    assert not p.keyed(rd(0, tx(1), enc=1), rd(0, rx(0)))
    assert not p.keyed(rd(0, tx(1, False), enc=1), rd(0, rx(1)))
    assert not p.keyed(rd(0, tx(0), enc=1), rd(0, rx(1)))
    assert not p.keyed(rd(0, enc=None), rd(0, rx(1)))


def test_blocked_is_bracketed_by_observations_that_saw_no_key():
    obs = [(0.0, 0.01, True), (1.0, 1.01, False), (2.0, 2.01, False), (3.0, 3.01, True),
           (4.0, 4.01, False), (5.0, 5.01, True),   # one lone observation: no interval
           (6.0, 6.01, False), (7.0, 7.01, False)]  # still blocked at the end
    assert blocked_intervals(obs) == [(1.01, 2.0), (6.01, 7.0)]
    assert blocked_intervals([]) == []


def test_between_the_reads_around_a_change_the_state_is_unknown():
    obs = [(0.0, 0.01, True), (1.0, 1.01, False), (2.0, 2.01, False), (5.0, 6.5, True)]
    assert transition_intervals(obs) == [(0.0, 1.01), (2.0, 6.5)]
    run = [("eavesdropper", 0.0)]
    got = overlay_blocked(run, blocked_intervals(obs), transition_intervals(obs))
    assert got == [("eavesdropper, transition", 0.0), ("eavesdropper, blocked", 1.01),
                   ("eavesdropper, transition", 2.0), ("eavesdropper", 6.5)]


def test_each_stream_is_blocked_only_where_its_own_path_was():
    run = [("before eavesdropper", 0.0), ("eavesdropper", 6.0),
           ("eavesdropper, blocked", 15.0),            # gw-b/lan blocked: the run's clock
           ("after eavesdropper, blocked", 18.0), ("after eavesdropper", 21.0)]
    got = overlay_blocked(run, [(15.2, 20.5)])
    assert got == [("before eavesdropper", 0.0), ("eavesdropper", 6.0),
                   ("eavesdropper, blocked", 15.2), ("after eavesdropper, blocked", 18.0),
                   ("after eavesdropper", 20.5)]
    # a fallback phase stays a fallback phase unless the path was blocked
    fb = [("eavesdropper", 0.0), ("eavesdropper, PQC fallback", 2.0), ("after eavesdropper", 5.0)]
    assert overlay_blocked(fb, []) == fb
    assert overlay_blocked(fb, [(3.0, 4.0)])[2] == ("eavesdropper, blocked", 3.0)


def test_a_frame_carried_before_the_kernel_removed_its_sa_is_not_counted_blocked():
    """Issue 10: the run-wide clock turned "blocked" at 15.0 (another
    tunnel), the MACsec SAs went at 15.1; a frame sent at 15.05 arrived
    legitimately. One sent after the kernel had no key and still arriving
    is a leak and stays in the blocked phase."""
    run = [("eavesdropper", 0.0), ("eavesdropper, blocked", 15.0)]
    sent_at = [14.9, 15.05, 15.3, 15.4, 15.5]
    phases = overlay_blocked(run, blocked_intervals(
        [(15.0, 15.01, True), (15.12, 15.13, False), (15.6, 15.61, False)]))
    ok = loss_by_phase(sent_at, {0, 1}, phases)
    assert ok["eavesdropper, blocked"] == {"sent": 3, "received": 0, "lost": 3}
    leak = loss_by_phase(sent_at, {0, 1, 3}, phases)
    assert leak["eavesdropper, blocked"]["received"] == 1
    # the run-wide clock alone would have called the legitimate frame a leak
    assert loss_by_phase(sent_at, {0, 1}, run)["eavesdropper, blocked"]["received"] == 1


class FakeReader:
    def __init__(self, script):
        self.script, self.i = script, 0

    def read(self, clock):
        r = self.script[min(self.i, len(self.script) - 1)]
        self.i += 1
        return r

    def close(self):
        pass


def test_watch_records_paths_and_sa_lives_from_reads():
    a = [rd(0, esp(A, B, 7)), rd(1, esp(A, B, 7)), rd(2), rd(3)]
    b = [rd(0, esp(A, B, 7)), rd(1, esp(A, B, 7)), rd(2, esp(A, B, 7)), rd(3)]
    fakes = {"gA": FakeReader(a), "gB": FakeReader(b)}
    w = KernelWatch([Path("hA->hB", "esp", "gA", "gB", GA, GB)], reader=fakes.__getitem__)
    w._readers = {n: w.reader(n) for n in ("gA", "gB")}
    w.obs = {"hA->hB": []}
    for _ in range(4):
        w.poll_once()
    assert [k for _r, _p, k in w.obs["hA->hB"]] == [True, True, False, False]
    assert w.blocked("hA->hB") == [(2.001, 3)]
    gone = {(s["netns"], s["gone"]) for s in w.sa_report(0.0)}
    assert gone == {("gA", 2.001), ("gB", 3.001)}


def test_keyed_since_is_the_first_keyed_read_after_the_last_unkeyed_one():
    w = KernelWatch([])
    w.obs = {"p": [(0, 0.1, True), (1, 1.1, False), (2, 2.1, True), (3, 3.1, True)]}
    assert w.keyed_since("p") == 2.1
    w.obs["p"].append((4, 4.1, False))
    assert w.keyed_since("p") is None and w.keyed_since("nothing read") is None


def test_after_recovery_waits_for_every_path_keyed_long_enough_since_eve_left():
    from qkdgate.gateway.demo import run as dr
    opts = dr.DemoOptions(duration=28, eavesdrop_at=6, eavesdrop_for=12, after_recovery=7)
    d = dr.DemoRun(opts)
    d.watch = KernelWatch([Path("a", "esp", "gA", "gB", GA, GB), Path("m", "macsec", "gA", "gB")])
    d.watch.obs = {"a": [(10, 10.1, False), (20, 20.1, True)], "m": [(10, 10.1, False)]}
    assert not d.recovered(100.0)                    # the eavesdropper has not left yet
    d.eve_left_at = 18.0
    assert not d.recovered(30.0)                     # MACsec still unkeyed
    d.watch.obs["m"].append((25, 25.1, True))
    assert not d.recovered(32.0) and d.recovered(32.2)   # 7 s after the last path came back

    class Stream:
        name, rate = "m", 100

        def __init__(self, sent_at: list[float]) -> None:
            self.sent_at, self.sent = sent_at, len(sent_at)
    starved = [26 + i / 50 for i in range(400)]      # a starved sender: 50/s
    d.streams = [Stream(starved)]
    assert not d.recovered(32.2)                     # 7 s but only 350 datagrams since
    d.streams = [Stream(starved + [34 + i / 100 for i in range(400)])]
    assert d.recovered(38.0)
    d.watch.obs["m"].append((33, 33.1, False))
    assert not d.recovered(40.0)
    assert d.recovered(18.0 + dr.RECOVERY_TIMEOUT + 1)   # gives up; the summary shows it
    assert dr.DemoRun(dr.DemoOptions(duration=28)).recovered(0.0)   # without the option
