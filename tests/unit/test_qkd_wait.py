"""The QKD wait of an exchange is bounded by the sending keys' hard lifetime
when a tunnel may fall back to PQC-only (docs/faults.md "The QKD wait").

The fault matrix found pqc-fallback tunnels blocked for 2.8-2.9 s when the
KME timed out: the key source's own bound (timeout x (retries + 1) + slack)
outlasted the generation the rekey was meant to replace, so the PQC-only
generation the policy allows came after the hard lifetime."""

import asyncio
import time

from test_daemon import HangingSource, establish, feed, make_daemon, settle, started, stopped

from qkdgate.gateway.daemon.peer import QKD_WAIT_SHARE
from qkdgate.gateway.protocol.events import NeedQkdKeys

# write_pair: soft 3 s, hard 5 s, so hard_margin = min(1, (5 - 3) / 4) = 0.5 s
# and the tunnel stops sending on generation 1 at 4.5 s after it was keyed;
# the key source's own bound, timeout x (retries + 1) + slack, is 25 s.
HARD_ACT = 4.5


def hanging(d):
    d._key_sources = {"kme": HangingSource(d._key_sources["kme"])}


async def test_pqc_fallback_bounds_the_qkd_wait_by_the_sending_keys(tmp_path):
    d, be, link, events, clock = make_daemon(tmp_path, policy="pqc-fallback")
    hanging(d)
    task = await started(d)
    try:
        runner = d.runners["gw-b"]
        assert runner.qkd_wait_bound() is None          # nothing sending yet
        s = establish(d)
        assert runner.qkd_wait_bound() == HARD_ACT * QKD_WAIT_SHARE
        clock.t += 4.2                                  # 0.3 s before the tunnel acts
        assert abs(runner.qkd_wait_bound() - 0.3 * QKD_WAIT_SHARE) < 1e-9
        assert d.qkd.timeout("kme") == 25.0             # the source's own bound
        t0 = time.monotonic()
        feed(d, NeedQkdKeys(1, "master", "SAE-B", number=1))
        while not any(c[0] == "qkd_failed" for c in s.calls) and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        waited = time.monotonic() - t0
        (failed,) = [c for c in s.calls if c[0] == "qkd_failed"]
        assert failed[:3] == ("qkd_failed", 1, "KeySourceTimeout")
        assert "within 0.15 s" in failed[3] and "hard lifetime is near" in failed[3]
        # told in time: about 0.15 s, not the source's 25 s (loose: a loaded host)
        assert 0.14 <= waited < 5.0, waited
    finally:
        await stopped(d, task)


async def test_past_the_deadline_no_wait_and_once_blocked_the_sources_own(tmp_path):
    d, be, link, events, clock = make_daemon(tmp_path, policy="pqc-fallback")
    task = await started(d)
    try:
        runner = d.runners["gw-b"]
        establish(d)
        clock.t += 10.0           # the daemon slept past the hard lifetime
        assert runner.qkd_wait_bound() == 0.0
        d.wake()
        await settle()            # it woke: the tunnel is blocked, nothing sends
        assert d.status()["tunnels"][0]["state"] == "blocked"
        # the traffic is stopped already: a late QKD key is worth the source's
        # own wait (the next generation then bounds the one after it)
        assert runner.qkd_wait_bound() is None
    finally:
        await stopped(d, task)


async def test_a_policy_that_requires_qkd_waits_for_the_source_as_before(tmp_path):
    # A shorter wait would only turn a late key into no key: the tunnel
    # cannot run without QKD, so it waits the key source's own bound.
    d, be, link, events, clock = make_daemon(tmp_path, policy="hybrid-required")
    hanging(d)
    task = await started(d)
    try:
        runner = d.runners["gw-b"]
        s = establish(d)
        clock.t += 4.2
        assert runner.qkd_wait_bound() is None
        feed(d, NeedQkdKeys(1, "master", "SAE-B", number=1))
        await asyncio.sleep(0.5)
        assert not [c for c in s.calls if c[0] == "qkd_failed"]    # still waiting
    finally:
        await stopped(d, task)


async def test_a_fast_kme_is_not_cut_short(tmp_path):
    d, be, link, events, clock = make_daemon(tmp_path, policy="pqc-fallback")
    task = await started(d)
    try:
        s = establish(d)
        clock.t += 4.0
        feed(d, NeedQkdKeys(1, "master", "SAE-B", number=1))
        await settle()
        assert [c[0] for c in s.calls if c[0] in ("keys", "qkd_failed")] == ["keys"]
    finally:
        await stopped(d, task)


def test_the_daemon_logs_the_config_warnings_at_start(tmp_path, monkeypatch, caplog):
    import argparse
    import logging

    from test_daemon import write_pair

    from qkdgate.gateway.cli import run as run_cmd
    from qkdgate.gateway.daemon import daemon as daemon_mod

    # the key source's defaults (5 s x 4 attempts) against rekey 1 s, hard 5 s
    _, _, path, _ = write_pair(tmp_path, policy="hybrid-required", interval="1s",
                               soft="3s", hard="5s")

    class NoDaemon:                          # the test is about what is logged first
        def __init__(self, *a, **kw):
            pass

        def install_signal_handlers(self):
            pass

        async def run(self):
            pass

    from types import SimpleNamespace

    from qkdgate.gateway.telemetry import logs
    from qkdgate.keymix import secret
    monkeypatch.setattr(daemon_mod, "Daemon", NoDaemon)
    # keep pytest's own log capture and this process dumpable
    monkeypatch.setattr(logs, "configure_logging", lambda *a, **kw: None)
    monkeypatch.setattr(secret, "disable_core_dumps", lambda: SimpleNamespace(ok=True))
    args = argparse.Namespace(config=path, log_level=None, log_format=None,
                              teardown_on_exit=False)
    with caplog.at_level(logging.WARNING, logger="qkdgate.daemon"):
        assert run_cmd.run(args) == 0
    (line,) = [r.getMessage() for r in caplog.records if "may take" in r.getMessage()]
    assert line.startswith("config: tunnels[0].rekey: hybrid-required, and key source")
