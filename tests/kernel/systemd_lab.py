"""systemd as PID 1 of a container in the lab VM, for test_systemd.py.

Theory of operation: lab/systemd-root.sh builds (on the host, cached) a
Debian 12 directory image with qkdgate installed the README's way, plus a
package directory per checkout content. :class:`Container` boots that image
with ``systemd-nspawn --boot --volatile=overlay`` (the image is read-only
over 9p; writes go to a tmpfs layer) inside an existing network namespace,
binds this checkout's package over the installed one, the shipped unit file
unchanged, and a directory of ours as /etc/qkdgate. The VM's init is not
systemd, so nspawn neither registers with machined nor makes a scope
(``--register=no --keep-unit``); commands run in the container through
``nsenter`` into its PID 1's namespaces, found by the UUID we gave it.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAB_HOME = Path(os.environ.get("LAB_HOME", "/var/lib/qkdgate-lab"))
ROOTFS = LAB_HOME / "systemd-root" / "rootfs"
SQUASHFS = LAB_HOME / "systemd-root" / "rootfs.squashfs"
SITE = "/opt/qkdgate/lib/python3.11/site-packages"


def pkg_dir() -> Path:
    """This checkout's package, built by lab/systemd-root.sh before the VM booted."""
    out = subprocess.run(["bash", str(ROOT / "lab/systemd-root.sh"), "--pkg-dir"],
                         capture_output=True, text=True, check=True).stdout.strip()
    p = Path(out)
    if not (p / ".done").exists() or not SQUASHFS.exists():
        raise RuntimeError(f"no systemd image for this checkout ({p}): run lab/systemd-root.sh "
                           "on the host (tools/test-kernel.sh does)")
    return p


def ensure_cgroup2() -> None:
    """nspawn needs a cgroup hierarchy; virtme-ng's init may not mount one."""
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True)


class Container:
    def __init__(self, netns: str, etc_dir: Path, log_path: Path) -> None:
        self.netns, self.etc_dir, self.log_path = netns, etc_dir, log_path
        self.uuid = uuid.uuid4()
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.root: Path | None = None

    def start(self, timeout: float = 180.0) -> float:
        """Boot; return seconds until systemd reported the system running."""
        ensure_cgroup2()
        pkg = pkg_dir()
        # the image through a loop device: cached in the guest's RAM, not 9p
        self.root = Path(tempfile.mkdtemp(prefix="qkdgate-sysroot-"))
        subprocess.run(["modprobe", "-a", "loop", "squashfs"], check=True)
        subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(SQUASHFS), str(self.root)],
                       check=True)
        binds = [f"--bind={self.etc_dir}:/etc/qkdgate",
                 f"--bind-ro={pkg}/qkdgate:{SITE}/qkdgate",
                 f"--bind-ro={ROOT}/systemd/qkdgate.service:/etc/systemd/system/qkdgate.service"]
        cmd = ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
               "-D", str(self.root), "--volatile=overlay", f"--uuid={self.uuid}",
               f"--machine=qkdgate-{str(self.uuid)[:8]}", "--console=read-only",
               f"--network-namespace-path=/run/netns/{self.netns}",
               # nspawn keeps CAP_NET_ADMIN only for a network namespace it
               # made itself; without it every XFRM request failed with
               # EPERM (the unit then bounds the daemon to it alone)
               "--capability=CAP_NET_ADMIN", *binds]
        t0 = time.monotonic()
        log = open(self.log_path, "wb")   # noqa: SIM115  kept open for the container's life
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"container PID 1 not found:\n{self.tail()}")
            self.leader = self._find_leader()
            time.sleep(0.2)
        while True:
            r = self.run("systemctl", "is-system-running", "--wait", check=False,
                         timeout=max(5.0, deadline - time.monotonic()))
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise RuntimeError(f"container boot: {state!r} {r.stderr}\n{self.tail()}")
            time.sleep(0.5)     # the manager's socket is not up yet

    def _find_leader(self) -> int:
        want = f"container_uuid={self.uuid}".encode()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{d}/status") as f:
                    nspid = next(l for l in f if l.startswith("NSpid:")).split()[1:]
            except (OSError, StopIteration):
                continue
            if want in env and nspid[-1] == "1":
                return int(d)
        return 0

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def run(self, *cmd: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all of PID 1's namespaces)."""
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "-r", "-w",
                            "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                            "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", *cmd],
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"-p{p}" for p in props)).stdout
        return dict(l.split("=", 1) for l in out.splitlines() if "=" in l)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.leader:
                self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.root is not None:
            subprocess.run(["umount", str(self.root)], check=False)
            os.rmdir(self.root)
            self.root = None


# ------------------------------------------------------------ the kernel's record

# include/uapi/linux/xfrm.h: XFRMGRP_EXPIRE 2, XFRMGRP_SA 4, XFRMGRP_POLICY 8.
# Never XFRMGRP_ACQUIRE (1): with a listener on it, a packet meeting a
# required template without an SA makes the kernel add a larval (ACQ)
# state and ask us for keys (net/xfrm/xfrm_state.c xfrm_state_find ->
# km_query), which would change the state under test.
XFRMGRP_EXPIRE, XFRMGRP_SA, XFRMGRP_POLICY = 2, 4, 8


