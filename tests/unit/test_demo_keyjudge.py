"""`qkdgate demo --key-service`: each served key is judged by its own
generation's validity (what the daemons did), not by the run's wall-clock
phase (issue 10 (b)). The scenario is the lab's: gw-a's generation 3 hits
its hard lifetime and the tunnel blocks while generation 4, the successor,
is being installed; APP-A's key is answered 0.1 s after ``tunnel_blocked``,
in the phase labelled "eavesdropper, blocked"."""

from __future__ import annotations

import json

from qkdgate.gateway.demo.keyapps import Answer, KeyApps, judge_served
from qkdgate.gateway.demo.view import Recorder
from qkdgate.tunnels.events import (
    KeyInputs,
    SaHardLifetimeBlock,
    SaInstalled,
    SaSwitched,
    TunnelBlocked,
)

HARD = 9.0
QKD = KeyInputs("ML-KEM-768", True, ("6f1c3a52-1b9e-4c51-9d36-54a1f1d0c0aa",))
NO_QKD = KeyInputs("ML-KEM-768", True, ())


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


def at(clk: Clock, rec: Recorder, t: float, gw: str, ev: object) -> None:
    clk.t = rec.t0 + t
    rec.on_event(gw, ev)       # type: ignore[arg-type]


def lab_run() -> tuple[Recorder, Clock]:
    """Run-clock times (seconds from the traffic's start)."""
    clk = Clock()
    rec = Recorder(clock=clk, wall=lambda: 1.7e9)
    # generation 1 came before the traffic started: its times are negative
    at(clk, rec, 0.0, "gw-b", SaInstalled("lan", 1, "in", 0xB001, QKD, False))
    at(clk, rec, 0.1, "gw-a", SaInstalled("lan", 1, "in", 0xA001, QKD, False))
    at(clk, rec, 0.2, "gw-a", SaSwitched("lan", 1, 0xB001, QKD, None))
    clk.t += 30.0
    rec.start_clock()
    rec.eavesdropper("before")
    at(clk, rec, 0.9, "gw-b", SaInstalled("lan", 3, "in", 0xB003, QKD, False))
    at(clk, rec, 0.95, "gw-a", SaInstalled("lan", 3, "in", 0xA003, QKD, False))
    at(clk, rec, 1.0, "gw-a", SaSwitched("lan", 3, 0xB003, QKD, 1))
    at(clk, rec, 1.2, "gw-b", SaSwitched("lan", 3, 0xA003, QKD, 1))
    rec.eavesdropper("on")
    at(clk, rec, 9.8, "gw-b", SaInstalled("lan", 4, "in", 0xB004, QKD, False))
    at(clk, rec, 9.9, "gw-a", SaInstalled("lan", 4, "in", 0xA004, QKD, False))
    at(clk, rec, 9.95, "gw-a", SaSwitched("lan", 4, 0xB004, QKD, 3))
    # gw-b's generation 3 reaches its hard lifetime while 4 is being installed there
    at(clk, rec, 10.0, "gw-b", SaHardLifetimeBlock("lan", "out", 0xA003, 3))
    at(clk, rec, 10.0, "gw-b", TunnelBlocked("lan", "hard lifetime of generation 3 reached"))
    at(clk, rec, 10.3, "gw-b", SaSwitched("lan", 4, 0xA004, QKD, None))   # unblocked
    # a generation without a QKD key (the eavesdropper's QBER alarm) ...
    at(clk, rec, 20.0, "gw-b", SaInstalled("lan", 5, "in", 0xB005, NO_QKD, False))
    at(clk, rec, 20.1, "gw-a", SaSwitched("lan", 5, 0xB005, NO_QKD, 4))
    # ... and gw-a's own block, which ends every generation it holds
    at(clk, rec, 25.0, "gw-a", TunnelBlocked("lan", "QKD unavailable"))
    return rec, clk


def served(apps: KeyApps, phase: str, gen: int, asked: float, t: float) -> None:
    apps._count("etsi014", phase, t, Answer(200, f"{gen:08d}-key", b"k" * 32, True,
                                            generation=gen),
                Answer(200, f"{gen:08d}-key", b"k" * 32, True, generation=gen),
                asked=asked, fetched=t + 0.3)


def summary(*keys: tuple[int, float, float]) -> tuple[dict, Recorder]:
    rec, _ = lab_run()
    apps = KeyApps(None, "a", "b", rec.phase_label, rec.elapsed)   # type: ignore[arg-type]
    for gen, asked, t in keys:
        served(apps, rec.phase_label(), gen, asked, t)
    ks = apps.summary()
    ks["generations"] = rec.generation_windows(HARD)
    return ks, rec


