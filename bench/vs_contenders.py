"""The two contenders of bench/vs_strongswan.py: strongSwan (one charon per
gateway namespace over vici, config in bench/strongswan/) and qkdgate (the
real daemon per namespace, keyed from the KME simulator, driven over its
control socket).

The KME simulator is its own process (``qkdgate kme-sim`` in the KME
namespace, reached over the KME veths of vs_topology): when it ran in a
thread of the bench, beside the threads that parse the NETLINK_XFRM
notifications, a starved VM made the daemons wait on the bench's Python
(issue 19, second round: "KME enc_keys: no answer within 5.0 s", daemons
idle under py-spy).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from vs_topology import (  # bench/ is not a package
    GA,
    GB,
    HERE,
    KME_FOR_A,
    KME_FOR_B,
    VENV_BIN,
    Topology,
    nets,
    sh,
)

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
        self.cprofile: Path | None = None   # bench/vs_strongswan.py --cprofile DIR

    def _kme(self) -> tuple[object, object]:
        """Start ``qkdgate kme-sim`` in the KME namespace (once) and return
        how gw-a and gw-b reach KME-A and KME-B."""
        if self._kme_up:
            return self.eps   # type: ignore[return-value]
        from qkdgate.gateway.demo.config import KmeEndpoint, write_identities
        log = open(self.work / "kme-sim.log", "w")   # noqa: SIM115 -- the process's stderr
        # every address of the KME namespace: its two veths (and lo) only
        anywhere = "0.0.0.0"   # noqa: S104
        self.kme_proc = subprocess.Popen(
            ["ip", "netns", "exec", self.topo.k, str(VENV_BIN / "qkdgate"), "kme-sim",
             "--state-dir", str(self.work / "kme"), "--host", anywhere, "--port", "0",
             "--port-004", "-1", "--admin-port", "-1", "--prefill", "5000",
             "--max-key-count", "100000"],
            stdout=subprocess.PIPE, stderr=log)
        log.close()
        banner = _banner(self.kme_proc, 120)
        eps = []
        for sae, kme, addr in (("SAE-A", "KME-A", KME_FOR_A), ("SAE-B", "KME-B", KME_FOR_B)):
            port = re.search(rf"^  {kme}: https://[^:]+:(\d+) ", banner, re.M)
            cred = re.search(rf"^  {sae}: cert (\S+)\n\s+key  (\S+)$", banner, re.M)
            ca = re.search(r"^  demo CA: +(\S+)$", banner, re.M)
            if port is None or cred is None or ca is None:
                raise RuntimeError(f"kme-sim banner not understood:\n{banner}")
            eps.append(KmeEndpoint(f"https://{addr}:{port.group(1)}", kme, cred.group(1),
                                   cred.group(2), ca.group(1)))
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
    # the simulator's certificates name localhost; it listens on the KME veth
    options: {{server_hostname: localhost}}
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
            cmd = [str(VENV_BIN / "qkdgate")]
            if self.cprofile is not None:   # SIGUSR2 toggles a cProfile (cprofile_daemon.py)
                cmd = [str(VENV_BIN / "python"), str(HERE / "cprofile_daemon.py"),
                       str(self.cprofile / f"gw-{side}-n{n}")]
            with open(cfg.parent / "daemon.log", "w") as log:
                p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd,
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
        if self._kme_up:
            self.kme_proc.terminate()   # ip netns exec execs kme-sim: the same pid
            try:
                self.kme_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kme_proc.kill()
                self.kme_proc.wait(10)
            self._kme_up = False


def _banner(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """kme-sim's start-up banner (it ends with "Try:", a curl line and a
    blank line, written with one flush)."""
    import select
    if proc.stdout is None:
        raise RuntimeError("kme-sim started without a stdout pipe")   # our bug
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        if re.search(rb"\nTry:\n[^\n]*\n\n", buf):
            return buf.decode()
    raise RuntimeError(f"kme-sim did not start within {timeout} s (exit {proc.poll()}):\n"
                       + buf.decode(errors="replace"))


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