@dataclass(frozen=True)
class XfrmEvent:
    """One XFRM notification as the kernel multicast it (in kernel order)."""

    t: float            # time.monotonic() when received
    kind: str           # add (NEWSA/UPDSA), del (DELSA), expire (hard EXPIRE), soft, policy-*
    spi: int = 0
    dst: bytes = b""
    reqid: int = 0
    keyed: bool = False  # carried an algorithm: a real SA, not a larval (ALLOCSPI/ACQ) one

    def line(self) -> str:
        if self.kind.startswith("policy") or self.kind == "flush":
            return f"{self.t:.3f} {self.kind}"
        what = f" {'keyed' if self.keyed else 'larval'}" if self.kind in ("add", "del") else ""
        return f"{self.t:.3f} {self.kind} spi={self.spi:#010x} reqid={self.reqid}{what}"


class XfrmMonitor:
    """``ip xfrm monitor sa policy`` as a thread: every SA and policy
    notification of one namespace, timestamped, in the kernel's order."""

    def __init__(self, netns: str) -> None:
        from qkdgate.tunnels.netlink import in_netns, set_rcvbuf
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)   # NETLINK_XFRM
        set_rcvbuf(self.sock, 4 << 20)
        self.sock.bind((0, XFRMGRP_EXPIRE | XFRMGRP_SA | XFRMGRP_POLICY))
        self.sock.settimeout(0.2)
        self.events: list[XfrmEvent] = []
        self.overrun = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from qkdgate.tunnels import xfrm_msg as m
        from qkdgate.tunnels.netlink import parse_nlas
        algs = (m.XFRMA_ALG_AEAD, m.XFRMA_ALG_CRYPT, m.XFRMA_ALG_AUTH, m.XFRMA_ALG_AUTH_TRUNC)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:         # ENOBUFS: we lost notifications; say so
                self.overrun = True
                continue
            t = time.monotonic()
            off = 0
            while off + 16 <= len(data):
                n, mtype = struct.unpack_from("=IH", data, off)
                if n < 16:
                    break
                body = data[off + 16:off + n]
                off += (n + 3) & ~3
                if mtype in (m.XFRM_MSG_NEWSA, m.XFRM_MSG_UPDSA):
                    v = m.USERSA_INFO.unpack(body)
                    attrs = parse_nlas(body, m.USERSA_INFO.size)
                    self.events.append(XfrmEvent(t, "add", m.num(v, "id.spi"),
                                                 m.raw(v, "id.daddr"), m.num(v, "reqid"),
                                                 any(a in attrs for a in algs)))
                elif mtype == m.XFRM_MSG_DELSA:
                    # xfrm_notify_sa: xfrm_usersa_id, XFRMA_SA (xfrm_usersa_info),
                    # then the state's attributes, algorithms included
                    attrs = parse_nlas(body, m.USERSA_ID.size)
                    v = m.USERSA_INFO.unpack(attrs[m.XFRMA_SA])
                    self.events.append(XfrmEvent(t, "del", m.num(v, "id.spi"),
                                                 m.raw(v, "id.daddr"), m.num(v, "reqid"),
                                                 any(a in attrs for a in algs)))
                elif mtype == m.XFRM_MSG_EXPIRE:
                    v = m.USERSA_INFO.unpack(body)
                    hard = body[m.USERSA_INFO.size]
                    self.events.append(XfrmEvent(t, "expire" if hard else "soft",
                                                 m.num(v, "id.spi"), m.raw(v, "id.daddr"),
                                                 m.num(v, "reqid")))
                elif mtype == m.XFRM_MSG_FLUSHSA:
                    self.events.append(XfrmEvent(t, "flush"))
                elif mtype in (m.XFRM_MSG_NEWPOLICY, m.XFRM_MSG_UPDPOLICY):
                    self.events.append(XfrmEvent(t, "policy-add"))
                elif mtype in (m.XFRM_MSG_DELPOLICY, m.XFRM_MSG_FLUSHPOLICY):
                    self.events.append(XfrmEvent(t, "policy-del"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def keyed_spans(self, start: set[tuple[bytes, int]], t_from: float
                    ) -> tuple[float | None, float | None]:
        """Replay the events on ``start`` (the keyed SAs of a dump taken
        after the monitor subscribed). Return (when the keyed set first
        became empty after ``t_from``, when a keyed SA was next added), or
        None for either that did not happen."""
        live = set(start)
        empty_at: float | None = None
        for e in self.events:
            key = (e.dst, e.spi)
            if e.kind == "add" and e.keyed:
                if empty_at is not None:
                    return empty_at, e.t
                live.add(key)
            elif e.kind in ("del", "expire"):
                live.discard(key)
            elif e.kind == "flush":
                live.clear()
            if not live and e.t >= t_from and empty_at is None:
                empty_at = e.t
        return empty_at, None
