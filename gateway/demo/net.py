"""The demo's network: six namespaces, threads that live in them, cleanup.

Theory of operation::

    hA 10.1.0.2 -- a1 gA 192.0.2.1 w0 --+                     KME-A/KME-B (simulator)
                                     wire (bridge br0)          in namespace "k", reached
    hB 10.2.0.2 -- b1 gB 192.0.2.2 w0 --+                      from gA/gB on their own
    gA.m0 / gB.m0: a second pair of bridge ports for MACsec    loopback through forwarders
                                                               (its own process)

Names are ``qd<tag>-<role>`` with a fresh random tag per run, so parallel
runs and leftovers of a killed run never collide. Setup uses ``ip -batch``
(one process per namespace: under QEMU TCG process start costs 0.2-0.6 s);
everything else runs in-process. A thread enters a namespace with setns(2),
which moves only the calling thread (``CLONE_NEWNET`` is per task), so the
two daemons and the traffic run as threads of one process, each opening
its sockets in its own namespace (the KME simulator is its own process in
namespace k, :mod:`~qkdgate.gateway.demo.kmeproc`; its forwarders listen
on sockets made here). pyroute2's
push/pop helpers are not used from these threads: they save
``/proc/self/ns/net``, the main thread's namespace, not the caller's.

:class:`Cleanup` is the one place that undoes what the demo created, in
reverse order, exactly once, whether the run ends, fails, or is
interrupted (the caller wires it to ``finally``, ``atexit`` and signals).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from qkdgate.errors import TunnelError

T = TypeVar("T")

log = logging.getLogger("qkdgate.demo")

PREFIX = "qd"
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

GA, GB = "192.0.2.1", "192.0.2.2"
HA, HB = "10.1.0.2", "10.2.0.2"
LAN_A, LAN_B = "10.1.0.0/24", "10.2.0.0/24"
MS_A, MS_B = "172.16.0.1", "172.16.0.2"     # addresses on the MACsec link

Runner = Callable[[Sequence[str], str], "subprocess.CompletedProcess[str]"]


def run_ip(cmd: Sequence[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), input=stdin, text=True, capture_output=True)


class Cleanup:
    """Undo actions, run in reverse order exactly once; failures are logged,
    never raised (cleanup must reach the last namespace)."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], Any]]] = []
        self._lock = threading.Lock()
        self.done = False
        self.errors: list[str] = []

    def push(self, what: str, fn: Callable[[], Any]) -> None:
        with self._lock:
            self._actions.append((what, fn))

    def pending(self) -> list[str]:
        return [w for w, _ in self._actions]

    def run(self) -> list[str]:
        """Undo everything still registered. Actions are taken one at a time,
        so a run cut short (a second Ctrl-C) is finished by the next call
        (atexit)."""
        self.done = True
        while True:
            with self._lock:
                if not self._actions:
                    break
                what, fn = self._actions.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001  keep going: the next namespace must go too
                self.errors.append(f"{what}: {exc}")
                log.warning("cleanup: %s failed: %s", what, exc)
        return self.errors


class DemoNet:
    """The namespaces of one run; ``up()`` builds, ``down()`` removes them."""

    ROLES = ("hA", "gA", "w", "gB", "hB", "k")

    def __init__(self, tag: str | None = None, runner: Runner = run_ip) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.run = runner
        self.ns = {r: f"{PREFIX}{self.tag}-{r}" for r in self.ROLES}
        self.created: list[str] = []

    def __getattr__(self, role: str) -> str:
        ns = self.__dict__.get("ns", {})
        if role in ns:
            return str(ns[role])
        raise AttributeError(role)

    def _batch(self, lines: list[str], netns: str | None = None) -> None:
        cmd = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
        r = self.run(cmd, "\n".join(lines) + "\n")
        if r.returncode:
            raise TunnelError("demo_topology", errno.EINVAL,
                              f"ip -batch in {netns or 'the root namespace'}: {r.stderr.strip()}")

    def up(self) -> DemoNet:
        n = self.ns
        for name in n.values():           # one by one, so down() knows what exists
            self._batch([f"netns add {name}"])
            self.created.append(name)
        self._batch([
            f"link add a0 netns {n['hA']} type veth peer name a1 netns {n['gA']}",
            f"link add w0 netns {n['gA']} type veth peer name wa netns {n['w']}",
            f"link add w0 netns {n['gB']} type veth peer name wb netns {n['w']}",
            f"link add b0 netns {n['hB']} type veth peer name b1 netns {n['gB']}",
            f"link add m0 netns {n['gA']} type veth peer name pma netns {n['w']}",
            f"link add m0 netns {n['gB']} type veth peer name pmb netns {n['w']}"])
        for role in self.ROLES:
            for key in ("all", "default"):
                write_sysctl(n[role], f"net/ipv4/conf/{key}/rp_filter", "0")
        for g in ("gA", "gB"):
            write_sysctl(n[g], "net/ipv4/ip_forward", "1")
        self._batch(["link set lo up", "link set a0 up", f"addr add {HA}/24 dev a0",
                     "route add default via 10.1.0.1"], n["hA"])
        self._batch(["link set lo up", "link set b0 up", f"addr add {HB}/24 dev b0",
                     "route add default via 10.2.0.1"], n["hB"])
        for g, lan, me, wan, rnet, peer in (("gA", "a1", "10.1.0.1/24", GA, LAN_B, GB),
                                            ("gB", "b1", "10.2.0.1/24", GB, LAN_A, GA)):
            self._batch(["link set lo up", f"link set {lan} up", f"addr add {me} dev {lan}",
                         "link set w0 up", f"addr add {wan}/24 dev w0",
                         f"route add {rnet} via {peer}", "link set m0 up"], n[g])
        self._batch(["link set lo up", "link add br0 type bridge", "link set br0 up"], n["w"])
        # a second batch: ip resolves names once per batch, br0 is new
        self._batch([f"link set {p} master br0" for p in ("wa", "wb", "pma", "pmb")]
                    + [f"link set {p} up" for p in ("wa", "wb", "pma", "pmb")], n["w"])
        self._batch(["link set lo up"], n["k"])
        return self

    def down(self) -> list[str]:
        """Delete every namespace this run created; returns the failures."""
        failed = []
        for name in reversed(self.created):
            r = self.run(["ip", "netns", "del", name], "")
            if r.returncode and os.path.exists(os.path.join(NETNS_DIR, name)):
                failed.append(f"{name}: {r.stderr.strip()}")
        self.created = []
        return failed


