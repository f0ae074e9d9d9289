"""The shared ground of bench/vs_strongswan.py: the two-namespace topology,
the NETLINK_XFRM watch that times completion, process CPU and RSS, and the
kernel floor (``ip -batch``).

Two gateway namespaces joined by a veth (192.0.2.1 -- 192.0.2.2); tunnel i
protects 10.64+i/256.i%256.0/24 <-> 10.128+i/256.i%256.0/24 (tunnel mode,
AES-256-GCM ESP). A third namespace holds the KME simulator, its own process
(``qkdgate kme-sim``), with one veth to each gateway (198.51.100.1 --
198.51.100.2 to a, 198.51.100.5 -- 198.51.100.6 to b), so the gateways reach
their KMEs without any Python of the bench in the path.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = ROOT / ".venv" / "bin"
GA, GB = "192.0.2.1", "192.0.2.2"
# the KME namespace's end of its link to gateway a / b (RFC 5737 TEST-NET-2)
KME_FOR_A, KME_FOR_B = "198.51.100.1", "198.51.100.5"

NETLINK_XFRM = 6
XFRMNLGRP_SA = 3
XFRM_MSG_NEWSA, XFRM_MSG_DELSA, XFRM_MSG_UPDSA = 0x10, 0x11, 0x1A
XFRMA_ALG_AEAD, XFRMA_SA = 18, 6
NLMSGHDR = struct.Struct("=IHHII")

PACKAGES = ("qkdgate", "gateway", "tunnels", "keymix", "adapters", "keyservice")


def precompile() -> bool:
    """Byte-compile the checkout's sources, as an installed package ships
    them. An editable install under PYTHONDONTWRITEBYTECODE (the lab guest
    exports it, and its view of the checkout is read-only) would otherwise
    compile every module at every daemon start: 0.7 s -> 2-4 s on the host,
    tens of seconds under TCG. False when the checkout is not writable (run
    ``--setup`` on the host, which calls this)."""
    r = subprocess.run([str(VENV_BIN / "python"), "-m", "compileall", "-q",
                        *(str(ROOT / p) for p in PACKAGES)],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0


def nets(i: int) -> tuple[str, str]:
    return (f"10.{64 + i // 256}.{i % 256}.0/24", f"10.{128 + i // 256}.{i % 256}.0/24")


def sh(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


# ------------------------------------------------------------------ topology

class Topology:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:4]
        self.a, self.b, self.k = f"vs{tag}a", f"vs{tag}b", f"vs{tag}k"

    def up(self) -> Topology:
        for ns in (self.a, self.b, self.k):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.a, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
           "netns", self.b)
        for ns, dev, me, peer_lan in ((self.a, "v0", GA, "10.128.0.0/9"),
                                      (self.b, "v1", GB, "10.64.0.0/10")):
            sh("ip", "-n", ns, "addr", "add", f"{me}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "route", "add", peer_lan, "via", GB if ns == self.a else GA)
        # the KME links: k0 -- ka (a), k1 -- kb (b), /30 each
        for kdev, gdev, ns, kaddr, gaddr in (("k0", "ka", self.a, KME_FOR_A, "198.51.100.2"),
                                             ("k1", "kb", self.b, KME_FOR_B, "198.51.100.6")):
            sh("ip", "-n", self.k, "link", "add", kdev, "type", "veth", "peer", "name", gdev,
               "netns", ns)
            sh("ip", "-n", self.k, "addr", "add", f"{kaddr}/30", "dev", kdev)
            sh("ip", "-n", ns, "addr", "add", f"{gaddr}/30", "dev", gdev)
            sh("ip", "-n", self.k, "link", "set", kdev, "up")
            sh("ip", "-n", ns, "link", "set", gdev, "up")
        # one inner address per side for the ping through tunnel 0
        sh("ip", "-n", self.a, "addr", "add", "10.64.0.1/32", "dev", "lo")
        sh("ip", "-n", self.b, "addr", "add", "10.128.0.1/32", "dev", "lo")
        return self

    def down(self) -> None:
        for ns in (self.a, self.b, self.k):
            sh("ip", "netns", "del", ns, check=False)

    def flush(self) -> None:
        for ns in (self.a, self.b):
            sh("ip", "-n", ns, "xfrm", "state", "flush", check=False)
            sh("ip", "-n", ns, "xfrm", "policy", "flush", check=False)


# ------------------------------------------------------------------ XFRM watch

class XfrmWatch:
    """NETLINK_XFRM SA notifications of one namespace, timestamped."""

    def __init__(self, netns: str, local: str) -> None:
        from qkdgate.tunnels.netlink import in_netns, set_rcvbuf
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        set_rcvbuf(self.sock, 32 << 20)
        self.sock.bind((0, 1 << (XFRMNLGRP_SA - 1)))
        self.local = socket.inet_aton(local)
        self.lock = threading.Lock()
        self.keyed: list[tuple[float, int, bool]] = []   # (time, spi, outbound) keyed SAs
        self.deleted: dict[int, float] = {}            # spi -> time
        self.overruns = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:       # ENOBUFS: notifications lost; the final dump checks
                self.overruns += 1
                continue
            now = time.monotonic()
            off = 0
            while off + 16 <= len(data):
                n, mtype, _f, _s, _p = NLMSGHDR.unpack_from(data, off)
                body = data[off + 16:off + n]
                off += (n + 3) & ~3
                if mtype in (XFRM_MSG_NEWSA, XFRM_MSG_UPDSA):
                    # xfrm_usersa_info: sel (56), id {daddr, spi, proto} (24), saddr
                    spi = struct.unpack_from(">I", body, 56 + 16)[0]
                    out = body[80:84] == self.local                    # IPv4 saddr
                    if _has_attr(body, 224, XFRMA_ALG_AEAD):           # larval: no algorithm
                        with self.lock:
                            self.keyed.append((now, spi, out))
                elif mtype == XFRM_MSG_DELSA:
                    spi = struct.unpack_from(">I", body, 16)[0]        # xfrm_usersa_id.spi
                    with self.lock:
                        self.deleted[spi] = now

    def mark(self) -> int:
        with self.lock:
            return len(self.keyed)

    def outbound_since(self, mark: int) -> set[int]:
        """The SPIs of the outbound keyed SAs notified after ``mark``."""
        with self.lock:
            return {spi for _t, spi, out in self.keyed[mark:] if out}

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def _has_attr(body: bytes, start: int, want: int) -> bool:
    off = start
    while off + 4 <= len(body):
        n, t = struct.unpack_from("=HH", body, off)
        if n < 4:
            return False
        if t & 0x3FFF == want:
            return True
        off += (n + 3) & ~3
    return False


def outbound_spis(netns: str, local: str) -> set[int]:
    out = sh("ip", "-n", netns, "xfrm", "state", "list").stdout
    spis = set()
    for m in re.finditer(r"^src (\S+) dst \S+\n\s+proto esp spi (0x[0-9a-f]+)", out, re.M):
        if m.group(1) == local:
            spis.add(int(m.group(2), 16))
    return spis


def keyed_count(netns: str) -> int:
    return sh("ip", "-n", netns, "xfrm", "state", "list").stdout.count("aead rfc4106")


def wait_done(watches: list[XfrmWatch], marks: list[int], n_new: int,
              old_out: list[set[int]], timeout: float,
              procs: Sequence[subprocess.Popen[bytes]] = ()) -> float | None:
    """The time the last required notification arrived, or None on timeout.
    Raises RuntimeError at once when one of ``procs`` (the daemons the wait
    depends on) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with status {p.returncode} "
                                   "(see its log)")
        last = 0.0
        ok = True
        for w, m, old in zip(watches, marks, old_out, strict=True):
            with w.lock:
                new = w.keyed[m:]
                if len(new) < n_new or not old <= w.deleted.keys():
                    ok = False
                    break
                last = max(last, new[n_new - 1][0], *(w.deleted[s] for s in old))
        if ok:
            return last
        time.sleep(0.005)
    return None


