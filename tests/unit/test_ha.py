"""High availability (gateway/daemon/ha.py): the role machine table-driven
with an injected clock, keepalived's notifications parsed, the node's epoch
parity, the ``ha:`` config section, and a daemon that is a pair node: a
standby holds no SAs and no session, MASTER starts a fresh session (a new
epoch of the node's parity), a stand-down removes every SA and keeps the
block policies (with a scripted session; tests/interop/test_ha_daemons.py
runs the real protocol)."""

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_pair import write_pair
from test_config import BASE, cfg_with, error, parse
from test_daemon import Clock, FakeSession, secret

from qkdgate.errors import LocalProtocolError
from qkdgate.gateway.cli import main as cli
from qkdgate.gateway.config.model import load_config
from qkdgate.gateway.daemon.control import ControlError, request
from qkdgate.gateway.daemon.daemon import Daemon
from qkdgate.gateway.daemon.ha import (
    TRANSITIONS,
    Action,
    HaNotifyError,
    HaRoleMachine,
    Notify,
    Role,
    node_epoch,
    parse_fifo_line,
    parse_notify,
)
from qkdgate.gateway.daemon.journal import Journal
from qkdgate.gateway.daemon.sdnotify import SdNotifier
from qkdgate.gateway.protocol.events import InstallInbound, InstallOutbound, SessionEstablished
from qkdgate.interfaces import Direction, PolicyAction
from qkdgate.testing.fakes import FakeQkdLink, RecordingIpsecBackend

A, S, F, X, T = Role.ACTIVE, Role.STANDBY, Role.FAULT, Role.STOPPED, Role.STARTING
M, B, FL, ST = Notify.MASTER, Notify.BACKUP, Notify.FAULT, Notify.STOP
UP, DOWN, NOP = Action.ACTIVATE, Action.DEACTIVATE, Action.NONE

# ---------------------------------------------------------------- the role machine

EXPECTED = {
    # role:    MASTER        BACKUP       FAULT        STOP
    T: ((A, UP), (S, NOP), (F, NOP), (X, NOP)),
    S: ((A, UP), (S, NOP), (F, NOP), (X, NOP)),
    F: ((A, UP), (S, NOP), (F, NOP), (X, NOP)),
    X: ((A, UP), (S, NOP), (F, NOP), (X, NOP)),
    A: ((A, NOP), (S, DOWN), (F, DOWN), (X, DOWN)),
}


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("notify", list(Notify), ids=lambda n: n.value)
def test_every_role_and_notification_has_one_transition(role, notify):
    want = EXPECTED[role][list(Notify).index(notify)]
    assert TRANSITIONS[(role, notify)] == want
    m = HaRoleMachine(1, Clock())
    m.role = role
    change = m.notify(notify)
    assert (change.before, change.after, change.action) == (role, *want)
    assert m.role is want[0]


def test_the_table_is_complete_and_only_master_activates():
    assert set(TRANSITIONS) == {(r, n) for r in Role for n in Notify}
    assert {k for k, (_, a) in TRANSITIONS.items() if a is UP} == \
        {(r, M) for r in Role if r is not A}
    # every way out of ACTIVE stands down: no role but ACTIVE may hold SAs
    assert all(a is DOWN for (r, n), (_, a) in TRANSITIONS.items() if r is A and n is not M)


def test_role_timing_and_counters_follow_the_injected_clock():
    clock = Clock()
    m = HaRoleMachine(2, clock)
    assert m.snapshot() == {"node": 2, "role": "starting", "since": 0.0, "activations": 0,
                            "last_notify": None}
    clock.t += 5
    m.notify(B)
    clock.t += 2
    assert m.snapshot()["since"] == 2.0 and not m.active
    m.notify(M)
    clock.t += 1
    m.notify(M)             # a repeated MASTER: no second activation, the role's age kept
    clock.t += 1
    snap = m.snapshot()
    assert snap == {"node": 2, "role": "active", "since": 2.0, "activations": 1,
                    "last_notify": "MASTER"}
    m.notify(FL)
    m.notify(M)
    assert m.activations == 2 and m.last.before is F and m.last.at == clock.t


def test_a_node_is_1_or_2():
    with pytest.raises(LocalProtocolError):
        HaRoleMachine(3, Clock())


# ---------------------------------------------------------------- keepalived's words

