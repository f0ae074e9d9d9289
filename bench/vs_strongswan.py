"""qkdgate beside strongSwan, same topology, same VM boot (issue 19).

    # once, on the host (the lab VM's root is read-only): Debian's
    # strongswan-charon + strongswan-swanctl + the openssl plugin for X25519
    # (libstrongswan-standard-plugins; no service left enabled) and vici
    .venv/bin/python bench/vs_strongswan.py --setup
    # then in the kernel lab
    bash lab/run.sh -- .venv/bin/python bench/vs_strongswan.py [--sizes 1,10,100] [--reps 3]

Two gateway namespaces joined by a veth (192.0.2.1 -- 192.0.2.2); tunnel i
protects 10.64+i/256.i%256.0/24 <-> 10.128+i/256.i%256.0/24 (tunnel mode,
AES-256-GCM ESP). strongSwan: one charon per namespace, one IKE_SA with N
CHILD_SAs (PSK, ``aes256gcm16-prfsha384-x25519``, log level 0; config in
bench/strongswan/), all N rekeys submitted over vici at once. qkdgate: the
real daemon (``qkdgate run``) per namespace, hybrid-required (ML-KEM +
X25519 + a QKD key from the KME simulator on every rekey), rekeys over the
control socket; while one peer carries at most 64 tunnels (until the
protocol work of issue 19 item 2 lands), N > 50 runs ceil(N/50) daemon pairs
of 50 tunnels each, as the issue measured.

Completion comes from NETLINK_XFRM notifications in both namespaces
(XFRMNLGRP_SA): a rekey of N tunnels is done when each side has seen 2N new
keyed SAs (larval SPI reservations carry no algorithm and are ignored) and
the deletion of every outbound SA that was current before. Establish: from
starting the daemons to 2N keyed SAs on each side. The kernel floor is
``ip -batch`` adding and deleting the same SA and policy set on both
gateways. Prints one table, median [min-max] over ``--reps``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = ROOT / ".venv" / "bin"
GA, GB = "192.0.2.1", "192.0.2.2"
PER_PAIR = 50             # tunnels per qkdgate daemon pair while a peer is capped at 64
APT = ("strongswan-charon", "strongswan-swanctl", "libstrongswan-standard-plugins")
CHARON = "/usr/lib/ipsec/charon"

NETLINK_XFRM = 6
XFRMNLGRP_SA = 3
XFRM_MSG_NEWSA, XFRM_MSG_DELSA, XFRM_MSG_UPDSA = 0x10, 0x11, 0x1A
XFRMA_ALG_AEAD, XFRMA_SA = 18, 6
NLMSGHDR = struct.Struct("=IHHII")


def nets(i: int) -> tuple[str, str]:
    return (f"10.{64 + i // 256}.{i % 256}.0/24", f"10.{128 + i // 256}.{i % 256}.0/24")


def sh(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


# ------------------------------------------------------------------ set-up

def setup_host() -> int:
    """Install the strongSwan packages (services neither started nor left
    enabled) and the vici client into the checkout's venv."""
    policy_rc = Path("/usr/sbin/policy-rc.d")
    had = policy_rc.exists()
    if not had:   # dpkg's convention: 101 = do not start services while installing
        policy_rc.write_text("#!/bin/sh\nexit 101\n")
        policy_rc.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *APT],
                       check=True, env=env)
    finally:
        if not had:
            policy_rc.unlink()
    for unit in ("strongswan-starter.service", "strongswan.service"):
        subprocess.run(["systemctl", "disable", unit], check=False, capture_output=True)
    subprocess.run([str(VENV_BIN / "pip"), "install", "vici==6.0.3", "py-spy==0.4.3"],
                   check=True)   # pyproject.toml extra "bench"
    print("bench set-up done: strongswan-charon, strongswan-swanctl (services disabled), vici")
    return 0


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
        from qkdgate.tunnels.netlink import in_netns
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)   # SO_RCVBUFFORCE
        self.sock.bind((0, 1 << (XFRMNLGRP_SA - 1)))
        self.local = socket.inet_aton(local)
        self.lock = threading.Lock()
        self.keyed: list[tuple[float, int]] = []       # (time, spi) new keyed SAs
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
                    spi = struct.unpack_from(">I", body, 56 + 16)[0]   # sel, id.daddr, id.spi
                    if _has_attr(body, 224, XFRMA_ALG_AEAD):           # larval: no algorithm
                        with self.lock:
                            self.keyed.append((now, spi))
                elif mtype == XFRM_MSG_DELSA:
                    spi = struct.unpack_from(">I", body, 16)[0]        # xfrm_usersa_id.spi
                    with self.lock:
                        self.deleted[spi] = now

    def mark(self) -> int:
        with self.lock:
            return len(self.keyed)

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
              old_out: list[set[int]], timeout: float) -> float | None:
    """The time the last required notification arrived, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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


class Contender:
    name = ""
    pids: list[int]

    def start(self, n: int) -> None: ...
    def rekey_all(self) -> None: ...
    def rekey_one(self) -> None: ...
    def stop(self) -> None: ...


class StrongSwan(Contender):
    name = "strongSwan"

    def __init__(self, topo: Topology, work: Path, socks: Path) -> None:
        self.topo, self.work, self.socks_dir = topo, work, socks
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids = []
        self.n = 0

    def _conf(self, side: str, n: int) -> tuple[str, Path]:
        vici = self.socks_dir / f"charon-{side}.vici"
        conf = (HERE / "strongswan" / "strongswan.conf.in").read_text()
        conf = conf.replace("@VICI@", str(vici)) \
            .replace("@LOG@", str(self.work / f"charon-{side}.log"))
        cpath = self.work / f"strongswan-{side}.conf"
        cpath.write_text(conf)
        child = (HERE / "strongswan" / "child.conf.in").read_text()
        local, remote = (GA, GB) if side == "a" else (GB, GA)
        children = []
        for i in range(n):
            lnet, rnet = nets(i) if side == "a" else nets(i)[::-1]
            # the initiator side starts every child as soon as its config loads
            children.append(child.replace("@I@", str(i)).replace("@LNET@", lnet)
                            .replace("@RNET@", rnet)
                            .replace("@START@", "start" if side == "a" else "none"))
        sw = (HERE / "strongswan" / "swanctl.conf.in").read_text()
        sw = sw.replace("@LOCAL@", local).replace("@REMOTE@", remote) \
            .replace("@CHILDREN@", "".join(children))
        (self.work / f"swanctl-{side}.conf").write_text(sw)
        return str(cpath), vici

    def start(self, n: int) -> None:
        self.n = n
        self.vici: dict[str, Path] = {}
        for side, ns in (("a", self.topo.a), ("b", self.topo.b)):
            cpath, vici = self._conf(side, n)
            self.vici[side] = vici
            vici.unlink(missing_ok=True)      # a previous run's socket: wait for this one
            env = {**os.environ, "STRONGSWAN_CONF": cpath}
            p = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "-m", "sh", "-c",
                                  f"mount -t tmpfs tmpfs /run && exec {CHARON}"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(p)
        for side in ("a", "b"):
            _wait_for(lambda s=side: self.vici[s].exists(), 300, f"charon {side} vici socket")
        self.pids = [_child_pid(p.pid, "charon") for p in self.procs]
        # responder first: the initiator starts all N children (start_action =
        # start) the moment its configuration is loaded
        for side in ("b", "a"):
            sh(shutil.which("swanctl") or "/usr/sbin/swanctl", "--load-all", "--noprompt",
               "--file", str(self.work / f"swanctl-{side}.conf"),
               "--uri", f"unix://{self.vici[side]}")

    def _session(self, side: str):  # type: ignore[no-untyped-def]
        import vici
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(self.vici[side]))
        return vici.Session(sock)

    def rekey_all(self) -> None:
        s = self._session("a")
        for i in range(self.n):
            s.rekey({"child": f"t{i}"})

    def rekey_one(self) -> None:
        self._session("a").rekey({"child": "t0"})

    def stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.procs, self.pids = [], []


class Qkdgate(Contender):
    name = "qkdgate"

    def __init__(self, topo: Topology, work: Path, socks: Path) -> None:
        self.topo, self.work, self.socks_dir = topo, work, socks
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids = []
        self.socks: list[str] = []
        self.first: list[str] = []
        self._kme_up = False
        self.log_level = "warning"

    def _kme(self) -> tuple[object, object]:
        if self._kme_up:
            return self.eps   # type: ignore[return-value]
        from qkdgate.adapters.kmesim.server import KmeSimulator
        from qkdgate.gateway.demo import net as dn
        from qkdgate.gateway.demo.config import KmeEndpoint, write_identities
        self.kme = dn.LoopThread(self.topo.k, "kme").start()
        listeners = [dn.loopback_listener(self.topo.a), dn.loopback_listener(self.topo.b)]
        ports = [s.getsockname()[1] for s in listeners]
        ready = threading.Event()
        self._kme_stop: asyncio.Event | None = None
        holder: dict[str, object] = {}

        async def main() -> None:
            self._kme_stop = asyncio.Event()
            async with KmeSimulator.start(self.work / "kme", prefill=5000,
                                          max_key_count=100000) as sim:
                fwds = [dn.TcpForwarder(s, ("127.0.0.1", sim.ports[k]))
                        for s, k in zip(listeners, ("KME-A", "KME-B"), strict=True)]
                for f in fwds:
                    await f.start()
                holder["sim"] = sim
                ready.set()
                await self._kme_stop.wait()
        self._kme_fut = self.kme.submit(main())
        if not ready.wait(60):
            raise RuntimeError("KME simulator did not start")
        sim = holder["sim"]
        eps = []
        for sae, port in (("SAE-A", ports[0]), ("SAE-B", ports[1])):
            c = sim.credentials(sae)   # type: ignore[attr-defined]
            eps.append(KmeEndpoint(f"https://127.0.0.1:{port}", c.kme_id, str(c.cert),
                                   str(c.key), str(c.ca)))
        write_identities(self.work)
        self.eps = (eps[0], eps[1])
        self._kme_up = True
        return self.eps

    def _yaml(self, side: str, pair: int, first: int, count: int, kme: object) -> Path:
        a = side == "a"
        me, peer = ("gw-a", "gw-b") if a else ("gw-b", "gw-a")
        mine, theirs = (GA, GB) if a else (GB, GA)
        port = 4600 + pair
        d = self.work / f"{me}-{pair}"
        d.mkdir(exist_ok=True)
        tunnels = []
        for i in range(first, first + count):
            ln, rn = nets(i) if a else nets(i)[::-1]
            tunnels.append(f"""  - name: t{i}
    peer: {peer}
    type: ipsec
    policy: hybrid-required
    ipsec: {{local_address: {mine}, remote_address: {theirs}, local_subnets: [{ln}],
            remote_subnets: [{rn}], reqid: {1000 + 16 * i}}}
    rekey: {{interval: 3600s, soft_lifetime: 7000s, hard_lifetime: 7200s, grace: 50ms}}