# ------------------------------------------------------------------ processes

def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


# ------------------------------------------------------------------ measurements

def kernel_floor(topo: Topology, n: int) -> float:
    """ip -batch adding then deleting 2N SAs and 3N policies on each gateway."""
    key = "0x" + os.urandom(36).hex()
    t_total = 0.0
    for ns, me, peer in ((topo.a, GA, GB), (topo.b, GB, GA)):
        add, delete = [], []
        for i in range(n):
            ln, rn = nets(i) if ns == topo.a else nets(i)[::-1]
            rq = 1000 + 16 * i
            for src, dst, spi, r in ((me, peer, 0xC1000000 + i, rq + 1),
                                     (peer, me, 0xC2000000 + i, rq)):
                add.append(f"xfrm state add src {src} dst {dst} proto esp spi {spi} reqid {r} "
                           f"mode tunnel replay-window 1024 flag esn "
                           f"aead 'rfc4106(gcm(aes))' {key} 128")
                delete.append(f"xfrm state delete src {src} dst {dst} proto esp spi {spi}")
            add.append(f"xfrm policy add src {ln} dst {rn} dir out tmpl src {me} dst {peer} "
                       f"proto esp reqid {rq + 1} mode tunnel")
            for d in ("in", "fwd"):
                add.append(f"xfrm policy add src {rn} dst {ln} dir {d} tmpl src {peer} "
                           f"dst {me} proto esp reqid {rq} mode tunnel")
            delete += [f"xfrm policy delete src {ln} dst {rn} dir out",
                       f"xfrm policy delete src {rn} dst {ln} dir in",
                       f"xfrm policy delete src {rn} dst {ln} dir fwd"]
        with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
            f.write("\n".join(add + delete) + "\n")
        try:
            t0 = time.perf_counter()
            sh("ip", "-n", ns, "-batch", f.name)
            t_total += time.perf_counter() - t0
        finally:
            os.unlink(f.name)
    return t_total