@pytest.mark.parametrize(("word", "want"), [("MASTER", M), ("backup", B), (" Fault\n", FL),
                                             ("STOP", ST)])
def test_notify_words(word, want):
    assert parse_notify(word) is want


@pytest.mark.parametrize("word", ["", "MASTERS", "INIT", "master;rm -rf /"])
def test_unknown_notify_words_are_the_callers_error(word):
    with pytest.raises(HaNotifyError):
        parse_notify(word)


@pytest.mark.parametrize(("line", "instance", "want"), [
    ('INSTANCE "VI_QKD" MASTER 100', None, M),
    ('INSTANCE "VI_QKD" BACKUP 50\n', "VI_QKD", B),
    ('INSTANCE "VI_QKD" FAULT 0', "VI_QKD", FL),
    ('INSTANCE "VI_QKD" STOP 0', None, ST),
    ('INSTANCE "VI_OTHER" MASTER 100', "VI_QKD", None),     # another instance
    ('GROUP "G1" MASTER', None, None),                        # a sync group: not a role
    ('INSTANCE "VI_QKD" MASTER_RX_LOWER_PRI 100', None, None),
    ('INSTANCE "VI_QKD" DELETED 0', None, None),
], ids=["master", "backup", "fault", "stop", "other-instance", "group", "rx-lower", "deleted"])
def test_fifo_lines(line, instance, want):
    assert parse_fifo_line(line, instance) is want


@pytest.mark.parametrize("line", ["", "MASTER", 'INSTANCE VI_QKD MASTER 100',
                                  'INSTANCE "VI_QKD" master 100', "x" * 500])
def test_garbage_fifo_lines_are_errors(line):
    with pytest.raises(HaNotifyError):
        parse_fifo_line(line, None)


# ---------------------------------------------------------------- epochs

def counter(*values):
    it = iter(values)
    return lambda: next(it)


@pytest.mark.parametrize(("node", "draws", "want"), [
    (1, (1700000001,), 1700000001), (1, (1700000002, 1700000003), 1700000003),
    (2, (1700000002,), 1700000002), (2, (1700000001, 1700000002), 1700000002),
    (2, (1700000001, 1700000005, 1700000006), 1700000006),   # the clock jumped in between
])
def test_node_epochs_have_the_nodes_parity(node, draws, want):
    assert node_epoch(counter(*draws), node) == want


def test_node_epoch_from_the_real_journal_grows_and_keeps_its_parity(tmp_path):
    now = [1_700_000_000.0]
    j = Journal.open(str(tmp_path / "state"), fsync=False, now=lambda: now[0])
    seen = []
    for _ in range(6):
        seen.append(node_epoch(j.next_local_epoch, 2))
        now[0] += 0.3
    assert all(e % 2 == 0 for e in seen) and seen == sorted(set(seen))
    j.close()
    j = Journal.open(str(tmp_path / "state"), fsync=False, now=lambda: now[0])    # a restart: still above
    assert node_epoch(j.next_local_epoch, 1) > seen[-1]
    j.close()


def test_node_epoch_gives_up_on_a_counter_that_never_changes_parity():
    with pytest.raises(LocalProtocolError):
        node_epoch(lambda: 8, 1)


# ---------------------------------------------------------------- config

HA_BASE = cfg_with(("  identity: identity.json\n",
                    "  identity: identity.json\n  listen: {address: 192.0.2.1}\n"))


def test_ha_section_parses_with_defaults():
    cfg = parse(HA_BASE + "ha: {node: 2}\n")
    assert (cfg.ha.node, cfg.ha.notify_fifo, cfg.ha.instance) == (2, None, None)
    cfg = parse(HA_BASE + "ha:\n  node: 1\n  notify_fifo: /run/qkdgate/ha.fifo\n"
                "  instance: VI_QKD\n")
    assert (cfg.ha.node, cfg.ha.notify_fifo, cfg.ha.instance) == \
        (1, "/run/qkdgate/ha.fifo", "VI_QKD")
    assert parse(BASE).ha is None


