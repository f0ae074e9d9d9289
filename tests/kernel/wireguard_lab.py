"""Real WireGuard between the lab's two gateways, for the key-consumer tests.

Two WireGuard devices per gateway, brought up by wg-quick (Debian's
wireguard-tools) from the configuration docs/consumers.md shows: ``wgq0``
carries the measured traffic, ``wgq1`` is a probe whose handshakes the test
forces (``ip link set down/up`` drops its session, so the next packet needs a
fresh handshake under the PSK installed now). Both are keyed by qkdgate's
WireGuard consumer through its own netlink code; the test reads the keys back
with ``wg`` (another implementation) to check what the kernel holds.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

from qkdgate.tunnels.consumer import consumer_tunnel
from qkdgate.tunnels.manager import Lifetimes, Tunnel, TunnelPolicy
from qkdgate.tunnels.state import TunnelRegistry
from qkdgate.tunnels.wireguard import WireguardBackend, WireguardConsumer, WireguardSpec, parse_key

WG_LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=0.5)


def sh(netns: str | None, *cmd: str, input: str | None = None, check: bool = True) -> str:
    full = (["ip", "netns", "exec", netns] if netns else []) + list(cmd)
    r = subprocess.run(full, input=input, capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(full)}: rc={r.returncode} {r.stderr.strip()}")
    return r.stdout


def genkey() -> tuple[str, str]:
    priv = sh(None, "wg", "genkey").strip()
    return priv, sh(None, "wg", "pubkey", input=priv + "\n").strip()


@dataclass
class WgSide:
    ns: str
    priv: str
    pub: str


@dataclass
class WgLink:
    """One WireGuard device on each gateway, peered with each other."""

    name: str                  # interface name on both sides
    port: int
    net: str                   # "10.9.0" -> .1 on A, .2 on B
    a: WgSide
    b: WgSide
    wan_a: str = "192.0.2.1"
    wan_b: str = "192.0.2.2"
    tunnels: dict[str, Tunnel] = field(default_factory=dict)

    @property
    def addr_a(self):
        return ip_address(f"{self.net}.1")

    @property
    def addr_b(self):
        return ip_address(f"{self.net}.2")

    def conf(self, me: WgSide, peer: WgSide, my_ip: str, peer_ip: str, endpoint: str) -> str:
        # the docs/consumers.md snippet: no PresharedKey line, qkdgate sets it
        return (f"[Interface]\nPrivateKey = {me.priv}\nAddress = {my_ip}/24\n"
                f"ListenPort = {self.port}\n\n[Peer]\nPublicKey = {peer.pub}\n"
                f"Endpoint = {endpoint}:{self.port}\nAllowedIPs = {peer_ip}/32\n")

    def up(self, tmp: str) -> WgLink:
        for me, peer, mine, theirs, ep in ((self.a, self.b, self.addr_a, self.addr_b, self.wan_b),
                                           (self.b, self.a, self.addr_b, self.addr_a, self.wan_a)):
            d = tempfile.mkdtemp(dir=tmp)
            path = os.path.join(d, f"{self.name}.conf")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(self.conf(me, peer, str(mine), str(theirs), ep))
            sh(me.ns, "wg-quick", "up", path)
        return self

    def down(self) -> None:
        for side in (self.a, self.b):
            sh(side.ns, "ip", "link", "del", self.name, check=False)

    def consumer_tunnels(self, registry: TunnelRegistry | None = None,
                         policy: TunnelPolicy = TunnelPolicy.HYBRID_REQUIRED) -> None:
        for label, me, peer, allowed in (("A", self.a, self.b, self.addr_b),
                                         ("B", self.b, self.a, self.addr_a)):
            spec = WireguardSpec(f"wg-{self.name}", self.name, parse_key(peer.pub),
                                 (ip_network(f"{allowed}/32"),))
            self.tunnels[label] = consumer_tunnel(
                WireguardConsumer(spec, WireguardBackend(me.ns), registry=registry),
                policy=policy, lifetimes=WG_LT)

    def psk(self, side: WgSide) -> str:
        """The peer's PSK as `wg` reads it from the kernel (base64)."""
        (line,) = sh(side.ns, "wg", "show", self.name, "preshared-keys").splitlines()
        return line.split("\t")[1]

    def allowed(self, side: WgSide) -> str:
        (line,) = sh(side.ns, "wg", "show", self.name, "allowed-ips").splitlines()
        return line.split("\t")[1]

    def last_handshake(self, side: WgSide) -> float | None:
        other = self.b if side is self.a else self.a
        return WireguardBackend(side.ns).peer(self.name, parse_key(other.pub)).last_handshake

    def ping(self, count: int = 1, wait: float = 2.0) -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.a.ns, "ping", "-c", str(count), "-W",
                            str(wait), "-q", str(self.addr_b)], capture_output=True, timeout=60)
        return r.returncode == 0

    def drop_session(self, side: WgSide) -> None:
        """Force the next packet to need a fresh handshake: a device going
        down clears its session keys (drivers/net/wireguard/device.c wg_stop)."""
        sh(side.ns, "ip", "link", "set", self.name, "down")
        sh(side.ns, "ip", "link", "set", self.name, "up")
