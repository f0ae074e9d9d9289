"""The daemon's event handling, control, reload and exit behaviour, with a
scripted stand-in for the protocol session (the real protocol runs in
tests/interop/test_two_daemons.py)."""

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
from daemon_pair import write_pair

from qkdgate.errors import ConfigError
from qkdgate.gateway.cli import main as cli
from qkdgate.gateway.daemon.daemon import Daemon
from qkdgate.gateway.daemon.qkd import QkdFetcher
from qkdgate.gateway.daemon.sdnotify import SdNotifier
from qkdgate.gateway.protocol.events import (
    InstallInbound,
    InstallOutbound,
    NeedQkdKeys,
    ProtocolViolation,
    RetireGeneration,
    SessionEstablished,
)
from qkdgate.gateway.telemetry.events import DaemonStopping
from qkdgate.interfaces import Direction, PolicyAction
from qkdgate.keymix import labels
from qkdgate.keymix.combiner import Provenance, SessionSecret
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.fakes import FakeQkdLink, RecordingIpsecBackend

QKD_ID = "6f1c2a5e-0000-4000-8000-000000000001"


class FakeSession:
    """Records what the daemon tells it; the test queues events."""

    def __init__(self, config, **kw):
        self.config = config
        self.kw = kw
        self.events = []
        self.calls = []
        self.timer = None

    def receive_datagram(self, data, now):
        self.calls.append(("rx", data))

    def handle_timer(self, now):
        self.calls.append(("timer",))

    def get_timer(self):
        return self.timer

    def datagrams_to_send(self, now):
        return []

    def next_event(self):
        return self.events.pop(0) if self.events else None

    def initiate_rekey(self, now, reason):
        self.calls.append(("rekey", reason))

    def provide_qkd_keys(self, request_id, keys, now, sources=()):
        self.calls.append(("keys", request_id, [k.key_id for k in keys])
                          + ((tuple(sources),) if sources else ()))

    def qkd_failed(self, request_id, error, now):
        self.calls.append(("qkd_failed", request_id, type(error).__name__, str(error)))

    def installed(self, request_id, now):
        self.calls.append(("installed", request_id))

    def install_failed(self, request_id, error, now):
        self.calls.append(("install_failed", request_id, str(error)))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def secret(seed=b"\x42", qkd=(QKD_ID,)):
    return SessionSecret(SecretBytes(seed * labels.HASH_LEN), Provenance("ML-KEM-768", True, qkd))


@pytest.fixture
def env(tmp_path):
    cfg_a, _, path_a, _ = write_pair(tmp_path)
    link = FakeQkdLink("SAE-A", "SAE-B")
    clock = Clock()
    backend = RecordingIpsecBackend(now=clock)
    events = []
    d = Daemon(cfg_a, config_path=path_a, ipsec_backend=backend,
               key_sources={"kme": link.source("SAE-A")}, identity=object(),
               peer_identities={"gw-b": [object()]}, session_factory=FakeSession, clock=clock,
               notifier=SdNotifier({}))
    d.subscribe(lambda e: events.append(e.to_dict()))   # the wire form
    return d, backend, link, events, clock, tmp_path


async def started(d):
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 5)
    return task


async def stopped(d, task):
    d.stop()
    await asyncio.wait_for(task, 5)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0.01)


def feed(d, *events):
    driver = d.drivers["gw-b"]
    driver.session.events.extend(events)
    driver.pump()
    return driver.session


async def test_fail_closed_before_any_handshake_and_session_config(env):
    d, be, *_ = env
    task = await started(d)
    try:
        assert [op for op, _ in be.ops][:3] == ["install_policy"] * 3
        assert be.sas == {}
        scfg = d.drivers["gw-b"].session.config
        assert (scfg.local_name, scfg.peer_name, scfg.qkd_role) == ("gw-a", "gw-b", "master")
        assert scfg.tunnels[0].tunnel_id == "t1" and scfg.rekey_interval == 1.0
        assert not scfg.allow_pqc_only and scfg.x25519
        assert d.status()["tunnels"][0]["state"] == "blocked"
    finally:
        await stopped(d, task)