def test_the_two_nodes_reserve_inbound_spis_from_disjoint_halves():
    """The peer installs both nodes' outbound SAs under one destination, the
    VIP: equal SPIs from the two nodes would collide there (EEXIST). Each
    node's IPsec tunnels reserve from their own half of the 2^28 range, and
    the kernel is asked for exactly that range."""
    from qkdgate.gateway.daemon.build import ipsec_spec
    from qkdgate.testing.fakes import RecordingIpsecBackend
    from qkdgate.tunnels.ipsec_tunnel import SPI_RANGE, IpsecDriver, spi_range_for_node
    ranges = {}
    for node in (1, 2):
        cfg = parse(HA_BASE + f"ha: {{node: {node}}}\n")
        t = next(t for t in cfg.tunnels if t.ipsec is not None)
        spec = ipsec_spec(t, cfg.ha.node)
        assert spec.spi_range == spi_range_for_node(node)
        be = RecordingIpsecBackend()
        be._next_spi = 0                        # a kernel counting up from anywhere
        drv = IpsecDriver(spec, be)
        low, high = spec.spi_range
        spis = [drv.allocate_spi(frozenset()) for _ in range(3)]
        assert all(low <= x <= high for x in spis), [hex(x) for x in spis]
        assert (drv.spi_request().low, drv.spi_request().high) == (low, high)
        ranges[node] = range(low, high + 1)
    r1, r2 = ranges[1], ranges[2]
    assert r1.stop == r2.start and r1.start == SPI_RANGE[0] and r2.stop - 1 == SPI_RANGE[1]
    assert len(r1) == len(r2) == 2 ** 27
    cfg = parse(BASE)
    assert ipsec_spec(next(t for t in cfg.tunnels if t.ipsec), None).spi_range == SPI_RANGE
    with pytest.raises(ValueError, match="not 1 or 2"):
        spi_range_for_node(3)


HA_LINE = HA_BASE.count("\n") + 1      # the line of `ha:` appended to HA_BASE


@pytest.mark.parametrize(("tail", "path", "line", "what"), [
    ("ha: {node: 3}\n", "ha.node", 0, "from 1 to 2"),
    ("ha: {node: 1, nodes: 2}\n", "ha.nodes", 0, "unknown key"),
    ("ha: {}\n", "ha", 0, "node"),
    ("ha:\n  node: 1\n  instance: 'VI QKD'\n", "ha.instance", 2, "VRRP instance"),
], ids=["node-range", "unknown-key", "node-required", "instance-name"])
def test_ha_errors_name_path_and_line(tail, path, line, what):
    e = error(HA_BASE + tail)
    assert (e.path, e.line) == (path, HA_LINE + line)
    assert what in str(e)


def test_an_ha_node_must_listen_on_the_vip_not_everywhere():
    e = error(BASE + "ha: {node: 1}\n")        # listen defaults to 0.0.0.0
    assert e.path == "gateway.listen.address" and "virtual address" in e.reason
    e = error(BASE.replace("  identity: identity.json\n",
                           "  identity: identity.json\n  listen: {address: 0.0.0.0}\n")
              + "ha: {node: 1}\n")
    assert e.path == "gateway.listen.address" and e.line == 5


def test_an_ha_node_fails_over_ipsec_tunnels_only():
    text = cfg_with(("    type: ipsec\n",
                     "    type: macsec\n    macsec: {parent: eth1, peer_mac: 02:00:5e:10:00:02}\n"),
                    ("    ipsec:\n", "    rekey_unused:\n"), base=HA_BASE)
    text = text[:text.index("    rekey_unused:")] + text[text.index("    rekey:"):]
    assert parse(text).ha is None
    e = error(text + "ha: {node: 1}\n")
    assert (e.path, e.line) == ("tunnels[0].type", 24) and "IPsec tunnels only" in e.reason


# ---------------------------------------------------------------- the daemon as a pair node

def ha_daemon(tmp_path, node=1, fifo=None, **kw):
    """gw-a of the loopback pair as node ``node`` of an HA pair (its own
    journal), with the scripted session of test_daemon."""
    _, _, path, _ = write_pair(tmp_path)
    extra = f"ha:\n  node: {node}\n" + (f"  notify_fifo: {fifo}\n  instance: VI_QKD\n"
                                         if fifo else "")
    Path(path).write_text(Path(path).read_text() + extra)
    cfg = load_config(path)
    link = FakeQkdLink("SAE-A", "SAE-B")
    clock = Clock()
    backend = RecordingIpsecBackend(now=clock)
    events = []
    d = Daemon(cfg, config_path=path, ipsec_backend=backend,
               key_sources={"kme": link.source("SAE-A")}, identity=object(),
               peer_identities={"gw-b": [object()]}, session_factory=FakeSession, clock=clock,
               notifier=SdNotifier({}), **kw)
    d.subscribe(lambda e: events.append(e.to_dict()))
    return d, backend, events, clock


