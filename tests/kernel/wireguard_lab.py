"""Real WireGuard between the lab's two gateways, for the key-consumer tests.

Three WireGuard devices per gateway: ``wgq0`` carries the measured traffic
and is brought up by wg-quick (Debian's wireguard-tools) from the
configuration docs/consumers.md shows; ``wgq1`` is a probe whose handshakes
the test forces (a device going down drops its session keys, so the next
packet needs a fresh handshake under the PSK installed now); ``wgq2`` is
keyed by a separate process that the test SIGKILLs. All are keyed by
qkdgate's WireGuard consumer through its own netlink code; the test reads
the keys back with ``wg`` (another implementation) to check what the
kernel holds. Subprocesses are few on purpose: under TCG each costs tenths
of a second.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from kernel_lab import ipbatch

from qkdgate.tunnels.consumer import consumer_tunnel
from qkdgate.tunnels.netlink import open_socket_in_netns
from qkdgate.tunnels.state import TunnelRegistry
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import Tunnel, TunnelPolicy
from qkdgate.tunnels.wireguard import WireguardBackend, WireguardConsumer, WireguardSpec, parse_key

WG_LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=0.5)


def sh(netns: str | None, *cmd: str, input: str | None = None, check: bool = True) -> str:
    full = (["ip", "netns", "exec", netns] if netns else []) + list(cmd)
    r = subprocess.run(full, input=input, capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(full)}: rc={r.returncode} {r.stderr.strip()}")
    return r.stdout


def genkey() -> tuple[str, str]:
    """A WireGuard key pair as `wg genkey | wg pubkey` gives (X25519, RFC 7748)."""
    k = X25519PrivateKey.from_private_bytes(os.urandom(32))
    pub = k.public_key().public_bytes_raw()
    return base64.b64encode(k.private_bytes_raw()).decode(), base64.b64encode(pub).decode()


def wg_dump(netns: str) -> dict[str, dict[str, str]]:
    """`wg show all dump` of one namespace: {interface: {"psk": ..., "allowed": ...}}."""
    out: dict[str, dict[str, str]] = {}
    for line in sh(netns, "wg", "show", "all", "dump").splitlines():
        f = line.split("\t")
        if len(f) == 9:      # a peer line: iface pub psk endpoint allowed hs rx tx keepalive
            out[f[0]] = {"psk": f[2], "allowed": f[4], "handshake": f[5]}
    return out


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

    def _sides(self):
        return ((self.a, self.b, self.addr_a, self.addr_b, self.wan_b),
                (self.b, self.a, self.addr_b, self.addr_a, self.wan_a))

    def up_wg_quick(self, tmp: str) -> WgLink:
        """The docs/consumers.md snippet, as wg-quick runs it (no PresharedKey)."""
        for me, peer, mine, theirs, ep in self._sides():
            path = os.path.join(tempfile.mkdtemp(dir=tmp), f"{self.name}.conf")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(f"[Interface]\nPrivateKey = {me.priv}\nAddress = {mine}/24\n"
                        f"ListenPort = {self.port}\n\n[Peer]\nPublicKey = {peer.pub}\n"
                        f"Endpoint = {ep}:{self.port}\nAllowedIPs = {theirs}/32\n")
            sh(me.ns, "wg-quick", "up", path)
        return self

    def up_wg_set(self) -> WgLink:
        """The same device with `ip` and one `wg set` per side (faster)."""
        for me, peer, mine, theirs, ep in self._sides():
            ipbatch([f"link add {self.name} type wireguard",
                     f"addr add {mine}/24 dev {self.name}"], me.ns)
            sh(me.ns, "wg", "set", self.name, "private-key", "/dev/stdin", "listen-port",
               str(self.port), "peer", peer.pub, "endpoint", f"{ep}:{self.port}",
               "allowed-ips", f"{theirs}/32", input=me.priv + "\n")
            ipbatch([f"link set {self.name} up"], me.ns)
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

    def last_handshake(self, side: WgSide) -> float | None:
        other = self.b if side is self.a else self.a
        be = WireguardBackend(side.ns)
        try:
            return be.peer(self.name, parse_key(other.pub)).last_handshake
        finally:
            be.close()

    def drop_session(self, side: WgSide) -> None:
        """Force the next packet to need a fresh handshake: a device going
        down clears its session keys (drivers/net/wireguard/device.c wg_stop)."""
        ipbatch([f"link set {self.name} down", f"link set {self.name} up"], side.ns)


class Probe:
    """One UDP datagram from A to B over a link: did it arrive in time?"""

    def __init__(self, link: WgLink, port: int = 5201) -> None:
        self.link = link
        self.rx = open_socket_in_netns(socket.AF_INET, socket.SOCK_DGRAM, link.b.ns)
        self.rx.bind((str(link.addr_b), port))
        self.tx = open_socket_in_netns(socket.AF_INET, socket.SOCK_DGRAM, link.a.ns)
        self.port, self.n = port, 0

    def through(self, timeout: float) -> bool:
        self.n += 1
        token = f"probe {self.n}".encode()
        end = time.monotonic() + timeout
        next_send = 0.0
        while (now := time.monotonic()) < end:
            if now >= next_send:      # WireGuard queues while it handshakes; resend anyway
                next_send = now + 0.25
                # ENOKEY: no peer has allowed IPs for it (blocked)
                with contextlib.suppress(OSError):
                    self.tx.sendto(token, (str(self.link.addr_b), self.port))
            self.rx.settimeout(max(0.01, min(0.05, end - now)))
            try:
                if self.rx.recv(64) == token:
                    return True
            except TimeoutError:
                continue
        return False

    def close(self) -> None:
        self.rx.close()
        self.tx.close()
