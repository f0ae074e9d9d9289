"""qkdgate failsafe and the tunnel registry it reads, against fake kernels."""

from __future__ import annotations

import argparse
import ipaddress
import os
from typing import ClassVar

import pytest

from qkdgate.errors import ConfigError, TunnelError
from qkdgate.interfaces import (
    Direction,
    MacsecLinkSpec,
    MacsecSaSpec,
    PolicySpec,
    SaId,
    SaSpec,
    Selector,
    Template,
)
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend
from qkdgate.tunnels import failsafe
from qkdgate.tunnels.state import TunnelRegistry

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")


def test_registry_records_ranges_and_links_atomically(tmp_path):
    path = str(tmp_path / "run" / "tunnels.json")
    reg = TunnelRegistry(path)
    reg.add_reqid("gw", 0x10005)
    reg.add_reqid("gw", 0x10001)
    reg.add_reqid("gw", 0x10003)           # inside: no rewrite needed
    reg.add_macsec_link(None, "ms0")
    reg.add_macsec_link(None, "ms1")
    reg.remove_macsec_link(None, "ms0")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    data = TunnelRegistry.load(path)
    assert data["gw"]["ipsec_reqids"] == [0x10001, 0x10005]
    assert data[""]["macsec_links"] == ["ms1"]
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


@pytest.mark.parametrize("content", ["", "{", "[]", '{"version": 2, "namespaces": {}}',
                                     '{"version": 1, "namespaces": {"x": {"ipsec_reqids": [1]}}}'])
def test_damaged_registry_reads_as_empty(tmp_path, content):
    p = tmp_path / "t.json"
    p.write_text(content)
    assert TunnelRegistry.load(str(p)) == {}


class FakeXfrm(RecordingIpsecBackend):
    instances: ClassVar[dict] = {}

    def __init__(self, netns=None, verify=True):
        super().__init__()
        self.closed = False
        FakeXfrm.instances.setdefault(netns, self)
        self.__dict__.update(FakeXfrm.instances[netns].__dict__)

    def close(self):
        self.closed = True

    def remove_sas(self, sa_ids):
        out = []
        for s in sa_ids:
            try:
                self.remove_sa(s)
                out.append(None)
            except TunnelError as exc:
                out.append(exc)
        return out


class FakeMacsec(RecordingMacsecBackend):
    shared = RecordingMacsecBackend()

    def __init__(self, netns=None):
        self.__dict__ = FakeMacsec.shared.__dict__

    def tx_sas(self, link):
        return [self.query_tx_sa(link, an) for an in self._link("tx_sas", link).tx]

    def macsec_links(self):
        return list(self.links)

    def close(self):
        pass


@pytest.fixture
def kernel(monkeypatch):
    import qkdgate.tunnels.macsec as macsec_mod
    import qkdgate.tunnels.xfrm as xfrm_mod
    FakeXfrm.instances = {}
    FakeMacsec.shared = RecordingMacsecBackend()
    monkeypatch.setattr(xfrm_mod, "XfrmBackend", FakeXfrm)
    monkeypatch.setattr(macsec_mod, "MacsecBackend", FakeMacsec)
    x = FakeXfrm("gw")
    sel = Selector(ipaddress.ip_network("10.1.0.0/24"), ipaddress.ip_network("10.2.0.0/24"))
    x.install_policy(PolicySpec(sel, Direction.OUT, template=Template(A, B, reqid=0x10002)))
    for spi, reqid in ((0x1001, 0x10000), (0x1002, 0x10002), (0x1003, 7)):
        x.install_outbound(SaId(A, B, spi), SaSpec(SecretBytes(bytes(36)), reqid))
    ms = FakeMacsec()
    ms.create_link(MacsecLinkSpec("ms0", "eth0"))
    ms.create_link(MacsecLinkSpec("ms9", "eth1"))
    for link in ("ms0", "ms9"):
        ms.add_tx_sa(link, MacsecSaSpec(an=0, key=SecretBytes(bytes(32)), keyid=bytes(16)))
    return x, ms