async def started(d):
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 5)
    return task


async def stopped(d, task):
    d.stop()
    await asyncio.wait_for(task, 5)


def establish(d, gen):
    driver = d.drivers["gw-b"]
    sess = secret()
    driver.session.events.extend([
        InstallInbound(10 * gen, gen, sess, "initiator", {"t1": 0xC0000900 + gen}),
        InstallOutbound(10 * gen + 1, gen, sess, "initiator", {"t1": 0xC0000700 + gen}),
        SessionEstablished(gen, sess.provenance, 0.01)])
    driver.pump()


def out_policies(be):
    return [p for p in be.policies.values() if p.direction is Direction.OUT]


async def test_a_standby_blocks_holds_no_sa_and_runs_no_session(tmp_path):
    d, be, events, _ = ha_daemon(tmp_path)
    task = await started(d)
    try:
        assert d.runners == {} and d.drivers == {}
        assert be.sas == {} and be.policies           # block policies installed
        assert all(p.action is PolicyAction.BLOCK for p in out_policies(be))
        st = d.status()
        assert st["ha"]["role"] == "starting" and st["peers"] == []
        assert st["tunnels"][0]["state"] == "blocked"
        with pytest.raises(ControlError, match="HA starting node: it runs no session"):
            d.rekey("t1")                               # an operator rekey: not here
        assert d.runners == {}
    finally:
        await stopped(d, task)


async def test_master_starts_a_fresh_session_and_standing_down_blocks(tmp_path):
    d, be, events, clock = ha_daemon(tmp_path, node=2)
    task = await started(d)
    try:
        d.ha_notify(Notify.MASTER)
        first = d.drivers["gw-b"].session
        assert first.kw["epoch"] % 2 == 0               # node 2: even epochs
        establish(d, 1)
        assert len(be.sas) == 2 and d.status()["tunnels"][0]["state"] == "up"
        assert d.ha_notify(Notify.MASTER)["activations"] == 1    # repeated: same session
        assert d.drivers["gw-b"].session is first

        snap = d.ha_notify(Notify.BACKUP)
        assert snap["role"] == "standby"
        assert be.sas == {} and d.runners == {}        # no SA survives the stand-down
        assert all(p.action is PolicyAction.BLOCK for p in out_policies(be))
        assert d.status()["tunnels"][0]["state"] == "blocked"
        assert first.kw["epoch"] and any(e["event"] == "tunnel_blocked" for e in events)

        clock.t += 1
        d.ha_notify(Notify.MASTER)                     # a failback: a new epoch, above
        second = d.drivers["gw-b"].session
        assert second is not first and second.kw["epoch"] > first.kw["epoch"]
        assert second.kw["epoch"] % 2 == 0
        # the generation floor comes from this node's journal: no number reused
        assert second.config.generation_floor >= 1
    finally:
        await stopped(d, task)


async def test_a_restarted_standby_drops_the_sas_a_previous_run_left(tmp_path):
    d, be, _, clock = ha_daemon(tmp_path)
    task = await started(d)
    d.ha_notify(Notify.MASTER)
    establish(d, 1)
    await stopped(d, task)
    assert len(be.sas) == 2                            # a plain exit keeps IPsec SAs
    d2 = Daemon(d.config, config_path=d.config_path, ipsec_backend=be,
                key_sources={"kme": FakeQkdLink("SAE-A", "SAE-B").source("SAE-A")},
                identity=object(), peer_identities={"gw-b": [object()]},
                session_factory=FakeSession, clock=clock, notifier=SdNotifier({}))
    task = await started(d2)
    try:
        assert be.sas == {} and d2.status()["tunnels"][0]["state"] == "blocked"
    finally:
        await stopped(d2, task)


