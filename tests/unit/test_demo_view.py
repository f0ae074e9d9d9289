"""The demo's view and summary: policy actions derived from daemon events,
loss attributed to phases, and no key material in anything printed."""

from __future__ import annotations

import json

from qkdgate.gateway.demo.traffic import HEADER, MAGIC, loss_by_phase
from qkdgate.gateway.demo.view import Recorder, percentile, render
from qkdgate.gateway.telemetry.events import QkdError, RekeyDone, UnknownEvent
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.events import (
    KeyInputs,
    PolicyFallback,
    PolicyRecovered,
    SaInstalled,
    SaSwitched,
    TunnelBlocked,
)

SECRET = bytes(range(0xA0, 0xC0))
IDS = ["6f1c3a52-1b9e-4c51-9d36-54a1f1d0c0aa", "0c2b8e55-0d6b-4f3f-8a0a-2f14b9e6e7b1"]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def rekey_done(gen, qkd=True, latency=40.0):
    return RekeyDone("x", "lan", gen,
                     KeyInputs("ML-KEM-768", True, (IDS[gen % 2],) if qkd else ()), latency,
                     "timer")


def scripted_run(policy_block: bool):
    clk = Clock()
    rec = Recorder(clock=clk, wall=lambda: 1.7e9)
    clk.t += 30                     # setup time before traffic
    rec.start_clock()
    rec.eavesdropper("before")
    for g in (1, 2):
        clk.t += 3
        rec.on_event("gw-a", SaSwitched("lan", g, 0xC0DE0000 + g, KeyInputs(), g - 1))
        rec.on_event("gw-a", rekey_done(g, latency=10.0 * g))
        rec.on_event("gw-b", rekey_done(g, latency=20.0 * g))
    clk.t += 1
    rec.eavesdropper("on")
    rec.alarm("QKD link KME-A-KME-B", "QBER_ABOVE_THRESHOLD", 0.1403)
    rec.on_event("gw-a", QkdError("gw-b", "HTTP 503: QKD link in alarm", "KeyUnavailable"))
    clk.t += 2
    if policy_block:
        rec.on_event("gw-a", TunnelBlocked("lan", "hard lifetime passed without a new generation"))
        clk.t += 5
        rec.on_event("gw-a", SaSwitched("lan", 3, 0x1234, KeyInputs(), None))
    else:
        rec.on_event("gw-a", rekey_done(3, qkd=False))
        rec.on_event("gw-a", PolicyFallback("lan", "pqc-fallback", 3, "QKD unavailable"))
        clk.t += 5
        rec.on_event("gw-a", PolicyRecovered("lan", "pqc-fallback", 4))
    # events the view does not show are dropped
    rec.on_event("gw-a", SaInstalled("lan", 5, "in", 0xC0DE0005, KeyInputs(), False))
    return clk, rec


def test_pqc_fallback_actions_rekeys_and_latency_in_the_summary():
    clk, rec = scripted_run(policy_block=False)
    s = rec.summary(traffic={"sent": 1}, config={"policy": "pqc-fallback"}, kernel="6.1",
                    link=None, cleanup={"namespaces_left": []})
    assert s["setup_seconds"] == 30.0 and s["duration"] == clk.t - 130.0
    assert [(a["action"], a["gateway"], a["t"]) for a in s["policy_actions"]] == \
        [("fallback", "gw-a", 9.0), ("recovery", "gw-a", 14.0)]
    assert s["alarms"] == [{"t": 7.0, "source": "QKD link KME-A-KME-B",
                            "alarm": "QBER_ABOVE_THRESHOLD", "qber": 0.1403}]
    a = s["tunnels"]["gw-a/lan"]
    assert a["rekeys"] == 3 and a["last_generation"] == 3
    assert [g["qkd_key_ids"] for g in a["generations"]] == [[IDS[1]], [IDS[0]], []]
    assert [g["outbound_spi"] for g in a["generations"]] == ["0xc0de0001", "0xc0de0002", None]
    assert a["rekey_latency_ms"] == {"p50": 20.0, "p99": 40.0, "n": 3}
    assert s["rekeys"] == 5 and s["rekey_latency_ms"]["p99"] == 40.0
    assert [p for p, _t in rec.phases] == ["before eavesdropper", "eavesdropper",
                                            "eavesdropper, PQC fallback", "eavesdropper"]
    json.dumps(s)                              # the summary is plain JSON


def test_block_and_unblock_become_policy_actions():
    _clk, rec = scripted_run(policy_block=True)
    acts = [(a["action"], a["t"]) for a in rec.actions]
    assert acts == [("block", 9.0), ("recovery", 14.0)]
    # losses are counted per phase: the block is a phase of its own
    assert [(p, t - 130.0) for p, t in rec.phases] == [
        ("before eavesdropper", 0.0), ("eavesdropper", 7.0), ("eavesdropper, blocked", 9.0),
        ("eavesdropper", 14.0)]
    assert "hard lifetime" in rec.actions[0]["detail"]
    # a switch with no block before it is an ordinary rekey, not a recovery
    rec.on_event("gw-b", SaSwitched("lan", 3, 0x4321, KeyInputs(), 2))
    assert len(rec.actions) == 2