""")
        text = f"""version: 1
gateway:
  name: {me}
  identity: {self.work}/{me}.identity
  listen: {{address: {mine}, port: {port}}}
  state_dir: {d}/state
  control_socket: {self.socks_dir}/{me}-{pair}.sock
peers:
  - name: {peer}
    address: {theirs}
    port: {port}
    identities: [{self.work}/{peer}.pub]
    qkd:
      key_source: kme
      role: {"master" if a else "slave"}
      local_sae_id: {"SAE-A" if a else "SAE-B"}
      peer_sae_id: {"SAE-B" if a else "SAE-A"}
key_sources:
  - name: kme
    kind: etsi014
    url: {kme.url}
    kme_id: {kme.kme_id}
    timeout: 5s
    retries: 1
    tls: {{cert: {kme.cert}, key: {kme.key}, ca: {kme.ca}}}
tunnels:
{"".join(tunnels)}telemetry:
  log: {{level: warning}}
"""
        path = d / "gw.yaml"
        path.write_text(text)
        os.chmod(path, 0o600)
        return path

    def start(self, n: int) -> None:
        kme_a, kme_b = self._kme()
        pairs = math.ceil(n / PER_PAIR)
        self.socks, self.first = [], []
        for j in range(pairs):
            first, count = j * PER_PAIR, min(PER_PAIR, n - j * PER_PAIR)
            for side, ns, kme in (("a", self.topo.a, kme_a), ("b", self.topo.b, kme_b)):
                cfg = self._yaml(side, j, first, count, kme)
                with open(cfg.parent / "daemon.log", "w") as log:
                    p = subprocess.Popen(["ip", "netns", "exec", ns, str(VENV_BIN / "qkdgate"),
                                          "run", "-c", str(cfg), "--teardown-on-exit",
                                          "--log-level", self.log_level],
                                         stdout=log, stderr=subprocess.STDOUT)
                self.procs.append(p)
                if side == "a":
                    self.socks.append(str(self.socks_dir / f"{me_of(side)}-{j}.sock"))
                    self.first.append(f"t{first}")
        self.pids = [p.pid for p in self.procs]

    def _rekey(self, sock: str, tunnel: str) -> None:
        from qkdgate.gateway.daemon.control import request
        request(sock, "rekey", tunnel=tunnel, timeout=60)

    def rekey_all(self) -> None:
        # one exchange per peer keys all of its tunnels: one request per daemon pair
        threads = [threading.Thread(target=self._rekey, args=(s, t))
                   for s, t in zip(self.socks, self.first, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def rekey_one(self) -> None:
        self._rekey(self.socks[0], self.first[0])

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs, self.pids = [], []

    def close(self) -> None:
        if self._kme_up and self._kme_stop is not None and self.kme.loop is not None:
            self.kme.loop.call_soon_threadsafe(self._kme_stop.set)
            with contextlib.suppress(Exception):
                self._kme_fut.result(10)
            self.kme.stop()


def me_of(side: str) -> str:
    return "gw-a" if side == "a" else "gw-b"


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _child_pid(pid: int, name: str) -> int:
    """The charon process under ip netns exec / unshare / sh (exec'd)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                if comm == name and _descends(int(entry), pid):
                    return int(entry)
        time.sleep(0.05)
    return pid


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


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


class Run:
    """One contender at one size: establish, rekey-all reps, CPU, RSS."""

    def __init__(self, topo: Topology, c: Contender, n: int, reps: int) -> None:
        self.topo, self.c, self.n, self.reps = topo, c, n, reps
        self.watches = [XfrmWatch(topo.a, GA), XfrmWatch(topo.b, GB)]
        self.establish = math.nan
        self.rekeys: list[float] = []
        self.cpu_per_rekey: list[float] = []
        self.rss = math.nan

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.c.stop()
        for w in self.watches:
            w.close()
        self.topo.flush()

    def go(self, timeout: float) -> None:
        marks = [w.mark() for w in self.watches]
        t0 = time.monotonic()
        self.c.start(self.n)
        done = wait_done(self.watches, marks, 2 * self.n, [set(), set()], timeout)
        if done is None:
            raise RuntimeError(f"{self.c.name}: {self.n} tunnels not established in {timeout} s"
                               f" (SAs: {keyed_count(self.topo.a)}/{keyed_count(self.topo.b)})")
        self.establish = done - t0
        time.sleep(0.5)
        for _ in range(self.reps):
            self.rekeys.append(self.rekey_all(timeout))
        self.rss = rss_mb(self.c.pids)

    def rekey_all(self, timeout: float) -> float:
        old = [outbound_spis(self.topo.a, GA), outbound_spis(self.topo.b, GB)]
        marks = [w.mark() for w in self.watches]
        cpu0 = cpu_seconds(self.c.pids)
        t0 = time.monotonic()
        self.c.rekey_all()
        done = wait_done(self.watches, marks, 2 * self.n, old, timeout)
        if done is None:
            raise RuntimeError(f"{self.c.name}: rekey of {self.n} tunnel(s) not done in "
                               f"{timeout} s")
        self.cpu_per_rekey.append(cpu_seconds(self.c.pids) - cpu0)
        return done - t0

    def loss(self, rekeys: int, timeout: float) -> tuple[int, int]:
        """Packets sent and lost by ping -i 0.002 through tunnel 0 across
        ``rekeys`` back-to-back rekeys of tunnel 0."""
        p = subprocess.Popen(["ip", "netns", "exec", self.topo.a, "ping", "-q", "-i", "0.002",
                              "-W", "1", "-I", "10.64.0.1", "10.128.0.1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        for _ in range(rekeys):
            marks = [w.mark() for w in self.watches]
            self.c.rekey_one()
            if wait_done(self.watches, marks, 2, [set(), set()], timeout) is None:
                break
            time.sleep(0.05)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(10)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if not m:
            return 0, 0
        sent, got = int(m.group(1)), int(m.group(2))
        return sent, sent - got


def profile(r: Run, folder: Path, timeout: float) -> None:
    """py-spy (sampling, 250 Hz) on the first daemon pair during one rekey-all."""
    folder.mkdir(parents=True, exist_ok=True)
    spy = str(VENV_BIN / "py-spy")
    procs = [subprocess.Popen([spy, "record", "--rate", "250", "--format", "raw", "--nonblocking",
                               "-o", str(folder / f"rekey-{r.n}-{side}.txt"), "--pid", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for side, pid in zip("ab", r.c.pids[:2], strict=False)]
    time.sleep(2.0)        # py-spy attaches
    took = r.rekey_all(timeout)
    r.cpu_per_rekey.pop()  # not one of the measured reps
    time.sleep(0.5)
    for p in procs:
        p.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(30)
    print(f"  profile: rekey-all of {r.n} under py-spy took {took:.3f} s; stacks in {folder}")


def fmt(xs: list[float], unit: str = "s") -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f} {unit}"
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}] {unit}"


def ratio(a: list[float], b: list[float]) -> str:
    a = [x for x in a if not math.isnan(x)]
    b = [x for x in b if not math.isnan(x)]
    if not a or not b:
        return "-"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", action="store_true", help="install strongSwan + vici (host)")
    ap.add_argument("--sizes", default="1,10,100,500,1000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loss-rekeys", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--only", choices=("strongswan", "qkdgate"), default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--daemon-log", default="warning", help="qkdgate daemons' log level")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="after the reps at the largest size, py-spy one more qkdgate "
                         "rekey-all (both daemons of the first pair; collapsed stacks in DIR)")
    args = ap.parse_args()
    if args.setup:
        return setup_host()
    missing = [x for x in (CHARON, shutil.which("swanctl") or "/usr/sbin/swanctl")
               if not os.path.exists(x)]
    if missing and args.only != "qkdgate":
        print(f"missing {missing}: run `.venv/bin/python bench/vs_strongswan.py --setup` "
              "on the host first", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",")]
    topo = Topology().up()
    # in the lab, keep the run directory (daemon and charon logs) beside the VM's output
    work = Path(tempfile.mkdtemp(prefix="vs-", dir=os.environ.get("LAB_OUT")))
    # unix sockets need a local file system (LAB_OUT is the VM's 9p share)
    socks = Path(tempfile.mkdtemp(prefix="vs-sock-"))
    os.chmod(work, 0o700)
    results: dict[tuple[str, int], Run] = {}
    floors: dict[int, list[float]] = {}
    loss: dict[str, tuple[int, int]] = {}
    q = Qkdgate(topo, work, socks)
    q.log_level = args.daemon_log
    contenders: list[Contender] = []
    if args.only != "qkdgate":
        contenders.append(StrongSwan(topo, work, socks))
    if args.only != "strongswan":
        contenders.append(q)
    try:
        for n in sizes:
            try:
                floors[n] = [kernel_floor(topo, n) for _ in range(args.reps)]
            except subprocess.CalledProcessError as exc:   # e.g. a host kernel without ESP
                print(f"kernel floor N={n}: ip -batch failed: {exc.stderr.strip()[:200]}",
                      file=sys.stderr)
                topo.flush()
            for c in contenders:
                with Run(topo, c, n, args.reps) as r:
                    r.go(args.timeout)
                    results[(c.name, n)] = r
                    if n == sizes[0] and args.loss_rekeys:
                        loss[c.name] = r.loss(args.loss_rekeys, args.timeout)
                    if args.profile and c is q and n == max(sizes):
                        profile(r, Path(args.profile), args.timeout)
                print(f"  done: {c.name} N={n}: establish {r.establish:.3f} s, "
                      f"rekey-all {fmt(r.rekeys)}", flush=True)
    finally:
        q.close()
        topo.down()
        shutil.rmtree(socks, ignore_errors=True)
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(sizes, results, floors, loss, args)
    return 0