async def test_qkd_keys_fetched_journaled_and_failures_reported(env):
    d, be, link, events, clock, _ = env
    task = await started(d)
    try:
        s = feed(d, NeedQkdKeys(1, "master", "SAE-B", number=1, size_bits=256))
        await settle()
        (call,) = [c for c in s.calls if c[0] == "keys"]
        assert call[1] == 1 and len(call[2]) == 1
        assert d.journal.is_consumed(call[2][0])           # durable before use
        assert any(e["event"] == "qkd_keys" and e["key_ids"] == call[2] for e in events)
        link.down = True
        feed(d, NeedQkdKeys(2, "master", "SAE-B", number=1))
        await settle()
        assert ("qkd_failed", 2, "KeyUnavailable", "QKD link down") in s.calls
        assert events[-1]["event"] == "qkd_error"
    finally:
        await stopped(d, task)


class ReplayingSource:
    """A KME that hands out the same key twice (a bug or an attack)."""

    def __init__(self, healthy):
        from qkdgate.interfaces import QkdKey
        self.key = QkdKey(QKD_ID, SecretBytes(b"k" * 32))
        self.status = healthy.status

    async def get_new_keys(self, *a, **kw):
        return [self.key]

    async def close(self):
        pass


class HangingSource:
    def __init__(self, healthy):
        self.status = healthy.status

    async def get_new_keys(self, *a, **kw):
        await asyncio.sleep(3600)

    async def close(self):
        pass


async def test_a_reused_qkd_key_id_is_refused(env):
    d, *_ = env
    d._key_sources = {"kme": ReplayingSource(d._key_sources["kme"])}
    task = await started(d)
    try:
        s = feed(d, NeedQkdKeys(1, "master", "SAE-B", number=1))
        await settle()
        feed(d, NeedQkdKeys(2, "master", "SAE-B", number=1))
        await settle()
        assert [c[0] for c in s.calls if c[0] in ("keys", "qkd_failed")] == ["keys", "qkd_failed"]
        assert "already" in s.calls[-1][3] or "reuse" in s.calls[-1][3].lower()
    finally:
        await stopped(d, task)


async def test_kme_timeout_is_reported_as_key_source_timeout(env, monkeypatch):
    d, *_ = env
    d._key_sources = {"kme": HangingSource(d._key_sources["kme"])}
    monkeypatch.setattr(QkdFetcher, "timeout", lambda self, name: 0.05)
    task = await started(d)
    try:
        s = feed(d, NeedQkdKeys(1, "master", "SAE-B", number=1))
        await asyncio.sleep(0.2)
        assert s.calls[-1][:3] == ("qkd_failed", 1, "KeySourceTimeout")
    finally:
        await stopped(d, task)


async def test_install_events_drive_the_tunnel_and_are_acknowledged(env):
    d, be, link, events, clock, _ = env
    task = await started(d)
    try:
        sess = secret()
        s = feed(d, InstallInbound(5, 1, sess, "initiator", {"t1": 0xC0000999}))
        assert ("installed", 5) in s.calls and len(be.sas) == 1
        feed(d, InstallOutbound(6, 1, sess, "initiator", {"t1": 0xC0000777}),
             SessionEstablished(1, sess.provenance, 0.123))
        assert ("installed", 6) in s.calls and len(be.sas) == 2
        st = d.status()["tunnels"][0]
        assert st["state"] == "up" and st["generation"] == 1
        assert st["inputs"]["qkd_key_ids"] == [QKD_ID]
        done = [e for e in events if e["event"] == "rekey_done"]
        assert done[0]["latency_ms"] == 123.0 and done[0]["tunnel"] == "t1"
        assert done[0]["inputs"] == {"kem": "ML-KEM-768", "x25519": True, "qkd_key_ids": [QKD_ID]}
        # a generation without QKD under hybrid-required: refused, nothing installed
        feed(d, InstallInbound(7, 2, secret(b"\x01", qkd=()), "initiator", {"t1": 0xC0000555}))
        assert s.calls[-1][0] == "install_failed" and "requires qkd" in s.calls[-1][2]
        assert len(be.sas) == 2
        assert any(e["event"] == "install_failed" for e in events)
        feed(d, RetireGeneration(1))        # the active generation is never retired
        assert len(be.sas) == 2
    finally:
        await stopped(d, task)