def run(*argv: str) -> int:
    p = argparse.ArgumentParser()
    failsafe.add_arguments(p)
    return failsafe.run(p.parse_args(list(argv)))


def recorded(tmp_path) -> str:
    """A registry naming reqids 0x10000-0x1003F and link ms0 in netns gw."""
    state = str(tmp_path / "tunnels.json")
    reg = TunnelRegistry(state)
    reg.add_reqid("gw", 0x10000)
    reg.add_reqid("gw", 0x1003F)
    reg.add_macsec_link("gw", "ms0")
    return state


def test_failsafe_deletes_recorded_sas_keeps_policies_and_stops_macsec(kernel, tmp_path, capsys):
    x, ms = kernel
    state = recorded(tmp_path)
    assert run("--state", state) == 0
    assert {st.reqid for st in x.list_sas()} == {7}      # not ours: untouched
    assert len(x.list_policies()) == 1                   # blocking policy kept
    assert not ms.links["ms0"].tx[0].active and not ms.links["ms0"].up
    assert ms.links["ms9"].tx[0].active and ms.links["ms9"].up   # not recorded, no --all-macsec
    out = capsys.readouterr().out
    assert "deleted 2 SA(s)" in out and "1 policy(ies)" in out and "taken down" in out


@pytest.mark.parametrize("result, kept", [("success", True), ("signal", False),
                                          ("watchdog", False), ("exit-code", False), (None, False)])
def test_under_systemd_a_clean_exit_keeps_ipsec_sas_but_never_macsec(kernel, tmp_path,
                                                                     monkeypatch, result, kept):
    x, ms = kernel
    state = recorded(tmp_path)
    if result is None:
        monkeypatch.delenv("SERVICE_RESULT", raising=False)
    else:
        monkeypatch.setenv("SERVICE_RESULT", result)
    assert run("--state", state, "--systemd") == 0
    assert len(x.list_sas()) == (3 if kept else 1)
    assert len(x.list_policies()) == 1
    assert not ms.links["ms0"].tx[0].active and not ms.links["ms0"].up


def test_without_systemd_flag_success_is_ignored(kernel, tmp_path, monkeypatch):
    x, ms = kernel
    state = str(tmp_path / "tunnels.json")
    TunnelRegistry(state).add_reqid("gw", 0x10000)
    monkeypatch.setenv("SERVICE_RESULT", "success")
    assert run("--state", state) == 0
    assert {st.reqid for st in x.list_sas()} == {7, 0x10002}


def test_failsafe_sweeps_without_a_registry(kernel, tmp_path):
    x, ms = kernel
    missing = str(tmp_path / "none.json")
    assert run("--state", missing, "--netns", "gw", "--reqids", "1-100", "--all-macsec") == 0
    assert {st.reqid for st in x.list_sas()} == {0x10000, 0x10002}
    assert not any(l.up for l in ms.links.values())


def test_failsafe_dry_run_changes_nothing(kernel, tmp_path, capsys):
    x, ms = kernel
    assert run("--state", str(tmp_path / "n.json"), "--netns", "gw", "--reqids",
               "0x10000-0x1ffff", "--all-macsec", "--dry-run") == 0
    assert len(x.list_sas()) == 3 and all(l.up for l in ms.links.values())
    assert "would delete SA" in capsys.readouterr().out


def test_failsafe_reports_failure_but_goes_on(kernel, tmp_path, monkeypatch, capsys):
    x, ms = kernel

    def broken(self, link, an, active):
        raise TunnelError("set_tx_sa_active", 1)
    monkeypatch.setattr(FakeMacsec, "set_tx_sa_active", broken)
    assert run("--state", str(tmp_path / "n.json"), "--netns", "gw", "--all-macsec") == 1
    assert not any(l.up for l in ms.links.values())     # links still taken down
    assert "EPERM" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["abc", "5", "10-1", "0-5", "1-99999999999"])
def test_bad_reqid_range_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        run("--reqids", bad)


def test_nothing_recorded_nothing_asked_says_so(tmp_path, capsys):
    assert run("--state", str(tmp_path / "absent.json")) == 0
    assert "no tunnels recorded" in capsys.readouterr().err