_NAME = re.compile(rf"^{PREFIX}([0-9a-f]{{6}})-(hA|gA|w|gB|hB|k|probe)$")


def list_demo_namespaces(tag: str | None = None) -> list[str]:
    """Namespaces named like ours (``qd<6 hex>-<role>``), of run ``tag`` or
    of any run: a live run or the leftovers of one killed with SIGKILL."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = _NAME.match(n)
        if m and (tag is None or m.group(1) == tag):
            out.append(n)
    return sorted(out)


def remove_namespaces(names: Sequence[str], runner: Runner = run_ip) -> list[str]:
    """Delete the given namespaces; returns the failures."""
    failed = []
    for n in names:
        r = runner(["ip", "netns", "del", n], "")
        if r.returncode:
            failed.append(f"{n}: {r.stderr.strip()}")
    return failed


# ------------------------------------------------------------ namespaces/threads

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into namespace ``name`` for good."""
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise TunnelError("enter_netns", e, name)
    finally:
        os.close(fd)


def in_thread_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a short-lived thread inside ``name``; sockets it opens
    stay in that namespace for their whole life."""
    box: Future[T] = Future()

    def body() -> None:
        try:
            enter_netns(name)
            box.set_result(fn())
        except BaseException as exc:  # noqa: BLE001  handed to the caller by box.result()
            box.set_exception(exc)
    t = threading.Thread(target=body, name=f"ns-{name}", daemon=True)
    t.start()
    t.join()
    return box.result()


def write_sysctl(netns: str, path: str, value: str) -> None:
    def w() -> None:
        # /proc/sys/net resolves against the opening thread's namespace
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(value)
    in_thread_netns(netns, w)


def socket_in(netns: str, family: int, type_: int) -> socket.socket:
    return in_thread_netns(netns, lambda: socket.socket(family, type_))


class LoopThread:
    """An asyncio event loop in its own thread, inside one namespace."""

    def __init__(self, netns: str, name: str) -> None:
        self.netns, self.name = netns, name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> LoopThread:
        self.thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        try:
            enter_netns(self.netns)
            self.loop = asyncio.new_event_loop()
        except BaseException as exc:  # noqa: BLE001  re-raised in the caller by start()
            self._error = exc
            self._started.set()
            return
        asyncio.set_event_loop(self.loop)
        self._started.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self.loop is None:
            raise RuntimeError("LoopThread.submit before start()")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)


# ------------------------------------------------------------ KME forwarders

class TcpForwarder:
    """Listens on a socket made in a gateway namespace and relays each TCP
    connection to the KME simulator in namespace k. TLS passes through
    untouched: the gateway verifies the KME's certificate (SAN 127.0.0.1)
    and the KME the gateway's client certificate, end to end."""

    def __init__(self, listen: socket.socket, target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0

    @property
    def port(self) -> int:
        return int(self.listen.getsockname()[1])

    async def start(self) -> None:
        self.listen.setblocking(False)
        self.server = await asyncio.start_server(self._handle, sock=self.listen)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Copy ``r`` to ``w`` until EOF or a connection error, then close ``w``."""
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):   # closed, or loop closing
            w.close()


def loopback_listener(netns: str) -> socket.socket:
    """A TCP listening socket on 127.0.0.1 (ephemeral port) inside ``netns``."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(32)
        return s
    return in_thread_netns(netns, make)