async def test_soft_lifetime_triggers_rekey_and_hard_lifetime_blocks(env):
    d, be, link, events, clock, _ = env
    task = await started(d)
    try:
        sess = secret()
        s = feed(d, InstallInbound(1, 1, sess, "initiator", {"t1": 0xC0000999}),
                 InstallOutbound(2, 1, sess, "initiator", {"t1": 0xC0000777}))
        clock.t += 3.0                    # soft lifetime 3 s
        d.wake()
        await settle()
        assert ("rekey", "soft_lifetime") in s.calls
        clock.t += 2.0                    # hard lifetime 5 s, no new generation
        d.wake()
        await settle()
        assert be.sas == {}
        (out,) = [p for p in be.policies.values() if p.direction is Direction.OUT]
        assert out.action is PolicyAction.BLOCK
        assert d.status()["tunnels"][0]["state"] == "blocked"
        assert any(e["event"] == "tunnel_blocked" for e in events)
    finally:
        await stopped(d, task)


async def test_violations_are_counted_and_rate_limited_in_the_log(env, caplog):
    d, *_ = env
    task = await started(d)
    try:
        feed(d, *[ProtocolViolation("bad mac") for _ in range(50)])
        assert d.status()["peers"][0]["violations"] == 50
        assert sum("dropped message" in r.getMessage() for r in caplog.records) == 20
    finally:
        await stopped(d, task)