async def test_ha_notify_cli_and_control_socket(tmp_path, capsys):
    d, be, _, _ = ha_daemon(tmp_path)
    task = await started(d)
    try:
        sock = d.control_path
        rc = await asyncio.to_thread(cli.main, ["ha-notify", "--socket", sock, "--json"])
        assert rc == 0 and json.loads(capsys.readouterr().out)["role"] == "starting"
        rc = await asyncio.to_thread(cli.main, ["ha-notify", "--socket", sock, "master"])
        assert rc == 0 and "node 1: active" in capsys.readouterr().out
        assert "gw-b" in d.runners
        rc = await asyncio.to_thread(cli.main, ["ha-notify", "-c", d.config_path, "FAULT"])
        assert rc == 0 and "node 1: fault" in capsys.readouterr().out and d.runners == {}
        with pytest.raises(SystemExit):
            cli.main(["ha-notify", "--socket", sock, "PROMOTE"])
        with pytest.raises(ControlError, match="unknown HA state"):
            await asyncio.to_thread(request, sock, "ha", state="PROMOTE")
        with pytest.raises(ControlError, match="MASTER, BACKUP"):
            await asyncio.to_thread(request, sock, "ha", state=1)
    finally:
        await stopped(d, task)


async def test_ha_verb_on_a_gateway_without_ha_is_refused(tmp_path):
    from test_daemon import make_daemon
    d, *_ = make_daemon(tmp_path)
    task = await started(d)
    try:
        with pytest.raises(ControlError, match="not configured as an HA node"):
            await asyncio.to_thread(request, d.control_path, "ha", state="MASTER")
        assert "ha" not in d.status() and "gw-b" in d.runners
    finally:
        await stopped(d, task)


async def wait_for(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_the_notify_fifo_is_followed_in_order(tmp_path, caplog):
    fifo = tmp_path / "ha.fifo"
    d, be, _, _ = ha_daemon(tmp_path, fifo=fifo)
    task = await started(d)
    try:
        assert fifo.is_fifo() and os.stat(fifo).st_mode & 0o777 == 0o600
        fd = os.open(fifo, os.O_WRONLY)
        try:
            # keepalived writes whole lines; several may arrive in one read
            os.write(fd, b'INSTANCE "VI_OTHER" MASTER 100\nINSTANCE "VI_QKD" MASTER 100\n')
            await wait_for(lambda: d.ha.active)
            assert "gw-b" in d.runners
            os.write(fd, b"garbage\nINSTANCE \"VI_QKD\" BACK")
            os.write(fd, b'UP 50\nINSTANCE "VI_QKD" MASTER 100\nINSTANCE "VI_QKD" FAULT 0\n')
            await wait_for(lambda: d.ha.role is Role.FAULT)
            assert d.runners == {} and be.sas == {}
            assert "not a keepalived notify line" in caplog.text
            # lines that arrive together: only the last state counts (the
            # MASTER between BACKUP and FAULT above is over: no second session)
            assert d.ha.activations == 1 and d.ha.last.before is Role.ACTIVE
        finally:
            os.close(fd)
    finally:
        await stopped(d, task)


async def test_lines_buffered_while_no_daemon_read_apply_only_the_last_state(tmp_path):
    fifo = tmp_path / "ha.fifo"
    os.mkfifo(fifo, 0o600)
    keep = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)     # keepalived holds it O_RDWR
    os.write(keep, b'INSTANCE "VI_QKD" MASTER 110\nINSTANCE "VI_QKD" FAULT 0\n'
                   b'INSTANCE "VI_QKD" BACKUP 110\n')   # written while our daemon was down
    d, be, _, _ = ha_daemon(tmp_path, fifo=fifo)
    task = await started(d)
    try:
        await wait_for(lambda: d.ha.role is Role.STANDBY)
        assert d.ha.activations == 0 and d.runners == {}     # the stale MASTER: no INIT
        os.write(keep, b'INSTANCE "VI_QKD" MASTER 110\n')
        await wait_for(lambda: d.ha.active)
        assert "gw-b" in d.runners
    finally:
        await stopped(d, task)
        os.close(keep)


def test_a_reload_that_changes_ha_needs_a_restart():
    from qkdgate.gateway.daemon.build import apply_live
    from qkdgate.tunnels.manager import TunnelManager
    one = parse(HA_BASE + "ha: {node: 1}\n")
    for other in (parse(HA_BASE + "ha: {node: 2}\n"), parse(HA_BASE)):
        applied, restart = apply_live(one, other, TunnelManager())
        assert "ha" in restart
    assert "ha" not in apply_live(one, one, TunnelManager())[1]
