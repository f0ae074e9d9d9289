"""Kernel test: an active/standby qkdgate pair on a real keepalived (issue 12).

    hA(10.1.0.2) --+-- gA1 (10.1.0.11 | 192.0.2.11) --+
     LAN bridge    |   VIPs 10.1.0.1, 192.0.2.1 on    |  wire bridge br0 (capture)
                   +-- gA2 (10.1.0.12 | 192.0.2.12) --+-- gB (192.0.2.2 | 10.2.0.1) -- hB(10.2.0.2)

Three real ``qkdgate run`` processes (gA1, gA2 as HA nodes 1 and 2 with one
shared identity and their own journals; gB pins the VIP), one keepalived
per A node (VRRPv3, advert 100 ms, nopreempt, notifying its daemon through
``notify_fifo``; it checks the daemon with a 1 s vrrp_script, since
vrrp_track_process needs process events, which Linux gives only in the
initial network namespace), the KME simulator in its own
namespace reached through loopback relays, real ESP, a UDP stream of 100
datagrams/s each way during each switch, in order: the active daemon
SIGKILLed; a planned switch (keepalived stopped on the active node); the
active node's wire link down; the active node's power lost (its daemon and
keepalived SIGKILLed and its namespace deleted: no FIN, no notification,
its links vanish). Each asserts: not one cleartext packet of the
protected networks on the wire, gB ends with exactly one SA set (the new
node's) under a fresh QKD key, and traffic resumes within a loose bound.
Each prints the failover table so far (outage, losses, QKD keys used).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from kernel_lab import ipbatch, sysctl
from kernel_traffic import Capture, Stream, analyse_pcap, ip

from qkdgate.gateway.daemon.control import ControlError, request
from qkdgate.gateway.demo import net as dn
from qkdgate.gateway.demo.config import KmeEndpoint, Timers, gateway_yaml, write_identities
from qkdgate.tunnels.xfrm import XfrmBackend

HA_, HB_ = ip("10.1.0.2"), ip("10.2.0.2")
VENV_QKDGATE = Path(sys.executable).parent / "qkdgate"
OUTAGE_BOUND = 20.0       # seconds: loose under TCG; the goal (< 1 s) is measured, not asserted

# In the kernel stage by default since it passed on a guest that keeps up
# (2026-12-07: the four events in 108 s, and again under bench/ha.py); it was
# opt-in while keepalived flapped on starved guests (its check timed out:
# docs/operations.md, "High availability"). QKDGATE_HA_TESTS=0 leaves it out.
pytestmark = pytest.mark.skipif(os.environ.get("QKDGATE_HA_TESTS", "1") == "0",
                                reason="QKDGATE_HA_TESTS=0")


class HaLab:
    def __init__(self, folder: Path) -> None:
        tag = os.urandom(2).hex()
        self.folder = folder
        self.ns = {r: f"qh{tag}{r}" for r in ("hA", "gA1", "gA2", "w", "gB", "hB", "k")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kme: dn.LoopThread | None = None
        self._kme_stop: asyncio.Event | None = None
        self._kme_fut = None

    # -------------------------------------------------------------- network
    def up(self) -> None:
        n = self.ns
        ipbatch([f"netns add {x}" for x in n.values()] + [
            f"link add a0 netns {n['hA']} type veth peer name la netns {n['w']}",
            f"link add a1 netns {n['gA1']} type veth peer name l1 netns {n['w']}",
            f"link add a1 netns {n['gA2']} type veth peer name l2 netns {n['w']}",
            f"link add w0 netns {n['gA1']} type veth peer name w1 netns {n['w']}",
            f"link add w0 netns {n['gA2']} type veth peer name w2 netns {n['w']}",
            f"link add w0 netns {n['gB']} type veth peer name wb netns {n['w']}",
            f"link add b0 netns {n['hB']} type veth peer name b1 netns {n['gB']}"])
        for x in n.values():
            for key in ("all", "default"):
                sysctl(x, f"net/ipv4/conf/{key}/rp_filter", "0")
        for g in ("gA1", "gA2", "gB"):
            sysctl(n[g], "net/ipv4/ip_forward", "1")
        for g in ("gA1", "gA2"):
            # the standby binds the control channel to the VIP it does not hold
            sysctl(n[g], "net/ipv4/ip_nonlocal_bind", "1")
        ipbatch(["link set lo up", "link set a0 up", "addr add 10.1.0.2/24 dev a0",
                 "route add default via 10.1.0.1"], n["hA"])
        ipbatch(["link set lo up", "link set b0 up", "addr add 10.2.0.2/24 dev b0",
                 "route add default via 10.2.0.1"], n["hB"])
        for g, host in (("gA1", 11), ("gA2", 12)):
            ipbatch(["link set lo up", "link set a1 up", f"addr add 10.1.0.{host}/24 dev a1",
                     "link set w0 up", f"addr add 192.0.2.{host}/24 dev w0",
                     "route add 10.2.0.0/24 via 192.0.2.2"], n[g])
        ipbatch(["link set lo up", "link set b1 up", "addr add 10.2.0.1/24 dev b1",
                 "link set w0 up", "addr add 192.0.2.2/24 dev w0",
                 "route add 10.1.0.0/24 via 192.0.2.1"], n["gB"])
        ipbatch(["link set lo up", "link add br0 type bridge", "link add brl type bridge",
                 "link set br0 up", "link set brl up"], n["w"])
        ipbatch([f"link set {p} master br0" for p in ("w1", "w2", "wb")]
                + [f"link set {p} master brl" for p in ("la", "l1", "l2")]
                + [f"link set {p} up" for p in ("w1", "w2", "wb", "la", "l1", "l2")], n["w"])
        ipbatch(["link set lo up"], n["k"])

    def down(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        if self._kme_stop is not None and self.kme is not None and self.kme.loop:
            self.kme.loop.call_soon_threadsafe(self._kme_stop.set)
            with contextlib.suppress(Exception):
                self._kme_fut.result(10)
        if self.kme is not None:
            self.kme.stop()
        subprocess.run(["ip", "-batch", "-"], input="".join(
            f"netns del {x}\n" for x in self.ns.values()), text=True, capture_output=True)
        self.keep_logs()

    def keep_logs(self) -> None:
        """The daemons' and keepalived's logs outlive the guest: copied to
        LAB_OUT/ha-logs (the host keeps it), since a flap or a stall is read
        from them, not from the assertion."""
        out = os.environ.get("LAB_OUT")
        if not out:
            return
        dest = Path(out) / "ha-logs"
        dest.mkdir(parents=True, exist_ok=True)
        for f in self.folder.glob("*.log"):
            with contextlib.suppress(OSError):
                (dest / f.name).write_bytes(f.read_bytes())

    # -------------------------------------------------------------- KME
    def start_kme(self) -> tuple[int, int, int]:
        """The simulator in namespace k; a loopback relay in each gateway
        namespace (gateway/demo/net.py). Returns the relay ports."""
        from qkdgate.adapters.kmesim.server import KmeSimulator
        self.kme = dn.LoopThread(self.ns["k"], "kme").start()
        listeners = [dn.loopback_listener(self.ns[g]) for g in ("gA1", "gA2", "gB")]
        ready = threading.Event()

        async def main() -> None:
            self._kme_stop = asyncio.Event()
            async with KmeSimulator.start(self.folder / "kme", prefill=200) as sim:
                fwds = [dn.TcpForwarder(s, ("127.0.0.1", sim.ports[k]))
                        for s, k in zip(listeners, ("KME-A", "KME-A", "KME-B"), strict=True)]
                for f in fwds:
                    await f.start()
                self.sim = sim
                ready.set()
                await self._kme_stop.wait()
                for f in fwds:
                    await f.close()
        self._kme_fut = self.kme.submit(main())
        assert ready.wait(60), "KME simulator did not start"
        return tuple(s.getsockname()[1] for s in listeners)  # type: ignore[return-value]

    # -------------------------------------------------------------- configs
    def write_configs(self, ports: tuple[int, int, int]) -> dict[str, Path]:
        write_identities(self.folder)          # gA1 and gA2 share gw-a's identity
        timers = Timers(interval=120.0, soft=150.0, hard=180.0, grace=1.0)

        def ep(sae: str, port: int) -> KmeEndpoint:
            c = self.sim.credentials(sae)
            return KmeEndpoint(f"https://127.0.0.1:{port}", c.kme_id, str(c.cert), str(c.key),
                               str(c.ca))
        paths = {}
        a_text = gateway_yaml("a", self.folder, ep("SAE-A", ports[0]), policy="hybrid-required",
                              timers=timers)
        for node, g, port in ((1, "gA1", ports[0]), (2, "gA2", ports[1])):
            text = a_text.replace(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{port}")
            text = text.replace("gw-a-state", f"{g}-state").replace("gw-a-run", f"{g}-run")
            text += (f"ha:\n  node: {node}\n  notify_fifo: {self.folder}/{g}.fifo\n"
                     "  instance: VI_QKD\n")
            paths[g] = self.folder / f"{g}.yaml"
            paths[g].write_text(text)
        paths["gB"] = self.folder / "gB.yaml"
        paths["gB"].write_text(gateway_yaml("b", self.folder, ep("SAE-B", ports[2]),
                                            policy="hybrid-required", timers=timers))
        for p in paths.values():
            p.chmod(0o600)
        self.paths = paths
        return paths

    def keepalived_conf(self, g: str, priority: int) -> Path:
        conf = self.folder / f"{g}-keepalived.conf"
        conf.write_text(f"""global_defs {{
    router_id {g}
    vrrp_version 3
    notify_fifo {self.folder}/{g}.fifo
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 1
    script_user root
    enable_script_security
}}
vrrp_script qkdgate {{
    script "/usr/bin/pgrep -x qkdgate-{g[1:].lower()}"
    interval 1                 # whole seconds only (keepalived 2.2)
    timeout 10                 # a starved TCG guest ran pgrep > 3 s (21:27, 2026-12-06):
                               # FAULT while the daemon lived. A dead daemon fails fast.
    fall 2
    rise 1
}}
vrrp_instance VI_QKD {{
    state BACKUP
    nopreempt
    interface w0
    virtual_router_id 51
    priority {priority}
    advert_int 0.1
    virtual_ipaddress {{
        192.0.2.1/24 dev w0
        10.1.0.1/24 dev a1
    }}
    track_script {{
        qkdgate
    }}
}}
""")
        return conf

    # -------------------------------------------------------------- processes
    def start_daemon(self, g: str) -> None:
        # A per-node process name (comm: the name execve was given), so each
        # keepalived checks its own node's daemon (pgrep -x): the lab's nodes
        # share one PID namespace.
        exe = self.folder / f"qkdgate-{g[1:].lower()}"
        if not exe.exists():
            exe.symlink_to(VENV_QKDGATE)
        log = open(self.folder / f"{g}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[g] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[g], str(exe), "run", "-c", str(self.paths[g]),
             "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT)

    def start_keepalived(self, g: str, priority: int) -> None:
        conf = self.keepalived_conf(g, priority)
        log = open(self.folder / f"{g}-keepalived.log", "wb")  # noqa: SIM115
        run = self.folder / f"{g}-ka"
        run.mkdir(exist_ok=True)
        self.procs[f"ka-{g}"] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[g], "keepalived", "--dont-fork", "--log-console",
             "--log-detail", "--vrrp", "-f", str(conf), "-p", str(run / "k.pid"),
             "-r", str(run / "v.pid"), "-c", str(run / "c.pid")],
            stdout=log, stderr=subprocess.STDOUT)

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def sigkill_daemon(self, g: str) -> float:
        """SIGKILL the daemon itself (`ip netns exec` execs it: same PID)."""
        p = self.procs.pop(g)
        t = time.monotonic()
        p.send_signal(signal.SIGKILL)
        p.wait()
        return t

    def power_off(self, g: str) -> float:
        """Power loss: every process of the node dies at once and its
        namespace goes (its veths with it), so nothing leaves it again.
        Every process in the namespace gets SIGKILL, not only the ones we
        started: killing keepalived's parent alone lets its VRRP child shut
        down cleanly and send a priority-0 advert, a planned switch."""
        t = time.monotonic()
        pids = subprocess.run(["ip", "netns", "pids", self.ns[g]], capture_output=True,
                              text=True).stdout.split()
        for pid in (p for p in pids if int(p) != os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for name in (f"ka-{g}", g):
            p = self.procs.pop(name, None)
            if p is not None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        subprocess.run(["ip", "netns", "del", self.ns[g]], capture_output=True)
        return t

    def link_up(self, g: str) -> None:
        """The node's wire link comes back, and its static route with it:
        taking a link down makes the kernel delete the routes through it,
        and a node's network manager (systemd-networkd, ifupdown) adds them
        again on carrier. Without it the node keys with gB (same subnet) but
        cannot forward the site's traffic."""
        ipbatch(["link set w0 up", "route replace 10.2.0.0/24 via 192.0.2.2"], self.ns[g])

    def qkd_keys_since(self, g: str, offset: int) -> set[str]:
        """QKD key_IDs in the generations ``g`` established after byte
        ``offset`` of its log (one line per generation, peer.py)."""
        text = (self.folder / f"{g}.log").read_bytes()[offset:].decode(errors="replace")
        ids: set[str] = set()
        for line in text.splitlines():
            if " established in " in line and "'qkd_key_ids': [" in line:
                part = line.split("'qkd_key_ids': [", 1)[1].split("]", 1)[0]
                ids.update(x.strip(" '") for x in part.split(",") if x.strip(" '"))
        return ids

    def log_size(self, g: str) -> int:
        try:
            return (self.folder / f"{g}.log").stat().st_size
        except OSError:
            return 0

    def ctl(self, g: str, cmd: str, **kw: object) -> object:
        run = "gw-b-run" if g == "gB" else f"{g}-run"      # as in write_configs
        return request(str(self.folder / run / "control.sock"), cmd, timeout=20.0, **kw)

    def wait(self, what: str, predicate, timeout: float) -> float:
        t0 = time.monotonic()
        while True:
            try:
                if predicate():
                    return time.monotonic() - t0
            except (ControlError, KeyError, IndexError, TypeError):
                pass
            for name, p in self.procs.items():
                assert p.poll() is None, f"{name} exited ({p.returncode}): {self.tail(name)}"
            assert time.monotonic() - t0 < timeout, f"{what} not within {timeout} s: " + \
                " | ".join(f"{g}: {self.tail(g)}" for g in ("gA1", "gA2", "gB"))
            time.sleep(0.1)

    def tail(self, name: str, n: int = 8) -> str:
        f = self.folder / (f"{name}.log" if not name.startswith("ka-") else
                           f"{name[3:]}-keepalived.log")
        try:
            return "\n".join(f.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def tunnel(self, g: str) -> dict:
        return self.ctl(g, "status")["tunnels"][0]  # type: ignore[index]

    def role(self, g: str) -> str:
        return self.ctl(g, "ha")["role"]  # type: ignore[index]


def gb_sas(lab: HaLab) -> list:
    """gB's keyed SAs of the tunnel. An SPI reserved for an exchange that did
    not finish stays a larval state, with no algorithm and no key, until the
    kernel drops it (xfrm_acq_expires; tunnels/manager.py allocate_spis): it
    carries nothing and is not an SA set. The hog series of 2026-12-07 met
    one beside gB's two keyed SAs right after a failover."""
    be = XfrmBackend(lab.ns["gB"], verify=False)
    try:
        return [s for s in be.list_sas() if 100 <= s.reqid < 100 + 64 and s.aead]
    finally:
        be.close()


def one_sa_set(sas: list) -> bool:
    """One SA set at gB: in to gB, out to the VIP."""
    return sorted(str(s.sa_id.dst) for s in sas) == ["192.0.2.1", "192.0.2.2"]


def outage(stream: Stream, t_event: float) -> tuple[float, int]:
    """The longest break in delivery from the event on: the largest gap in
    send time between two consecutive datagrams that arrived (the last one
    before the event counts as the start), and how many sent after the
    event never arrived. A SIGKILLed daemon's SAs keep forwarding until the
    VIP moves, so the break may start well after the event: the time to the
    first arrival would miss it (the lab's first run measured 7 ms so)."""
    got = stream.received_set()
    sent = stream.sent_at
    before = [s for s in got if s < len(sent) and sent[s] < t_event]
    after = sorted(s for s in got if s < len(sent) and sent[s] >= t_event)
    assert after, "no datagram arrived after the event"
    marks = ([sent[max(before)]] if before else [t_event]) + [sent[s] for s in after]
    gap = max(b - a for a, b in itertools.pairwise(marks)) if len(marks) > 1 else 0.0
    lost = sum(1 for s in range(len(sent)) if sent[s] >= t_event and s not in got)
    return max(0.0, gap - 1.0 / stream.rate), lost


def start_pair(lab: HaLab) -> None:
    """gB, gA1 (active) and gA2 (standby) keyed, keepalived on both A nodes
    (also bench/ha.py)."""
    lab.up()
    ports = lab.start_kme()
    lab.write_configs(ports)
    for g in ("gB", "gA1", "gA2"):
        lab.start_daemon(g)
    for g in ("gA1", "gA2"):
        # daemon start-up is slow in a loaded TCG guest (imports)
        lab.wait(f"{g} standby", lambda g=g: lab.role(g) == "starting", 400)
    lab.wait("gB running", lambda: lab.tunnel("gB")["state"] == "blocked", 400)
    lab.start_keepalived("gA1", 110)
    lab.wait("gA1 active", lambda: lab.role("gA1") == "active", 30)
    lab.start_keepalived("gA2", 100)
    lab.wait("gA2 standby", lambda: lab.role("gA2") == "standby", 30)
    lab.wait("first generation", lambda: lab.tunnel("gB")["state"] == "up"
             and lab.tunnel("gA1")["state"] == "up", 120)
    assert lab.tunnel("gA2")["state"] == "blocked"


def new_lab() -> HaLab:
    folder = Path(tempfile.mkdtemp(prefix="qkdgate-ha-"))
    os.chmod(folder, 0o700)
    return HaLab(folder)


@pytest.fixture(scope="module")
def pair():
    lab = new_lab()
    try:
        start_pair(lab)
        yield lab
    finally:
        lab.down()


ROWS: list[str] = []


def switch(lab: HaLab, what: str, event, to: str) -> dict:
    """Run ``event`` (returns its monotonic time) under 100 datagrams/s each
    way and a wire capture; wait until ``to`` is active and traffic flows
    again; assert the zeros and one SA set at gB; print one table row."""
    before = lab.tunnel("gB")
    log_at = lab.log_size("gB")
    cap = Capture(SimpleNamespace(wire=lab.ns["w"]), str(lab.folder / f"{what}.pcap"))
    ab = Stream(lab.ns["hA"], lab.ns["hB"], HA_, HB_, rate=100, port=5001).start()
    ba = Stream(lab.ns["hB"], lab.ns["hA"], HB_, HA_, rate=100, port=5002).start()
    try:
        lab.wait("traffic both ways", lambda: ab.received_set() and ba.received_set(), 20)
        time.sleep(1.0)
        t0 = event()
        lab.wait(f"{to} active", lambda: lab.role(to) == "active", 30)
        t_active = time.monotonic()
        # the switch is over when the new node is keyed with gB: traffic alone
        # does not say so (a SIGKILLed daemon's SAs forward until the VIP moves)
        lab.wait(f"{to} keyed with gB",
                 lambda: lab.tunnel(to)["state"] == "up"
                 and lab.tunnel("gB")["generation"] > before["generation"], OUTAGE_BOUND + 30)
        t_keyed = time.monotonic()
        lab.wait(f"traffic after {what}",
                 lambda: ab.received_since(t_keyed) and ba.received_since(t_keyed),
                 OUTAGE_BOUND + 10)
        # gB removes the old generation's inbound SA 1 s (its grace) after the
        # switch; a daemon starved beside a CPU hog acts a little later
        lab.wait("one SA set at gB", lambda: one_sa_set(gb_sas(lab)), 15)
    finally:
        ab.stop()
        ba.stop()
        wire = analyse_pcap(cap.stop())
    out_ab, lost_ab = outage(ab, t0)
    out_ba, lost_ba = outage(ba, t0)
    after, new = lab.tunnel("gB"), lab.tunnel(to)
    sas = gb_sas(lab)
    keys = [i for i in after["inputs"]["qkd_key_ids"] if i not in before["inputs"]["qkd_key_ids"]]
    used = lab.qkd_keys_since("gB", log_at)    # every generation gB keyed meanwhile
    row = (f"| {what} | {t_active - t0:.2f} | {out_ab * 1000:.0f} / {out_ba * 1000:.0f} | "
           f"{lost_ab} / {lost_ba} | {wire.cleartext} | {len(used)} | "
           f"{before['generation']} -> {after['generation']} |")
    ROWS.append(row)
    print("\n| event | role switch s | outage ms A->B / B->A | lost A->B / B->A | cleartext "
          "| QKD keys used | generation |\n|---|---|---|---|---|---|---|\n" + "\n".join(ROWS))
    assert wire.cleartext == 0 and wire.pattern_hits == 0 and wire.esp > 0
    assert out_ab < OUTAGE_BOUND and out_ba < OUTAGE_BOUND
    assert after["state"] == "up" and new["state"] == "up"
    assert after["generation"] > before["generation"]
    assert new["generation"] == after["generation"]
    # one SA set at the peer (in: to gB, out: to the VIP), none left of the old node
    assert one_sa_set(sas), sas
    assert keys, "no fresh QKD key for the new generation"
    return {"event": what, "role_switch_s": round(t_active - t0, 3),
            "outage_ms": [round(out_ab * 1000), round(out_ba * 1000)],
            "lost": [lost_ab, lost_ba], "cleartext": wire.cleartext, "qkd_keys": len(used),
            "generation": [before["generation"], after["generation"]],
            "outage": max(out_ab, out_ba)}


# The four events, in the order the tests (and bench/ha.py) run them; each
# leaves the pair ready for the next.
def sigkill_active(lab: HaLab) -> dict:
    return switch(lab, "SIGKILL", lambda: lab.sigkill_daemon("gA1"), "gA2")


def planned_switch(lab: HaLab) -> dict:
    """The operator stops keepalived on the active node (priority 0 advert)."""
    lab.start_daemon("gA1")                   # back as a standby (nopreempt)
    lab.wait("gA1 standby", lambda: lab.role("gA1") == "standby", 400)

    def stop() -> float:
        t = time.monotonic()
        lab.kill("ka-gA2")
        return t
    row = switch(lab, "planned (keepalived stop)", stop, "gA1")
    assert lab.role("gA2") in ("stopped", "standby")
    assert lab.tunnel("gA2")["state"] == "blocked"
    return row


def link_down(lab: HaLab) -> dict:
    lab.start_keepalived("gA2", 100)
    lab.wait("gA2 standby", lambda: lab.role("gA2") == "standby", 30)

    def down() -> float:
        t = time.monotonic()
        ipbatch(["link set w0 down"], lab.ns["gA1"])
        return t
    row = switch(lab, "wire link down", down, "gA2")
    assert lab.role("gA1") == "fault" and lab.tunnel("gA1")["state"] == "blocked"
    return row


def power_loss(lab: HaLab) -> dict:
    """gA1's link comes back (it stands by); then gA2, the active node, loses
    power: its processes die at once and its namespace goes. No FIN, no
    notification: gA1's keepalived misses the adverts and takes over."""
    lab.link_up("gA1")
    lab.wait("gA1 standby", lambda: lab.role("gA1") == "standby", 60)
    return switch(lab, "power loss (netns deleted)", lambda: lab.power_off("gA2"), "gA1")


EVENTS = (sigkill_active, planned_switch, link_down, power_loss)


def test_1_sigkill_of_the_active_node(pair):
    sigkill_active(pair)


def test_2_planned_switch(pair):
    planned_switch(pair)


def test_3_link_down(pair):
    link_down(pair)


def test_4_power_loss_of_the_active_node(pair):
    power_loss(pair)