async def test_control_socket_status_and_rekey_via_cli(env, capsys):
    d, be, link, events, clock, tmp = env
    task = await started(d)
    try:
        sock = d.control_path
        assert os.stat(sock).st_mode & 0o777 == 0o600
        rc = await asyncio.to_thread(cli.main, ["status", "--socket", sock, "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 3 and out["gateway"] == "gw-a" and out["tunnels"][0]["tunnel"] == "t1"
        rc = await asyncio.to_thread(cli.main, ["rekey", "--socket", sock, "t1"])
        assert rc == 0 and ("rekey", "operator") in d.drivers["gw-b"].session.calls
        rc = await asyncio.to_thread(cli.main, ["rekey", "--socket", sock, "t9"])
        assert rc == 1 and "no tunnel named 't9'" in capsys.readouterr().err
        # the config file is enough to find the socket
        rc = await asyncio.to_thread(cli.main, ["status", "-c", d.config_path])
        assert rc == 3 and "t1" in capsys.readouterr().out
    finally:
        await stopped(d, task)


async def test_reload_validates_first_and_applies_live_parts(env):
    d, be, link, events, clock, tmp = env
    task = await started(d)
    path = Path(d.config_path)
    good = path.read_text()
    try:
        path.write_text(good.replace("reqid: 100", "reqid: banana"))
        with pytest.raises(ConfigError):
            d.do_reload()
        assert d.tunnels.get("t1").policy.value == "hybrid-required"
        assert events[-1]["event"] == "config_rejected"
        # SIGHUP path: a bad file is logged and changes nothing
        d.reload()
        await settle()
        assert d.config.tunnel("t1").ipsec.reqid == 100
        path.write_text(good.replace("policy: hybrid-required", "policy: qkd-mandatory")
                        .replace("soft_lifetime: 3s", "soft_lifetime: 4s"))
        res = d.do_reload()
        t = d.tunnels.get("t1")
        assert t.policy.value == "qkd-mandatory" and t.lifetimes.soft_seconds == 4.0
        assert res["needs_restart"] == [] and d.config.tunnel("t1").policy.value == "qkd-mandatory"
        path.write_text(good.replace(f"port: {d.config.peers[0].port}", "port: 9"))
        res = d.do_reload()
        assert "peers" in res["needs_restart"]
        assert d.status()["needs_restart"] == res["needs_restart"]
        assert d.config.peers[0].port != 9          # the running structure is kept
    finally:
        path.write_text(good)
        await stopped(d, task)


@pytest.mark.parametrize("teardown", [False, True])
async def test_exit_keeps_blocking_policies_unless_teardown(env, teardown):
    d, be, *_ = env
    d.teardown_on_exit = teardown
    task = await started(d)
    sess = secret()
    feed(d, InstallInbound(1, 1, sess, "initiator", {"t1": 0xC0000999}),
         InstallOutbound(2, 1, sess, "initiator", {"t1": 0xC0000777}))
    await stopped(d, task)
    if teardown:
        assert be.policies == {} and be.sas == {}
    else:
        assert len(be.policies) == 3 and len(be.sas) == 2
    assert not os.path.exists(d.control_path)


async def test_restart_adopts_the_previous_runs_sas(env):
    d, be, link, events, clock, tmp = env
    task = await started(d)
    sess = secret()
    feed(d, InstallInbound(1, 1, sess, "initiator", {"t1": 0xC0000999}),
         InstallOutbound(2, 1, sess, "initiator", {"t1": 0xC0000777}))
    await stopped(d, task)
    d2 = Daemon(d.config, config_path=d.config_path, ipsec_backend=be,
                key_sources={"kme": link.source("SAE-A")}, identity=object(),
                peer_identities={"gw-b": [object()]}, session_factory=FakeSession, clock=clock,
                notifier=SdNotifier({}))
    task = await started(d2)
    try:
        st = d2.status()["tunnels"][0]
        assert st["state"] == "up" and st["generations"][0]["adopted"]
        assert len(be.sas) == 2 and len(be.policies) == 3
        s2 = secret(b"\x07")
        feed(d2, InstallInbound(1, 2, s2, "initiator", {"t1": 0xC0000333}),
             InstallOutbound(2, 2, s2, "initiator", {"t1": 0xC0000222}))
        clock.t += 1.0
        d2.wake()
        await settle()
        assert sorted(sa.sa_id.spi for sa in be.sas.values()) == [0xC0000222, 0xC0000333]
    finally:
        await stopped(d2, task)


async def test_sd_notify_ready_status_and_stopping(env):
    d, be, link, events, clock, tmp = env
    path = str(tmp / "notify")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.setblocking(False)
    d.notifier = SdNotifier({"NOTIFY_SOCKET": path})
    task = await started(d)
    await stopped(d, task)
    msgs = []
    while True:
        try:
            msgs.append(rx.recv(4096).decode())
        except BlockingIOError:
            break
    rx.close()
    assert "READY=1" in msgs[0] and "STATUS=0/1 tunnels up, blocked: t1" in msgs[0]
    assert any("STOPPING=1" in m for m in msgs)


@pytest.mark.expect_logged_exception
async def test_subscribers_failures_are_isolated(env, caplog):
    d, be, link, events, clock, tmp = env
    got = []

    def broken(ev):
        raise RuntimeError("subscriber bug")

    async def slow(ev):
        await asyncio.sleep(0)
        got.append(ev.name)

    d.subscribe(broken)
    d.subscribe(slow)
    task = await started(d)
    await settle()
    await stopped(d, task)
    assert "daemon_started" in got and "daemon_started" in [e["event"] for e in events]
    assert any("subscriber" in r.getMessage() for r in caplog.records)


async def test_bad_startup_raises_a_clear_error(env):
    d, *_ = env
    d._identity = None        # now it reads the identity file...
    os.chmod(d.config.gateway.identity, 0o644)   # ...which others could read
    with pytest.raises(ConfigError, match="readable by group or others"):
        await asyncio.wait_for(d.run(), 5)


async def test_generations_start_above_the_journal_after_a_restart(env):
    d, be, link, events, clock, tmp = env
    task = await started(d)
    sess = secret()
    feed(d, InstallInbound(1, 7, sess, "initiator", {"t1": 0xC0000999}),
         InstallOutbound(2, 7, sess, "initiator", {"t1": 0xC0000777}),
         SessionEstablished(7, sess.provenance, 0.01))
    assert d.journal.committed_generation("t1") == 7
    await stopped(d, task)
    d2 = Daemon(d.config, config_path=d.config_path, ipsec_backend=be,
                key_sources={"kme": link.source("SAE-A")}, identity=object(),
                peer_identities={"gw-b": [object()]}, session_factory=FakeSession, clock=clock,
                notifier=SdNotifier({}))
    task = await started(d2)
    try:
        assert d2.drivers["gw-b"].session.config.generation_floor == 7
    finally:
        await stopped(d2, task)


async def test_prometheus_metrics_follow_daemon_events(env):
    import urllib.request

    from qkdgate.gateway.config.model import load_config
    d, be, link, events, clock, tmp = env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = Path(d.config_path)
    path.write_text(path.read_text().replace(
        "telemetry:\n", f"telemetry:\n  prometheus: {{enabled: true, port: {port}}}\n"))
    d.config = load_config(str(path))
    task = await started(d)
    try:
        sess = secret()
        feed(d, InstallInbound(1, 1, sess, "initiator", {"t1": 0xC0000999}),
             InstallOutbound(2, 1, sess, "initiator", {"t1": 0xC0000777}),
             SessionEstablished(1, sess.provenance, 0.05))
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read())
        text = body.decode()
        assert 'qkdgate_rekeys_total{tunnel="t1"} 1.0' in text
        assert 'qkdgate_tunnel_generation{tunnel="t1"} 1.0' in text
        assert 'qkd="yes"' in text
    finally:
        await stopped(d, task)


# ---------------------------------------------------------------- issue 17 finding 5

def make_daemon(tmp_path, policy="hybrid-required", **kw):
    cfg, _, path, _ = write_pair(tmp_path, policy=policy)
    link = FakeQkdLink("SAE-A", "SAE-B")
    clock = Clock()
    backend = RecordingIpsecBackend(now=clock)
    events = []
    args = dict(ipsec_backend=backend, key_sources={"kme": link.source("SAE-A")},
                identity=object(), peer_identities={"gw-b": [object()]},
                session_factory=FakeSession, clock=clock, notifier=SdNotifier({}))
    args.update(kw)
    d = Daemon(cfg, config_path=path, **args)
    d.subscribe(lambda e: events.append(e.to_dict()))   # the wire form
    return d, backend, link, events, clock


class BuggySource:
    """A key-source plug-in with a bug: it raises what no KeySource may."""

    def __init__(self, healthy):
        self.calls = 0
        self.status = healthy.status        # the KME itself is fine

    async def get_new_keys(self, *a, **kw):
        self.calls += 1
        raise ValueError("plug-in bug")

    async def close(self):
        pass


class FullDiskJournal:
    """The real journal, except that appending a key_ID fails with ENOSPC."""

    def __init__(self, journal):
        self.j = journal

    def __getattr__(self, name):
        return getattr(self.j, name)

    def reserve_qkd_keys(self, *a, **kw):
        import errno
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def establish(d, gen=1):
    sess = secret()
    return feed(d, InstallInbound(10 * gen, gen, sess, "initiator", {"t1": 0xC0000900 + gen}),
                InstallOutbound(10 * gen + 1, gen, sess, "initiator", {"t1": 0xC0000700 + gen}),
                SessionEstablished(gen, sess.provenance, 0.01))


@pytest.mark.expect_logged_exception
async def test_a_key_source_plugin_bug_fails_the_exchange_not_the_daemon(tmp_path):
    d, be, link, events, clock = make_daemon(tmp_path, policy="qkd-mandatory")
    src = d._key_sources["kme"] = BuggySource(d._key_sources["kme"])
    task = await started(d)
    try:
        s = establish(d)
        assert d.status()["tunnels"][0]["state"] == "up"
        feed(d, NeedQkdKeys(1, "master", "SAE-B", number=1))
        await settle()
        assert not task.done()                              # the daemon lives
        assert src.calls == 1
        (failed,) = [c for c in s.calls if c[0] == "qkd_failed"]
        assert failed[:3] == ("qkd_failed", 1, "KeySourceError")
        assert "ValueError" in failed[3] and "plug-in bug" not in failed[3]
        (err,) = [e for e in events if e["event"] == "qkd_error"]
        assert err["kind"] == "KeySourcePluginError"
        assert d.status()["tunnels"][0]["state"] == "blocked"   # qkd-mandatory: at once
        # the next exchange is served again (the plug-in may recover)
        feed(d, NeedQkdKeys(2, "master", "SAE-B", number=1))
        await settle()
        assert src.calls == 2 and not task.done()
    finally:
        await stopped(d, task)


async def test_a_journal_write_error_stops_qkd_but_not_the_daemon(tmp_path):
    from qkdgate.gateway.daemon.journal import Journal
    state = tmp_path / "state"
    state.mkdir()
    journal = FullDiskJournal(Journal.open(str(state)))
    d, be, link, events, clock = make_daemon(tmp_path, policy="qkd-mandatory", journal=journal)
    task = await started(d)
    try:
        s = establish(d)
        feed(d, NeedQkdKeys(1, "master", "SAE-B", number=1))
        await settle()
        assert not task.done()                              # the daemon lives
        assert [c[:3] for c in s.calls if c[0] in ("keys", "qkd_failed")] == \
            [("qkd_failed", 1, "KeyUnavailable")]          # the fetched keys are never used
        (jerr,) = [e for e in events if e["event"] == "journal_error"]
        assert "No space left on device" in jerr["error"]
        assert d.status()["tunnels"][0]["state"] == "blocked"   # qkd-mandatory: at once
        # no new QKD generations: the KME is not even asked again
        link.down = True       # would turn a KME call into KeyUnavailable "QKD link down"
        feed(d, NeedQkdKeys(2, "master", "SAE-B", number=1))
        await settle()
        assert s.calls[-1][:3] == ("qkd_failed", 2, "KeyUnavailable")
        assert "journal" in s.calls[-1][3] and "link down" not in s.calls[-1][3]
    finally:
        await stopped(d, task)
        journal.j.close()


# ---------------------------------------------------------------- issue 17 finding 6

def pqc_only_generation(d, gen=1):
    sess = secret(b"\x05", qkd=())
    return feed(d, InstallInbound(10 * gen, gen, sess, "initiator", {"t1": 0xC0000900 + gen}),
                InstallOutbound(10 * gen + 1, gen, sess, "initiator", {"t1": 0xC0000700 + gen}),
                SessionEstablished(gen, sess.provenance, 0.01))


def tighten(d, policy):
    path = Path(d.config_path)
    path.write_text(path.read_text().replace("policy: pqc-fallback", f"policy: {policy}"))
    return d.do_reload()


async def test_reload_to_hybrid_required_rekeys_a_pqc_only_generation_now(tmp_path):
    from qkdgate.gateway.protocol.events import FailureCause, RekeyFailed
    d, be, link, events, clock = make_daemon(tmp_path, policy="pqc-fallback")
    task = await started(d)
    try:
        s = pqc_only_generation(d)
        t = d.tunnels.get("t1")
        assert t.state == "up" and t.fallback
        res = tighten(d, "hybrid-required")
        assert "tunnel t1 policy hybrid-required" in res["applied"]
        assert ("rekey", "policy_tightened") in s.calls      # at once, not at the next rekey
        assert t.state == "up"                                # until that rekey fails
        feed(d, RekeyFailed(generation=2, reason="exchange timed out", cause=FailureCause.TIMEOUT))
        assert t.state == "blocked" and be.sas == {}
        assert "falls short" in t.last_error
    finally:
        await stopped(d, task)


async def test_reload_tightening_is_satisfied_by_a_hybrid_rekey(tmp_path):
    from qkdgate.gateway.protocol.events import FailureCause, RekeyFailed
    d, be, link, events, clock = make_daemon(tmp_path, policy="pqc-fallback")
    task = await started(d)
    try:
        s = pqc_only_generation(d)
        tighten(d, "hybrid-required")
        assert ("rekey", "policy_tightened") in s.calls
        establish(d, gen=2)                                   # with a QKD key
        t = d.tunnels.get("t1")
        assert t.state == "up" and t.active.number == 2
        feed(d, RekeyFailed(generation=3, reason="a later, unrelated failure",
                            cause=FailureCause.TIMEOUT))
        assert t.state == "up"                                # hard lifetime rules again
    finally:
        await stopped(d, task)


async def test_reload_to_qkd_mandatory_blocks_a_pqc_only_generation_at_once(tmp_path):
    d, be, link, events, clock = make_daemon(tmp_path, policy="pqc-fallback")
    task = await started(d)
    try:
        s = pqc_only_generation(d)
        tighten(d, "qkd-mandatory")
        t = d.tunnels.get("t1")
        assert t.state == "blocked" and be.sas == {}
        (out,) = [p for p in be.policies.values() if p.direction is Direction.OUT]
        assert out.action is PolicyAction.BLOCK
        assert ("rekey", "policy_tightened") in s.calls       # a QKD generation unblocks
        assert any(e["event"] == "tunnel_blocked" for e in events)
    finally:
        await stopped(d, task)


# ---------------------------------------------------------------- bugs fail closed

@pytest.mark.expect_logged_exception
async def test_a_session_bug_blocks_the_tunnels_and_a_fresh_session_takes_over(tmp_path):
    d, be, link, events, clock = make_daemon(tmp_path)
    task = await started(d)
    try:
        first = establish(d)
        assert d.status()["tunnels"][0]["state"] == "up"

        def broken(data, now):
            raise ZeroDivisionError("a bug in the core")

        first.receive_datagram = broken
        d.drivers["gw-b"].datagram_received(b"anything")
        fresh = d.drivers["gw-b"].session
        assert fresh is not first and isinstance(fresh, FakeSession)
        st = d.status()
        assert st["tunnels"][0]["state"] == "blocked" and be.sas == {}
        (out,) = [p for p in be.policies.values() if p.direction is Direction.OUT]
        assert out.action is PolicyAction.BLOCK
        assert st["peers"][0]["session_failures"] == 1
        (failed,) = [e for e in events if e["event"] == "session_failed"]
        assert failed == {"event": "session_failed", "peer": "gw-b",
                          "error": "ZeroDivisionError in receive_datagram", "blocked": ["t1"]}
        # the old session is never called again; the fresh one serves the peer
        d.drivers["gw-b"].datagram_received(b"next")
        assert ("rx", b"next") in fresh.calls and not task.done()
        establish(d, gen=2)
        assert d.status()["tunnels"][0]["state"] == "up"
    finally:
        await stopped(d, task)


@pytest.mark.expect_logged_exception
async def test_an_unknown_protocol_event_is_a_bug_not_a_debug_line(tmp_path):
    from dataclasses import dataclass

    from qkdgate.gateway.protocol.events import Event as ProtocolEvent

    @dataclass(frozen=True)
    class Renamed(ProtocolEvent):
        generation: int = 1

    d, be, link, events, clock = make_daemon(tmp_path)
    task = await started(d)
    try:
        first = d.drivers["gw-b"].session
        feed(d, Renamed())
        assert d.drivers["gw-b"].session is not first
        (failed,) = [e for e in events if e["event"] == "session_failed"]
        assert failed["error"] == "UnknownEvent in handling Renamed"
        assert not task.done()
    finally:
        await stopped(d, task)


@pytest.mark.expect_logged_exception
async def test_a_bug_in_a_tunnel_install_fails_the_peer_closed(tmp_path):
    # An unknown tunnel id from the protocol is a bug on our side (the
    # session names only configured tunnels): no half-installed generation.
    d, be, link, events, clock = make_daemon(tmp_path)
    task = await started(d)
    try:
        first = establish(d)
        assert d.drivers["gw-b"].session is first
        feed(d, InstallInbound(8, 3, secret(), "initiator", {"nope": 0xC0000444}))
        assert d.drivers["gw-b"].session is not first
        assert d.status()["tunnels"][0]["state"] == "blocked" and be.sas == {}
    finally:
        await stopped(d, task)


# ---------------------------------------------------------------- shutdown race

async def test_events_emitted_while_the_daemon_stops_are_still_delivered(env):
    """Found under load (test_two_daemons, json binding): an event emitted
    from a loop callback (a datagram, a timer) after stop() reached an async
    subscriber through a TaskGroup that had finished, which raised
    "TaskGroup ... is finished" into the emitter. Emitting on every loop turn
    until run() returns hits that window; every event must reach the
    subscriber and nothing may be logged as an error."""
    d = env[0]
    got = []

    async def subscriber(event):
        got.append(event.name)

    d.subscribe(subscriber)
    task = await started(d)
    loop = asyncio.get_running_loop()
    sent = 0

    def emit_again():
        nonlocal sent
        if not task.done():
            d.emit(DaemonStopping(False))
            sent += 1
            loop.call_soon(emit_again)

    d.stop()
    loop.call_soon(emit_again)
    await asyncio.wait_for(task, 5)
    await settle()
    assert sent >= 2 and got.count("daemon_stopping") == sent + 1, (sent, got)