def test_unwritable_registry_warns_but_does_not_break_installs(caplog):
    reg = TunnelRegistry("/proc/qkdgate-no-such-dir/tunnels.json")
    reg.add_reqid(None, 5)                      # must not raise
    assert "failsafe will not find" in caplog.text


def test_backends_record_in_the_registry_they_are_given_and_only_there(tmp_path):
    from qkdgate.tunnels.xfrm import XfrmBackend

    class Ok:
        def request(self, *a, **k):
            return []
    be = XfrmBackend(channel=Ok(), verify=False, registry=TunnelRegistry(str(tmp_path / "t.json")))
    be.install_inbound(SaId(A, B, 0x5000), SaSpec(SecretBytes(bytes(36)), reqid=0x20000))
    assert TunnelRegistry.load(str(tmp_path / "t.json"))[""]["ipsec_reqids"] == [0x20000, 0x20000]
    assert XfrmBackend(channel=Ok()).registry is None     # no process-global default


def test_the_daemon_builder_hands_one_registry_to_both_backends(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from qkdgate.gateway.config.model import TunnelType
    from qkdgate.gateway.daemon import build
    from qkdgate.tunnels import macsec, xfrm
    made = {}
    monkeypatch.setattr(xfrm, "XfrmBackend", lambda registry: made.setdefault("x", registry))
    monkeypatch.setattr(macsec, "MacsecBackend", lambda registry: made.setdefault("m", registry))
    cfg = SimpleNamespace(tunnels=[SimpleNamespace(type=TunnelType.IPSEC),
                                   SimpleNamespace(type=TunnelType.MACSEC)])
    build.backends(cfg, None, None, registry_path=str(tmp_path / "r.json"))
    assert made["x"] is made["m"] and made["x"].path == str(tmp_path / "r.json")


def test_failsafe_invalidates_recorded_wireguard_peers_after_any_exit(tmp_path, monkeypatch,
                                                                      capsys):
    """Issue 21: a PSK has no lifetime, so failsafe fails every recorded
    WireGuard peer closed (random PSK, session and allowed IPs gone), even
    after a clean exit; a peer that is gone already is no failure."""
    from test_consumer_wireguard import PUB_A, PUB_B, FakeWg

    from qkdgate.tunnels import wireguard as wg_mod
    kernels = {PUB_B: FakeWg(PUB_B, ["10.9.0.2/32"]), PUB_A: FakeWg(PUB_A, ["10.9.0.1/32"])}
    kernels[PUB_A].exists = False

    class Backend:
        def __init__(self, netns=None):
            self.netns = netns

        def peer(self, interface, public_key):
            return kernels[public_key].peer(interface, public_key)

        def block_peer(self, interface, public_key, psk):
            return kernels[public_key].block_peer(interface, public_key, psk)

        def close(self):
            pass

    monkeypatch.setattr(wg_mod, "WireguardBackend", Backend)
    monkeypatch.setenv("SERVICE_RESULT", "success")
    state = str(tmp_path / "tunnels.json")
    reg = TunnelRegistry(state)
    for pub in (PUB_B, PUB_A):
        reg.add_consumer("gw", {"kind": "wireguard", "interface": "wg0",
                                "peer": wg_mod.key_b64(pub)})
    before = kernels[PUB_B].psk
    assert run("--state", state, "--systemd", "--dry-run") == 0
    assert kernels[PUB_B].psk == before and kernels[PUB_B].session
    assert run("--state", state, "--systemd") == 0
    k = kernels[PUB_B]
    assert k.psk != before and len(k.psk) == 32 and k.allowed == () and not k.session
    out = capsys.readouterr().out
    assert "random preshared key, session removed, no allowed IPs" in out
    assert "already gone" in out


def test_failsafe_counts_an_unknown_consumer_kind_as_a_failure(tmp_path, capsys):
    state = str(tmp_path / "tunnels.json")
    TunnelRegistry(state).add_consumer(None, {"kind": "teleporter", "id": "x"})
    assert run("--state", state) == 1
    assert "unknown key consumer 'teleporter'" in capsys.readouterr().out


def test_an_ipsec_tunnel_reserves_its_spi_under_its_inbound_reqid():
    """The larval SA an SPI reservation leaves (until keyed, or 30 s if the
    exchange dies) carries the tunnel's inbound reqid, so failsafe's reqid
    sweep finds it (issue 10: a reqid-0 larval SA outlived failsafe)."""
    from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel
    from qkdgate.tunnels.timers import Lifetimes
    from qkdgate.tunnels.tunnel import TunnelPolicy
    be = RecordingIpsecBackend()
    spec = IpsecTunnelSpec("t1", A, B, (ipaddress.ip_network("10.1.0.0/24"),),
                           (ipaddress.ip_network("10.2.0.0/24"),), reqid_base=0x10000)
    t = ipsec_tunnel(spec, be, policy=TunnelPolicy.HYBRID_REQUIRED,
                     lifetimes=Lifetimes(soft_seconds=50, hard_seconds=60))
    t.setup(0.0)
    spi = t.allocate_spi()
    assert be.larval_reqids == {spi: 0x10000}


def test_xfrm_allocspi_carries_the_reqid_and_records_it_first(tmp_path):
    """XFRM_MSG_ALLOCSPI's xfrm_usersa_info.reqid is what the kernel gives
    the larval state (xfrm_alloc_userspi -> xfrm_find_acq); the registry
    names it before the kernel has it."""
    from qkdgate.tunnels import xfrm_msg as m
    from qkdgate.tunnels.xfrm import XfrmBackend
    state = str(tmp_path / "tunnels.json")
    sent = []

    class Channel:
        def request(self, op, msg_type, payload, flags=0, dump=False):
            sent.append((msg_type, payload, TunnelRegistry.load(state)))
            return [(m.XFRM_MSG_NEWSA, m.USERSA_INFO.pack({"id.spi": 0xC0000123}))]

        def close(self):
            pass

    be = XfrmBackend(channel=Channel(), registry=TunnelRegistry(state), verify=False)  # type: ignore[arg-type]
    assert be.allocate_spi(B, A, reqid=0x20000) == 0xC0000123
    ((msg_type, body, recorded_before),) = sent
    assert msg_type == m.XFRM_MSG_ALLOCSPI
    assert m.num(m.Layout("xfrm_userspi_info", m.xfrm_userspi_info).unpack(body),
                 "info.reqid") == 0x20000
    assert recorded_before[""]["ipsec_reqids"] == [0x20000, 0x20000]


def _imported_heavy(code: str) -> list[str]:
    import subprocess
    import sys

    code = ("import sys\n" + code +
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pyroute2', 'asyncio', 'aiohttp', 'ruamel', 'cryptography'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_failsafe_start_imports_no_pyroute2_nor_asyncio():
    """``qkdgate failsafe`` is ExecStopPost: systemd kills it at TimeoutStopSec
    and the dead daemon's SAs then stay. Everything its run imports (the CLI
    parser with every command module, the registry, both netlink backends)
    must stay light: ``pyroute2.netlink`` alone loads pyroute2's whole library
    (0.4-1.7 s on the host, tens of seconds in a starved TCG VM: issue 10)."""
    assert _imported_heavy("from qkdgate.gateway.cli.main import build_parser\n"
                           "build_parser()\n"
                           "import qkdgate.tunnels.failsafe, qkdgate.tunnels.state\n"
                           "import qkdgate.tunnels.xfrm, qkdgate.tunnels.macsec\n") == []


def test_daemon_start_imports_no_pyroute2():
    """The daemon's start races the unit's TimeoutStartSec=90s in the same
    starved VM; what it builds tunnels with (every backend and consumer,
    WireGuard included) must not load pyroute2's library either."""
    assert "pyroute2" not in _imported_heavy(
        "import qkdgate.gateway.cli.run, qkdgate.gateway.daemon.daemon\n"
        "import qkdgate.gateway.daemon.build, qkdgate.tunnels.wireguard\n")
