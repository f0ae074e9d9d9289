"""`qkdgate demo` on this host: arguments, generated configurations, the
"kernel lacks ESP -> lab VM" decision, the VM hand-off, cleanup bookkeeping.
The real run (namespaces, kernel SAs) is tests/kernel/test_demo.py."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest

from qkdgate.errors import ConfigError, QkdgateError
from qkdgate.gateway.cli import main as cli
from qkdgate.gateway.config.model import load_config
from qkdgate.gateway.demo import command as demo
from qkdgate.gateway.demo import net as dn
from qkdgate.gateway.demo.config import (
    KmeEndpoint,
    Timers,
    control_socket,
    kme_port,
    write_configs,
    write_identities,
)


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["demo", *argv])


# ------------------------------------------------------------------ arguments

def test_defaults_and_policy_alias():
    a = parse()
    demo.check_args(a)
    assert (a.duration, a.eavesdrop_at, a.policy, a.where, a.macsec, a.qkd) == \
        (None, None, "pqc-fallback", "auto", False, "014")
    assert demo.options(parse("--qkd", "004")).qkd == "004"
    o = demo.options(parse("--policy", "block", "--duration", "60", "--eavesdrop-at", "20"))
    assert (o.policy, o.duration, o.eavesdrop_at, o.eavesdrop_for) == ("block", 60.0, 20.0, 15.0)


@pytest.mark.parametrize("argv, msg", [
    (("--duration", "0"), "--duration must be positive"),
    (("--duration", "10", "--eavesdrop-at", "10"), "not within --duration"),
    (("--eavesdrop-at", "-1"), "must not be negative"),
    (("--eve-fraction", "1.5"), "--eve-fraction"),
    (("--rekey-interval", "0.2"), "at least 1 s"),
    (("--rate", "0"), "--rate"),
    (("--view-interval", "0.1"), "--view-interval"),
    (("--after-recovery", "-1"), "--after-recovery must not be negative"),
], ids=["duration", "eve-after-end", "eve-negative", "fraction", "interval", "rate", "view",
        "after-recovery"])
def test_bad_arguments_are_usage_errors(argv, msg, capsys):
    with pytest.raises(ConfigError, match=msg):
        demo.check_args(parse(*argv))
    # through the CLI: exit 2 with one line, before any namespace is touched
    assert cli.main(["demo", *argv]) == 2
    assert msg.split()[0] in capsys.readouterr().err


def test_vm_argv_carries_every_option_and_forces_the_host_path():
    a = parse("--duration", "60", "--eavesdrop-at", "20", "--eavesdrop-for", "5", "--policy",
              "block", "--macsec", "--rate", "50", "--rekey-interval", "2", "--json", "/x/out.json",
              "--after-recovery", "7", "--qkd", "004-json")
    inner = parse(*demo.vm_argv(a, "/lab/out/summary.json", "/lab/out/demo.log"))
    assert inner.where == "host"                       # never re-enters a VM
    assert inner.json == "/lab/out/summary.json" and inner.log_file == "/lab/out/demo.log"
    for f in ("duration", "eavesdrop_at", "eavesdrop_for", "policy", "macsec", "rate",
              "rekey_interval", "eve_fraction", "view_interval", "after_recovery", "qkd"):
        assert getattr(inner, f) == getattr(a, f), f


def test_unknown_qkd_interface_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--qkd", "005"])
    assert exc.value.code == 2 and "--qkd" in capsys.readouterr().err


# ------------------------------------------------------- generated configuration

@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    from qkdgate.adapters.kmesim.pki import ensure_pki
    folder = tmp_path_factory.mktemp("demo")
    pki = ensure_pki(folder / "kme", ["KME-A", "KME-B"], ["SAE-A", "SAE-B"], ())
    write_identities(folder)
    eps = [KmeEndpoint(f"https://127.0.0.1:{port}", kme, str(pki.sae(sae).cert),
                       str(pki.sae(sae).key), str(pki.ca))
           for port, kme, sae in ((40001, "KME-A", "SAE-A"), (40002, "KME-B", "SAE-B"))]
    return folder, eps


@pytest.mark.parametrize("policy, want", [("pqc-fallback", "pqc-fallback"),
                                          ("block", "hybrid-required")])
@pytest.mark.parametrize("macsec", [False, True], ids=["ipsec", "ipsec+macsec"])
def test_generated_configs_pass_check_config(demo_files, policy, want, macsec, capsys):
    folder, eps = demo_files
    macs = ("02:00:00:00:0a:01", "02:00:00:00:0b:01") if macsec else None
    pa, pb = write_configs(folder, *eps, policy=policy, timers=Timers.for_interval(3),
                           macsec_macs=macs)
    assert str(folder) in pa and Path(pa).stat().st_mode & 0o077 == 0
    for path in (pa, pb):
        assert cli.main(["check-config", "--check-files", path]) == 0, capsys.readouterr()
    a, b = load_config(pa), load_config(pb)
    assert [t.policy.value for t in a.tunnels] == [want] * (2 if macsec else 1)
    assert a.peers[0].qkd.role.value == "master" and b.peers[0].qkd.role.value == "slave"
    assert str(a.peers[0].address) == dn.GB and str(b.peers[0].address) == dn.GA
    t = a.tunnel("lan")
    assert t.rekey.interval == 3 and t.rekey.hard_lifetime == 9
    if macsec:   # each side names the other's SCI (its m0 MAC)
        assert a.tunnel("link").macsec.peer_mac.lower() == macs[1]
        assert b.tunnel("link").macsec.peer_mac.lower() == macs[0]


@pytest.mark.parametrize("qkd, kind, binding", [("014", "etsi014", None),
                                               ("004", "etsi004", "etsi-binary"),
                                               ("004-json", "etsi004", "json")])
def test_qkd_option_picks_the_key_source_kind_and_binding(demo_files, qkd, kind, binding,
                                                          capsys):
    folder, eps = demo_files
    pa, pb = write_configs(folder, *eps, policy="block", timers=Timers.for_interval(3), qkd=qkd)
    for path in (pa, pb):
        assert cli.main(["check-config", "--check-files", path]) == 0, capsys.readouterr()
    for cfg, ep in zip((load_config(pa), load_config(pb)), eps, strict=True):
        (ks,) = cfg.key_sources
        assert (ks.kind, ks.binding, ks.url, ks.kme_id) == (kind, binding, ep.url, ep.kme_id)
        assert cfg.peers[0].qkd.key_source == ks.name
        assert cfg.gateway.control_socket == str(control_socket(folder, cfg.gateway.name))


def test_kme_relay_targets_the_binary_004_port_only_for_004():
    https, binary = {"KME-A": 1001, "KME-B": 1002}, {"KME-A": 2001, "KME-B": 2002}
    assert [kme_port(q, "KME-B", https, binary) for q in ("014", "004", "004-json")] == \
        [1002, 2002, 1002]


@pytest.mark.parametrize("qkd", ["004", "004-json"])
async def test_generated_004_configs_key_both_gateways_from_kme_sim(tmp_path, qkd):
    """The demo's --qkd 004 / 004-json configurations, built as the demo
    builds them (the simulator's port for that binding, its PKI), give both
    gateways the same keys from the real KME simulator over that binding;
    the daemons on such configurations: tests/interop/test_two_daemons.py,
    the whole demo: tests/kernel/test_demo.py."""
    from qkdgate.adapters.kmesim.server import KmeSimulator
    from qkdgate.gateway.daemon import build
    write_identities(tmp_path)
    async with KmeSimulator.start(tmp_path / "kme", prefill=100) as sim:
        eps = []
        for sae in ("SAE-A", "SAE-B"):
            c = sim.credentials(sae)
            port = kme_port(qkd, c.kme_id, sim.ports, sim.ports004)
            eps.append(KmeEndpoint(f"https://127.0.0.1:{port}", c.kme_id, str(c.cert),
                                   str(c.key), str(c.ca)))
        pa, pb = write_configs(tmp_path, *eps, policy="block", timers=Timers.for_interval(3),
                               qkd=qkd)
        ca, cb = load_config(pa), load_config(pb)
        (a,), (b,) = build.key_sources(ca).values(), build.key_sources(cb).values()
        qa, qb = ca.peers[0].qkd, cb.peers[0].qkd
        try:
            await b.connect(qb.peer_sae_id)
            keys = await a.get_new_keys(qa.peer_sae_id, 2, qa.key_size)
            got = await b.get_keys_by_id(qb.peer_sae_id, [k.key_id for k in keys])
            assert [k.key_id for k in got] == [k.key_id for k in keys]
            assert all(x.key == y.key for x, y in zip(got, keys, strict=True))
            assert sim.qkd004.streams, "no ETSI 004 key stream at the simulator"
        finally:
            await a.close()
            await b.close()


def test_rekey_timers_stay_valid_for_any_allowed_interval():
    for iv in (1, 2, 3, 7.5, 60):
        t = Timers.for_interval(iv)
        assert t.interval < t.soft < t.hard and t.interval + t.grace < t.hard


# -------------------------------------------------------- kernel probe / decision

def test_probe_reads_what_the_kernel_refused_and_always_removes_its_namespace():
    calls = []

    def runner(cmd, stdin):
        calls.append(cmd)
        if "aead" in cmd:
            return subprocess.CompletedProcess(cmd, 2, "", "Error: Requested AEAD algorithm not found.")
        if "macsec" in cmd:
            return subprocess.CompletedProcess(cmd, 2, "", "Error: Unknown device type.")
        return subprocess.CompletedProcess(cmd, 0, "", "")     # cbc(aes) ESP, veth: fine
    ks = demo.probe_kernel(runner, tag="t1")
    assert (ks.esp, ks.gcm, ks.macsec) == (True, False, False)
    assert ks.missing(macsec=False) == ["rfc4106(gcm(aes))"]
    assert ks.missing(macsec=True) == ["rfc4106(gcm(aes))", "MACsec"]
    assert any("AEAD algorithm not found" in p for p in ks.problems)
    assert calls[0] == ["ip", "netns", "add", "qdt1-probe"]
    assert calls[-1] == ["ip", "netns", "del", "qdt1-probe"]

    def exploding(cmd, stdin):
        calls.append(cmd)
        if "xfrm" in cmd:
            raise OSError("boom")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    calls.clear()
    with pytest.raises(OSError):
        demo.probe_kernel(exploding, tag="t2")
    assert calls[-1] == ["ip", "netns", "del", "qdt2-probe"]


def test_decide_host_vm_or_a_clear_error():
    full = demo.KernelSupport(esp=True, gcm=True, macsec=True)
    nomacsec = demo.KernelSupport(esp=True, gcm=True, macsec=False, problems=["MACsec: Unknown"])
    none = demo.KernelSupport(problems=["ESP with rfc4106(gcm(aes)): not found"])
    assert demo.decide("auto", full, True, in_vm=False, kernel="6.1")[0] == "host"
    assert demo.decide("auto", nomacsec, False, in_vm=False, kernel="6.1")[0] == "host"
    where, line = demo.decide("auto", nomacsec, True, in_vm=False, kernel="6.18.4")
    assert where == "vm" and "this kernel (6.18.4) lacks MACsec" in line and "lab VM" in line
    where, line = demo.decide("auto", none, False, in_vm=False, kernel="6.18.4")
    assert where == "vm" and "lacks ESP" in line
    assert demo.decide("vm", full, False, in_vm=False, kernel="6.1")[0] == "vm"
    # --where host, or already inside the VM: never (again) a VM, say what is missing
    for kw in ({"where": "host", "in_vm": False}, {"where": "auto", "in_vm": True}):
        with pytest.raises(QkdgateError, match=r"lacks ESP .*not found.*esp4"):
            demo.decide(kw["where"], none, False, in_vm=kw["in_vm"], kernel="6.1")
    assert demo.in_lab_vm({"LAB_KVER": "6.1.0-56-amd64"}) and not demo.in_lab_vm({})


def test_run_in_vm_hands_over_and_copies_the_summary_back(tmp_path, monkeypatch):
    root = tmp_path / "src"
    (root / "lab").mkdir(parents=True)
    for f in ("setup.sh", "run.sh"):
        (root / "lab" / f).write_text("#!/bin/bash\n")
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "lab-home"))
    a = parse("--duration", "60", "--eavesdrop-at", "20", "--json", str(tmp_path / "out.json"))
    seen = []

    def call(cmd, env=None, cwd=None):
        seen.append((cmd, env))
        if cmd[1].endswith("run.sh"):
            inner = parse(*cmd[cmd.index("demo") + 1:])
            assert inner.where == "host" and env["LAB_OUT"] == str(Path(inner.json).parent)
            assert int(env["LAB_TIMEOUT"]) > 60
            Path(inner.json).write_text(json.dumps({"rekeys": 7}))
        return 0
    assert demo.run_in_vm(a, root=root, call=call) == 0
    assert [c[0][1] for c in seen] == [str(root / "lab/setup.sh"), str(root / "lab/run.sh")]
    assert json.loads((tmp_path / "out.json").read_text()) == {"rekeys": 7}

    # the lab cannot be set up: an error that says so, no VM started
    seen.clear()
    with pytest.raises(QkdgateError, match="could not be set up"):
        demo.run_in_vm(a, root=root, call=lambda cmd, **kw: seen.append(cmd) or 126)
    assert len(seen) == 1
    # no lab in this installation: say exactly what is missing
    with pytest.raises(QkdgateError, match=r"lab/setup.sh, lab/run.sh.*not in"):
        demo.run_in_vm(a, root=tmp_path / "nowhere", call=call)


# ------------------------------------------------------------ cleanup bookkeeping

def test_cleanup_runs_in_reverse_once_and_survives_failures():
    order = []
    c = dn.Cleanup()
    c.push("first", lambda: order.append(1))
    c.push("interrupted", lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    c.push("broken", lambda: 1 / 0)
    c.push("last", lambda: order.append(3))
    assert c.pending() == ["first", "interrupted", "broken", "last"]
    # a second Ctrl-C inside cleanup stops it; the next run (atexit) finishes the rest
    with pytest.raises(KeyboardInterrupt):
        c.run()
    assert order == [3] and c.pending() == ["first"]
    errors = c.run()
    assert order == [3, 1] and len(errors) == 1 and errors[0].startswith("broken:")
    assert c.run() == errors and order == [3, 1]      # second run (atexit) does nothing new
    assert c.done and c.pending() == []


class FakeIp:
    """Records ip commands; fails the n-th ``ip -batch`` to model a half-built topology."""

    def __init__(self, fail_batch: int | None = None) -> None:
        self.cmds: list[tuple[list[str], str]] = []
        self.batches = 0
        self.fail_batch = fail_batch

    def __call__(self, cmd, stdin=""):
        self.cmds.append((list(cmd), stdin))
        if "-batch" in cmd:
            self.batches += 1
            if self.batches == self.fail_batch:
                return subprocess.CompletedProcess(cmd, 1, "", "RTNETLINK answers: File exists")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_half_built_topology_removes_exactly_what_it_created(monkeypatch):
    monkeypatch.setattr(dn, "write_sysctl", lambda *a: None)
    ip = FakeIp(fail_batch=3)                 # two namespaces exist, the third fails
    net = dn.DemoNet(tag="abc123", runner=ip)
    assert set(net.ns.values()) == {f"qdabc123-{r}" for r in dn.DemoNet.ROLES}
    with pytest.raises(QkdgateError, match="File exists"):
        net.up()
    assert net.created == ["qdabc123-hA", "qdabc123-gA"]
    assert net.down() == []
    dels = [c for c, _ in ip.cmds if c[:3] == ["ip", "netns", "del"]]
    assert dels == [["ip", "netns", "del", "qdabc123-gA"], ["ip", "netns", "del", "qdabc123-hA"]]
    assert net.created == [] and net.down() == []     # idempotent


def test_full_topology_then_down_deletes_every_namespace(monkeypatch):
    monkeypatch.setattr(dn, "write_sysctl", lambda *a: None)
    ip = FakeIp()
    net = dn.DemoNet(runner=ip).up()
    assert len(net.tag) == 6 and net.created == list(net.ns.values())
    script = "\n".join(s for _c, s in ip.cmds)
    assert "type bridge" in script and f"addr add {dn.HA}/24 dev a0" in script
    net.down()
    assert sorted(c[3] for c, _ in ip.cmds if c[:3] == ["ip", "netns", "del"]) == sorted(net.ns.values())


def test_leftover_listing_matches_only_demo_namespaces(tmp_path, monkeypatch):
    # other tools' names (the kernel tests' q<tag>hA, anything else) are never ours
    for n in ("qdabc123-gA", "qdabc123-k", "qd0000ff-hB", "qd0000ff-probe", "qdrogue",
              "qdabc123-x", "qdABC123-gA", "other-ns", "q1234hA"):
        (tmp_path / n).write_text("")
    monkeypatch.setattr(dn, "NETNS_DIR", str(tmp_path))
    assert dn.list_demo_namespaces("abc123") == ["qdabc123-gA", "qdabc123-k"]
    ours = ["qd0000ff-hB", "qd0000ff-probe", "qdabc123-gA", "qdabc123-k"]
    assert dn.list_demo_namespaces() == ours
    ip = FakeIp()
    assert dn.remove_namespaces(ours, runner=ip) == []
    assert [c[3] for c, _ in ip.cmds] == ours
    monkeypatch.setattr(dn, "NETNS_DIR", str(tmp_path / "missing"))
    assert dn.list_demo_namespaces() == []


def test_remove_leftovers_deletes_only_demo_namespaces(tmp_path, monkeypatch, capsys):
    for n in ("qd00aa11-gA", "qd00aa11-w", "q1234hA"):
        (tmp_path / n).write_text("")
    monkeypatch.setattr(dn, "NETNS_DIR", str(tmp_path))
    monkeypatch.setattr(demo.os, "geteuid", lambda: 0)
    deleted = []

    def fake_del(cmd, stdin=""):
        deleted.append(cmd[3])
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(dn, "run_ip", fake_del)
    monkeypatch.setattr(dn.remove_namespaces, "__defaults__", (fake_del,))
    assert cli.main(["demo", "--remove-leftovers"]) == 0
    assert deleted == ["qd00aa11-gA", "qd00aa11-w"]
    assert "removed 2 namespace(s)" in capsys.readouterr().out


def test_run_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    assert cli.main(["demo", "--duration", "5"]) == 1
    assert "run it as root" in capsys.readouterr().err
