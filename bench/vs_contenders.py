"""The two contenders of bench/vs_strongswan.py: strongSwan (one charon per
gateway namespace over vici, config in bench/strongswan/) and qkdgate (the
real daemon per namespace, keyed from the KME simulator, driven over its
control socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vs_topology import GA, GB, HERE, VENV_BIN, Topology, nets, sh  # bench/ is not a package

CHARON = "/usr/lib/ipsec/charon"


class Contender:
    name = ""
    pids: list[int]

    def start(self, n: int) -> None: ...
    def rekey_all(self) -> None: ...
    def rekey_one(self) -> None: ...
    def stop(self) -> None: ...

    def settle(self, timeout: float) -> None:
        """After establish: wait until the contender itself reports every
        tunnel up (the kernel can hold all SAs before the daemon's own
        bookkeeping has caught up)."""


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

    def _installed(self) -> set[str]:
        names = set()
        for ike in self._session("a").list_sas():
            for sa in ike.values():
                for child in sa.get("child-sas", {}).values():
                    if child.get("state") == b"INSTALLED":
                        names.add(child["name"].decode())
        return names

    def settle(self, timeout: float) -> None:
        want = {f"t{i}" for i in range(self.n)}
        _wait_for(lambda: want <= self._installed(), timeout, "every CHILD_SA INSTALLED")

    def rekey_all(self) -> None:
        import vici
        s = self._session("a")
        failed = []
        for i in range(self.n):
            try:
                s.rekey({"child": f"t{i}"})
            except vici.exception.CommandException:
                failed.append(f"t{i}")
        if failed:
            raise RuntimeError(f"strongSwan refused the rekey of {len(failed)} CHILD_SA(s), "
                               f"e.g. {failed[:3]}")

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
        self.sock = ""
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

    def _yaml(self, side: str, n: int, kme: object) -> Path:
        a = side == "a"
        me, peer = ("gw-a", "gw-b") if a else ("gw-b", "gw-a")
        mine, theirs = (GA, GB) if a else (GB, GA)
        port = 4600
        d = self.work / me
        d.mkdir(exist_ok=True)
        tunnels = []
        for i in range(n):
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
  control_socket: {self.socks_dir}/{me}.sock
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
        """One daemon per namespace, one peer carrying all N tunnels (up to
        4,096 per peer in one exchange: docs/protocol.md)."""
        kme_a, kme_b = self._kme()
        for side, ns, kme in (("a", self.topo.a, kme_a), ("b", self.topo.b, kme_b)):
            cfg = self._yaml(side, n, kme)
            with open(cfg.parent / "daemon.log", "w") as log:
                p = subprocess.Popen(["ip", "netns", "exec", ns, str(VENV_BIN / "qkdgate"),
                                      "run", "-c", str(cfg), "--teardown-on-exit",
                                      "--log-level", self.log_level],
                                     stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(p)
        self.sock = str(self.socks_dir / "gw-a.sock")
        self.pids = [p.pid for p in self.procs]

    def settle(self, timeout: float) -> None:
        # a rekey asked for while the first exchange is still ending is
        # coalesced into it (PeerSession.initiate_rekey)
        from qkdgate.gateway.daemon.control import request

        def up() -> bool:
            return all(p["state"] == "established" for side in ("gw-a", "gw-b")
                       for p in request(str(self.socks_dir / f"{side}.sock"), "status",
                                        timeout=60)["peers"])
        _wait_for(up, timeout, "both daemons' peer established")

    def _rekey(self) -> None:
        from qkdgate.gateway.daemon.control import request
        request(self.sock, "rekey", tunnel="t0", timeout=60)

    def rekey_all(self) -> None:
        # one exchange per peer keys all of its tunnels: one request
        self._rekey()

    def rekey_one(self) -> None:
        self._rekey()

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