def test_view_and_summary_never_print_key_material():
    _clk, rec = scripted_run(policy_block=False)
    status = {"tunnels": [{"tunnel": "lan", "type": "ipsec", "state": "up", "generation": 3,
                           "fallback": True, "next_rekey_in": 1.5, "key": SECRET.hex(),
                           "generations": [
                               {"generation": 2, "active": False,
                                "sas": [{"direction": "in", "spi": "0x00000bad"}]},
                               {"generation": 3, "active": True, "key": SECRET.hex(),
                                "sas": [{"direction": "out", "spi": "0x1a2b3c4d", "reqid": 101,
                                         "key": SecretBytes(SECRET)},
                                        {"direction": "in", "spi": "0x5e6f7a8b"}]}],
                           "secret": SecretBytes(SECRET),
                           "inputs": {"kem": "ML-KEM-768", "x25519": True, "qkd_key_ids": IDS,
                                      "qkd_key": SECRET.hex()}}]}
    snap = {"t": 12.0, "policy": "pqc-fallback", "eavesdropper": True, "remaining": 48,
            "link": {"kmes": ["KME-A", "KME-B"], "stored_keys": 800, "qber": 0.14,
                     "secret_key_rate_bps": 0.0, "alarms": ["QBER_ABOVE_THRESHOLD"]},
            "gateways": {"gw-a": status, "gw-b": None},
            "rekeys": {"gw-a/lan": 3}, "latency": {"gw-a/lan": 42.0},
            "traffic": {"hA->hB": {"sent": 10, "received": 9, "lost": 1, "window": 2,
                                   "window_sent": 4, "window_received": 3}},
            "recent": rec.new_notes()}
    text = render(snap)
    summary = json.dumps(rec.summary(traffic={}, config={}, kernel="k", link=snap["link"],
                                     cleanup={}))
    for out in (text, summary, repr(rec.events)):
        assert SECRET.hex() not in out and SECRET.hex()[:16] not in out
        assert SECRET[:8].hex() not in out
    # what the view does show
    assert "gw-a lan (ipsec): UP FALLBACK(PQC-only) gen 3" in text
    assert "ML-KEM-768+X25519+QKD[6f1c3a52,0c2b8e55]" in text
    assert "QBER 14.0%" in text and "ALARM QBER_ABOVE_THRESHOLD" in text
    assert "POLICY gw-a/lan: fallback" in text and "last 42 ms" in text
    assert "SAs out 0x1a2b3c4d in 0x5e6f7a8b" in text and "0x00000bad" not in text
    ms = {"tunnel": "link", "type": "macsec", "state": "up", "generation": 3,
          "generations": [{"active": True, "sas": [{"direction": "out", "spi": "0x00000002"},
                                                   {"direction": "in", "spi": "0x00000003"}]}]}
    assert "SAs tx AN 2 rx AN 3" in render({"gateways": {"gw-a": {"tunnels": [ms]}}})
    assert rec.new_notes() == []               # each note is shown once


def test_loss_is_attributed_to_the_phase_it_happened_in():
    sent_at = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 9.0]
    received = {0, 1, 3, 5}
    phases = [("before eavesdropper", 1.0), ("eavesdropper", 2.0), ("blocked", 3.0)]
    out = loss_by_phase(sent_at, received, phases, end=5.0)
    # 0.5 predates the first phase; 9.0 was still in flight at the end
    assert out == {"before eavesdropper": {"sent": 2, "received": 1, "lost": 1},
                   "eavesdropper": {"sent": 2, "received": 1, "lost": 1},
                   "blocked": {"sent": 2, "received": 1, "lost": 1}}
    twice = loss_by_phase([1.0, 2.0, 3.0], {0, 2}, [("a", 0.0), ("b", 1.5), ("a", 2.5)])
    assert twice == {"a": {"sent": 2, "received": 2, "lost": 0},
                     "b": {"sent": 1, "received": 0, "lost": 1}}


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    xs = [float(i) for i in range(1, 101)]
    assert (percentile(xs, 50), percentile(xs, 99), percentile(xs, 100)) == (50.0, 99.0, 100.0)


def test_datagram_header_layout():
    d = HEADER.pack(MAGIC, 2, 7)
    assert len(d) == 21 and d.startswith(b"QKDGATE-DEMO") and d[12] == 2


def test_the_view_takes_typed_events_only():
    import pytest
    rec = Recorder()
    with pytest.raises(UnknownEvent):
        rec.on_event("gw-a", {"event": "tunnel_blocked", "tunnel": "lan", "reason": "x"})
    hook = rec.for_gateway("gw-b")
    hook(TunnelBlocked("lan", "policy"))
    assert rec.actions[0]["gateway"] == "gw-b" and rec.actions[0]["action"] == "block"
