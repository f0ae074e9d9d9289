"""Kernel-test helpers: a five-namespace topology and make-before-break IPsec
and MACsec pairs driven through qkdgate's backends (traffic, capture and
counters are in kernel_traffic.py). Runs inside the lab VM (lab/run.sh); setup uses `ip -batch` (one
process per namespace: process start costs 0.2-0.6 s under TCG), everything
else is done in-process through the backends and namespace-bound sockets.

    hA(10.1.0.2, fd01::2) -- gA(10.1.0.1 | 192.0.2.1, fd00:ff::1) --+
                                                           wire (bridge br0, capture)
    hB(10.2.0.2, fd02::2) -- gB(10.2.0.1 | 192.0.2.2, fd00:ff::2) --+
    gA.m0 / gB.m0: a second pair of ports on the same bridge for MACsec.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass

from kernel_traffic import (  # noqa: F401
    LAN_A,
    LAN_A6,
    LAN_B,
    LAN_B6,
    MS_NET,
    PATTERN,
    PROTECTED,
    Capture,
    Stream,
    WireReport,
    analyse_pcap,
    attribute_loss,
    ip,
    iter_pcap,
    link_drops,
    net,
    proc_net,
    udp_rcvbuf_errors,
    xfrm_stats,
)

from qkdgate.interfaces import (
    Direction,
    Lifetime,
    MacsecCipher,
    MacsecLinkSpec,
    MacsecSaSpec,
    Mode,
    PolicySpec,
    SaId,
    SaSpec,
    Selector,
    Template,
)
from qkdgate.keymix.combiner import HybridInputs, combine
from qkdgate.keymix.schedule import esp_key, macsec_keys
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.macsec import MacsecBackend
from qkdgate.tunnels.netlink import NetlinkChannel, in_netns, open_socket_in_netns, parse_nlas
from qkdgate.tunnels.xfrm import XfrmBackend

GA, GB = ip("192.0.2.1"), ip("192.0.2.2")
GA6, GB6 = ip("fd00:ff::1"), ip("fd00:ff::2")
HA, HB = ip("10.1.0.2"), ip("10.2.0.2")
HA6, HB6 = ip("fd01::2"), ip("fd02::2")
MS_A, MS_B = ip("172.16.0.1"), ip("172.16.0.2")


def fixed_session(tag: bytes = b"lab") -> object:
    """A SessionSecret from fixed inputs: both gateways derive identical keys."""
    return combine(HybridInputs(
        kem_name="ML-KEM-768", kem_secret=SecretBytes(bytes(32) + tag),
        x25519_secret=SecretBytes(bytes(range(32))),
        qkd_key=SecretBytes(bytes([7]) * 32), qkd_key_ids=(str(uuid.UUID(int=1)),),
        transcript_hash=bytes(range(32))))


def ipbatch(lines: list[str], netns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    r = subprocess.run(cmd, input="\n".join(lines) + "\n", text=True, capture_output=True)
    if r.returncode:
        raise RuntimeError(f"ip -batch in {netns or 'root'} failed: {r.stderr.strip()}")


def sysctl(netns: str, path: str, value: str) -> None:
    with in_netns(netns), open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


# Frozen, so one shared default is safe.
LAB_LIFETIME = Lifetime(soft_add_seconds=3000, hard_add_seconds=3600)

class Topology:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:4]
        self.hA, self.gA, self.wire, self.gB, self.hB = (f"q{tag}{n}" for n in
                                                        ("hA", "gA", "w", "gB", "hB"))
        self.all = [self.hA, self.gA, self.wire, self.gB, self.hB]

    @classmethod
    def from_names(cls, names: list[str]) -> Topology:
        t = cls.__new__(cls)
        t.hA, t.gA, t.wire, t.gB, t.hB = names
        t.all = list(names)
        return t

    def up(self) -> Topology:
        hA, gA, w, gB, hB = self.all
        ipbatch([f"netns add {n}" for n in self.all] + [
            f"link add a0 netns {hA} type veth peer name a1 netns {gA}",
            f"link add w0 netns {gA} type veth peer name wa netns {w}",
            f"link add w0 netns {gB} type veth peer name wb netns {w}",
            f"link add b0 netns {hB} type veth peer name b1 netns {gB}",
            f"link add m0 netns {gA} type veth peer name pma netns {w}",
            f"link add m0 netns {gB} type veth peer name pmb netns {w}"])
        for n in self.all:
            for key in ("all", "default"):
                sysctl(n, f"net/ipv4/conf/{key}/rp_filter", "0")
        for n in (w,):
            for key in ("all", "default"):
                sysctl(n, f"net/ipv6/conf/{key}/disable_ipv6", "1")
        for g in (gA, gB):
            sysctl(g, "net/ipv4/ip_forward", "1")
            sysctl(g, "net/ipv6/conf/all/forwarding", "1")
            sysctl(g, "net/ipv6/conf/m0/disable_ipv6", "1")
        ipbatch(["link set lo up", "link set a0 up", "addr add 10.1.0.2/24 dev a0",
                 "addr add fd01::2/64 dev a0 nodad", "route add default via 10.1.0.1",
                 "route add ::/0 via fd01::1"], hA)
        ipbatch(["link set lo up", "link set b0 up", "addr add 10.2.0.2/24 dev b0",
                 "addr add fd02::2/64 dev b0 nodad", "route add default via 10.2.0.1",
                 "route add ::/0 via fd02::1"], hB)
        for g, lan, me, peer, me6, peer6, rnet, rnet6, lan6 in (
                (gA, "a1", "10.1.0.1/24", "192.0.2.2", "fd00:ff::1/64", "fd00:ff::2",
                 "10.2.0.0/24", "fd02::/64", "fd01::1/64"),
                (gB, "b1", "10.2.0.1/24", "192.0.2.1", "fd00:ff::2/64", "fd00:ff::1",
                 "10.1.0.0/24", "fd01::/64", "fd02::1/64")):
            wan = "192.0.2.1/24" if g == gA else "192.0.2.2/24"
            ipbatch(["link set lo up", f"link set {lan} up", f"addr add {me} dev {lan}",
                     f"addr add {lan6} dev {lan} nodad", "link set w0 up",
                     f"addr add {wan} dev w0", f"addr add {me6} dev w0 nodad",
                     f"route add {rnet} via {peer}", f"route add {rnet6} via {peer6}",
                     "link set m0 up"], g)
        ipbatch(["link set lo up", "link add br0 type bridge", "link set br0 up"], w)
        # a second batch: ip caches interface names, so br0 is unknown to the first
        ipbatch([f"link set {p} master br0" for p in ("wa", "wb", "pma", "pmb")]
                + [f"link set {p} up" for p in ("wa", "wb", "pma", "pmb")], w)
        return self

    def down(self) -> None:
        ipbatch([f"netns del {n}" for n in self.all])


@dataclass
class Gen:
    n: int
    spi_ab: int
    spi_ba: int
    out_reqid_a: int
    out_reqid_b: int


class IpsecPair:
    """Two gateways' XFRM state for one tunnel, rekeyed make-before-break.

    Reqids: inbound SAs of every generation carry ``base`` (matched by the
    in/fwd templates), outbound SAs ``base + 1 + n % 8`` so the out policy's
    template names exactly one generation and UPDPOLICY switches atomically.
    """

    def __init__(self, topo: Topology, session: object, tunnel_id: str = "t0", *,
                 base: int = 0x10000, a_net=LAN_A, b_net=LAN_B, ga=GA, gb=GB,
                 lifetime: Lifetime = LAB_LIFETIME,
                 be_a: XfrmBackend | None = None, be_b: XfrmBackend | None = None,
                 grace: float = 0.1, encap=None, if_id: int | None = None,
                 mode: Mode = Mode.TUNNEL) -> None:
        self.topo, self.session, self.tid, self.base = topo, session, tunnel_id, base
        self.encap, self.if_id, self.mode = encap, if_id, mode
        self.a_net, self.b_net, self.ga, self.gb = a_net, b_net, ga, gb
        self.lifetime, self.grace = lifetime, grace
        self.a = be_a or XfrmBackend(topo.gA)
        self.b = be_b or XfrmBackend(topo.gB)
        self.gens: list[Gen] = []
        self.windows: list[tuple[float, float]] = []

    def _id(self, src, dst, spi: int) -> SaId:
        return SaId(src, dst, spi, if_id=self.if_id)

    def _out_policy(self, side: str, reqid: int) -> PolicySpec:
        if side == "a":
            return PolicySpec(Selector(self.a_net, self.b_net), Direction.OUT, if_id=self.if_id,
                              template=Template(self.ga, self.gb, reqid=reqid, mode=self.mode))
        return PolicySpec(Selector(self.b_net, self.a_net), Direction.OUT, if_id=self.if_id,
                          template=Template(self.gb, self.ga, reqid=reqid, mode=self.mode))

    def policies(self, side: str) -> list[PolicySpec]:
        me, peer, mine, theirs = ((self.ga, self.gb, self.a_net, self.b_net) if side == "a"
                                  else (self.gb, self.ga, self.b_net, self.a_net))
        tin = Template(peer, me, reqid=self.base, mode=self.mode)
        return [self._out_policy(side, self.base + 1),
                PolicySpec(Selector(theirs, mine), Direction.IN, template=tin, if_id=self.if_id),
                PolicySpec(Selector(theirs, mine), Direction.FWD, template=tin, if_id=self.if_id)]

    def setup(self) -> None:
        # fail closed from the start: policies (required templates) before any SA
        for side, be in (("a", self.a), ("b", self.b)):
            for p in self.policies(side):
                be.install_policy(p)
        self.rekey()

    def rekey(self) -> Gen:
        t0 = time.monotonic()
        n = len(self.gens) + 1
        spi_ab = self.b.allocate_spi(self.ga, self.gb)   # the receiver picks the SPI
        spi_ba = self.a.allocate_spi(self.gb, self.ga)
        k_ab = esp_key(self.session, self.tid, "i2r", spi_ab, n)
        k_ba = esp_key(self.session, self.tid, "r2i", spi_ba, n)
        sel_ab, sel_ba = Selector(self.a_net, self.b_net), Selector(self.b_net, self.a_net)
        # 1. new inbound on both ends (read back inside the backend)
        self.b.install_inbound(self._id(self.ga, self.gb, spi_ab),
                               SaSpec(k_ab, self.base, selector=sel_ab, lifetime=self.lifetime, encap=self.encap, mode=self.mode))
        self.a.install_inbound(self._id(self.gb, self.ga, spi_ba),
                               SaSpec(k_ba, self.base, selector=sel_ba, lifetime=self.lifetime, encap=self.encap, mode=self.mode))
        # 2. (key confirmation happens in the peer protocol; both inbound SAs exist now)
        out = self.base + 1 + n % 8
        self.a.install_outbound(self._id(self.ga, self.gb, spi_ab),
                                SaSpec(k_ab, out, selector=sel_ab, lifetime=self.lifetime, encap=self.encap, mode=self.mode))
        self.b.install_outbound(self._id(self.gb, self.ga, spi_ba),
                                SaSpec(k_ba, out, selector=sel_ba, lifetime=self.lifetime, encap=self.encap, mode=self.mode))
        # 3. switch: one atomic UPDPOLICY per side
        self.a.switch_outbound(self._out_policy("a", out))
        self.b.switch_outbound(self._out_policy("b", out))
        gen = Gen(n, spi_ab, spi_ba, out, out)
        self.gens.append(gen)
        # 4. grace, then the previous generation goes
        if len(self.gens) > 1:
            time.sleep(self.grace)
            self.retire(self.gens[-2])
        self.windows.append((t0, time.monotonic()))
        return gen

    def retire(self, g: Gen) -> None:
        self.a.remove_sa(self._id(self.ga, self.gb, g.spi_ab))
        self.b.remove_sa(self._id(self.ga, self.gb, g.spi_ab))
        self.a.remove_sa(self._id(self.gb, self.ga, g.spi_ba))
        self.b.remove_sa(self._id(self.gb, self.ga, g.spi_ba))

    def key_for_spi(self, spi: int) -> tuple[SecretBytes, str]:
        for g in self.gens:
            if g.spi_ab == spi:
                return esp_key(self.session, self.tid, "i2r", spi, g.n), "i2r"
            if g.spi_ba == spi:
                return esp_key(self.session, self.tid, "r2i", spi, g.n), "r2i"
        raise KeyError(hex(spi))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class MacsecPair:
    """A macsec link ``ms0`` on gA.m0 and gB.m0 with hitless AN rotation.

    A's SC carries initiator-to-responder traffic ("i2r"), B's "r2i"; each
    rotation installs the next AN everywhere before switching encodingsa."""

    def __init__(self, topo: Topology, session: object, tunnel_id: str = "m0", *,
                 cipher: MacsecCipher = MacsecCipher.GCM_AES_XPN_256, grace: float = 0.1,
                 be_a: MacsecBackend | None = None, be_b: MacsecBackend | None = None) -> None:
        self.topo, self.session, self.tid, self.cipher, self.grace = topo, session, tunnel_id, cipher, grace
        self.a = be_a or MacsecBackend(topo.gA)
        self.b = be_b or MacsecBackend(topo.gB)
        self.gen = 0
        self.an: int | None = None
        self.windows: list[tuple[float, float]] = []
        self.history: list[tuple[int, int]] = []     # (generation, AN)

    def setup(self, addresses: bool = True) -> None:
        for be in (self.a, self.b):
            # a small replay window: with two vCPUs veth frames can be reordered
            # across per-CPU backlogs, and window 0 (strict) counts them as late
            be.create_link(MacsecLinkSpec(name="ms0", parent="m0", cipher=self.cipher,
                                          replay_window=32))
        self.sci_a, self.sci_b = self.a.link_sci("ms0"), self.b.link_sci("ms0")
        self.a.add_rx_sc("ms0", self.sci_b)
        self.b.add_rx_sc("ms0", self.sci_a)
        self.rotate()
        for be in (self.a, self.b):
            be.set_link_up("ms0", True)
        if addresses:
            ipbatch(["addr add 172.16.0.1/24 dev ms0"], self.topo.gA)
            ipbatch(["addr add 172.16.0.2/24 dev ms0"], self.topo.gB)

    def keys(self, direction: str, an: int, gen: int):
        sci = self.sci_a if direction == "i2r" else self.sci_b
        return macsec_keys(self.session, self.tid, direction, sci, an, gen, self.cipher)

    def _sa(self, direction: str, an: int, gen: int) -> MacsecSaSpec:
        k = self.keys(direction, an, gen)
        return MacsecSaSpec(an=an, key=k.sak, keyid=k.keyid, ssci=k.ssci, salt=k.salt)

    def rotate(self) -> int:
        t0 = time.monotonic()
        self.gen += 1
        old = self.an
        an = 0 if old is None else (old + 1) % 4
        # 1. new RX SAs on both sides, 2. new TX SAs, 3. switch encoding SA
        self.b.add_rx_sa("ms0", self.sci_a, self._sa("i2r", an, self.gen))
        self.a.add_rx_sa("ms0", self.sci_b, self._sa("r2i", an, self.gen))
        self.a.add_tx_sa("ms0", self._sa("i2r", an, self.gen))
        self.b.add_tx_sa("ms0", self._sa("r2i", an, self.gen))
        self.a.set_encoding_sa("ms0", an)
        self.b.set_encoding_sa("ms0", an)
        self.an = an
        self.history.append((self.gen, an))
        if old is not None:
            # 4. grace, deactivate, delete (the kernel refuses to delete active SAs)
            time.sleep(self.grace)
            for be, peer_sci in ((self.a, self.sci_b), (self.b, self.sci_a)):
                be.set_tx_sa_active("ms0", old, False)
                be.set_rx_sa_active("ms0", peer_sci, old, False)
                be.remove_tx_sa("ms0", old)
                be.remove_rx_sa("ms0", peer_sci, old)
        self.windows.append((t0, time.monotonic()))
        return an

    def teardown(self) -> None:
        for be in (self.a, self.b):
            with contextlib.suppress(Exception):
                be.destroy_link("ms0")


def mac_of(netns: str, ifname: str) -> bytes:
    with NetlinkChannel(0, netns) as ch:
        (_t, body), = ch.request("get_link", 18, bytes(16) + _ifname_attr(ifname))
        return parse_nlas(body, 16)[1]


def _ifname_attr(name: str) -> bytes:
    from qkdgate.tunnels.netlink import nla
    return nla(3, name.encode() + b"\0")


def inject(topo: Topology, frame: bytes, iface: str = "br0") -> None:
    """Send one raw Ethernet frame into the wire bridge."""
    s = open_socket_in_netns(socket.AF_PACKET, socket.SOCK_RAW, topo.wire)
    try:
        s.bind((iface, 0))
        s.send(frame)
    finally:
        s.close()


def flush_xfrm(be: XfrmBackend) -> None:
    for st in be.list_sas():
        with contextlib.suppress(Exception):
            be.remove_sa(st.sa_id)
    for p in be.list_policies():
        with contextlib.suppress(Exception):
            be.remove_policy(p)