def test_generation_windows_follow_the_daemon_not_the_phase():
    rec, _ = lab_run()
    w = {(x["gateway"], x["generation"]): x for x in rec.generation_windows(HARD)}
    # before the traffic's clock started: negative, on the same clock
    assert (w[("gw-a", 1)]["switched"], w[("gw-a", 1)]["valid_until"]) == (-30.0, -21.0)
    assert w[("gw-a", 3)] == {
        "gateway": "gw-a", "tunnel": "lan", "generation": 3, "installed": 0.95, "switched": 1.0,
        "qkd": True, "hard_block": None, "valid_until": 10.0}          # its hard lifetime
    assert (w[("gw-b", 3)]["hard_block"], w[("gw-b", 3)]["valid_until"]) == (10.0, 10.0)
    assert w[("gw-a", 4)]["switched"] == 9.95 and w[("gw-a", 4)]["valid_until"] == 18.95
    assert w[("gw-b", 4)]["switched"] == 10.3 and w[("gw-b", 4)]["installed"] == 9.8
    assert w[("gw-a", 5)]["qkd"] is False and w[("gw-a", 5)]["valid_until"] == 25.0  # blocked


def test_the_phase_is_blocked_when_the_successor_serves():
    """What the old test judged by: any tunnel's block turns the phase."""
    _, clk = lab_run()
    rec = Recorder(clock=clk)
    rec.eavesdropper("on")
    rec.on_event("gw-b", TunnelBlocked("lan", "hard lifetime of generation 3 reached"))
    assert rec.phase_label() == "eavesdropper, blocked"


def test_a_key_from_the_valid_successor_0_1_s_after_tunnel_blocked_passes():
    ks, rec = summary((3, 5.0, 5.4), (4, 10.0, 10.1))
    assert ks["attempts"][1]["phase"] == "eavesdropper, blocked"
    assert ks["attempts"][1]["generation"] == 4 and ks["attempts"][1]["asked"] == 10.0
    assert judge_served(ks) == []
    json.dumps(ks)                        # the summary stays JSON


def test_a_key_from_the_expired_generation_fails():
    ks, _ = summary((3, 10.02, 10.15))
    bad = judge_served(ks)
    assert len(bad) == 1 and "gw-a/lan generation 3 was valid in [1.0, 10.0] s only" in bad[0]


def test_a_key_after_its_gateways_own_block_fails():
    ks, _ = summary((5, 25.1, 25.2))
    assert any("generation 5 was valid in [20.1, 25.0] s only" in b
               for b in judge_served(ks, qkd_required=False))


def test_a_key_decided_just_before_the_block_but_answered_after_passes():
    ks, _ = summary((3, 9.9, 10.3))
    assert judge_served(ks) == []


def test_a_key_before_its_generation_switched_or_without_qkd_fails():
    ks, _ = summary((4, 9.9, 9.92), (5, 20.5, 20.6), (7, 21.0, 21.1))
    bad = judge_served(ks)
    assert any("generation 4 was valid in [9.95, 18.95]" in b for b in bad), bad
    assert any("generation 5 had no QKD key" in b for b in bad), bad
    assert any("never installed generation 7" in b for b in bad), bad
    assert judge_served(ks, qkd_required=False) != []   # 4 and 7 still fail
    assert not any("QKD" in b for b in judge_served(ks, qkd_required=False))


def test_a_key_past_its_hard_lifetime_fails_even_without_a_block_event():
    ks, _ = summary((4, 19.5, 19.6))      # 4 switched at 9.95, hard 9 s: until 18.95
    assert judge_served(ks) and "valid in [9.95, 18.95] s only" in judge_served(ks)[0]


def test_gw_b_must_have_installed_the_generation_before_the_fetch():
    ks, _ = summary((4, 10.0, 10.1))
    ks["generations"] = [w for w in ks["generations"] if w["gateway"] != "gw-b"]
    assert "gw-b had not installed generation 4" in judge_served(ks)[0]


def test_served_keys_carry_no_secret():
    ks, _ = summary((4, 10.0, 10.1))
    text = json.dumps(ks)
    assert "kkkk" not in text and "a2tr" not in text     # the key, raw or base64


def test_events_before_the_traffic_move_to_the_run_clock():
    """The first generation's rekey came 30 s into setup; on the run's clock
    (time 0 = traffic starts) it is at -0.5 s, not at +29.5 s."""
    from qkdgate.gateway.telemetry.events import RekeyDone
    clk = Clock()
    rec = Recorder(clock=clk, wall=lambda: 1.7e9)
    clk.t += 29.5
    rec.on_event("gw-a", RekeyDone("gw-b", "lan", 1, QKD, 900.0, "initial"))
    clk.t += 0.5
    rec.start_clock()
    (row,) = rec.timeline()["rekeys"]
    assert row["t"] == -0.5 and rec.setup_seconds == 30.0