def report(sizes: list[int], results: dict[tuple[str, int], Run], floors: dict[int, list[float]],
           loss: dict[str, tuple[int, int]], args: argparse.Namespace) -> None:
    kver = os.uname().release
    print(f"\nqkdgate vs strongSwan, kernel {kver}, {os.cpu_count()} CPU(s), "
          f"median [min-max] of {args.reps} rep(s); qkdgate: "
          f"{PER_PAIR} tunnels per daemon pair while a peer carries at most 64")
    print("| N | what | strongSwan | qkdgate | strongSwan/qkdgate | kernel floor (ip -batch) |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        s, q = results.get(("strongSwan", n)), results.get(("qkdgate", n))
        sr = s.rekeys if s else []
        qr = q.rekeys if q else []
        print(f"| {n} | rekey all | {fmt(sr)} | {fmt(qr)} | {ratio(sr, qr)} | "
              f"{fmt(floors.get(n, []))} |")
        se = [s.establish] if s else []
        qe = [q.establish] if q else []
        print(f"| {n} | establish | {fmt(se)} | {fmt(qe)} | {ratio(se, qe)} | |")
    big = max(sizes)
    s, q = results.get(("strongSwan", big)), results.get(("qkdgate", big))
    rate = [(big / statistics.median(r.rekeys)) if r and r.rekeys else math.nan for r in (s, q)]
    print(f"| {big} | tunnel-rekeys/s (rekey all) | {rate[0]:.0f} | {rate[1]:.0f} | "
          f"{rate[0] / rate[1]:.2f} | |")
    cpu = [r.cpu_per_rekey[-args.reps:] if r else [] for r in (s, q)]
    print(f"| {big} | CPU per rekey-all (both daemons) | {fmt(cpu[0], 'CPU-s')} | "
          f"{fmt(cpu[1], 'CPU-s')} | {ratio(cpu[0], cpu[1])} | |")
    rss = [r.rss if r else math.nan for r in (s, q)]
    print(f"| {big} | RSS after the rekeys (both sides) | {rss[0]:.0f} MB | {rss[1]:.0f} MB | "
          f"{rss[0] / rss[1]:.2f} | |")
    for name in ("strongSwan", "qkdgate"):
        if name in loss:
            sent, lost = loss[name]
            print(f"loss, {name}: {lost} of {sent} packets (ping -i 0.002) across "
                  f"{args.loss_rekeys} back-to-back rekeys of one tunnel (N={sizes[0]})")


if __name__ == "__main__":
    sys.exit(main())
