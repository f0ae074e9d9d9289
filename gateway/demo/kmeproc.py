"""The demo's KME simulator as its own process, and the pipe that drives it.

Theory of operation: ``qkdgate demo`` used to run the KME simulator on a
thread of its own process, beside both daemons, the traffic, the kernel
watch and the key applications. Starved (a loaded 2-core host under QEMU
TCG) that KME missed the gateways' 2 s ETSI 014 timeout, exchanges took
p50 5 s against a 3/6/9 s schedule and generations expired (issue 10,
docs/faults.md). :class:`KmeProcess` now starts the simulator in its own
interpreter (``python -m qkdgate.gateway.demo.kmeproc``) in namespace k,
as bench/kme_path.py measured: its own GIL, scheduled by the kernel like
the rest.

* **Forwarders.** The demo makes one listening socket on each gateway's
  loopback (:func:`~.net.loopback_listener`) and hands the descriptors to
  the child (``pass_fds``); the child relays each connection to its KME
  (:class:`~.net.TcpForwarder`), so no byte of ETSI 014/004 crosses the
  demo's own process.
* **Readiness** is one JSON line on the child's stdout once every KME and
  forwarder listens (with the SAE credentials' file paths: no key
  material), awaited with a deadline on the pipe, never a sleep. An exit
  before it is reported with the status and the end of the child's log.
* **Control** is the same pipe pair, one JSON request per line on the
  child's stdin and one JSON answer per line on its stdout: ``state`` (the
  simulator's state: links, QBER, pool), ``eve`` (the intercept-resend
  eavesdropper on the link, a fraction of photons) and ``network`` (per SAE
  pair of ``--topology``: route, pool, what compromised nodes saw, key_IDs
  only). The simulator's HTTP admin endpoint would need a socket in
  namespace k and has no authentication; the pipe reaches only this
  process's parent.
* **Stop.** EOF on stdin stops the child (close the forwarders and the
  KMEs, exit 0): :meth:`KmeProcess.stop` closes the pipe, waits, then
  escalates to SIGTERM and SIGKILL and reaps it. The child ignores SIGINT,
  so a Ctrl-C at the terminal (which reaches the whole foreground process
  group) leaves it to the demo's orderly cleanup; if the demo itself dies,
  even by SIGKILL, the pipe closes and the child follows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from qkdgate.errors import KeySourceError

READY_TIMEOUT = 120.0       # under QEMU TCG with the root filesystem over 9p: imports take seconds
CALL_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class KmeProcessError(KeySourceError):
    """The KME simulator process (the demo's key source) did not start, died, or
    did not answer."""


class KmeProcess:
    """The parent's handle: start, :meth:`call`, :meth:`stop` (idempotent)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path,
                 ready: dict[str, Any]) -> None:
        self.proc, self.log_path, self.ready = proc, log_path, ready
        self._lock = threading.Lock()
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, state_dir: Path, listeners: Sequence[socket.socket], kmes: Sequence[str], *,
              qkd: str = "014", topology: str | None = None, prefill: int = 1000,
              netns: str | None = None, timeout: float = READY_TIMEOUT,
              python: str = sys.executable) -> KmeProcess:
        """Start the child (in ``netns`` with ``ip netns exec``, which execs:
        the pid is the child's) relaying ``listeners[i]`` to ``kmes[i]``,
        and return once it is ready; on any failure it is stopped and
        reaped before the error is raised."""
        log_path = state_dir / "kme-sim.log"
        fds = [s.fileno() for s in listeners]
        argv = [python, "-m", "qkdgate.gateway.demo.kmeproc", "--state-dir", str(state_dir),
                "--qkd", qkd, "--prefill", str(prefill), "--kmes", ",".join(kmes),
                "--fds", ",".join(map(str, fds))]
        if topology:
            argv += ["--topology", topology]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, pass_fds=fds, start_new_session=False)
        self = cls(proc, log_path, {})
        try:
            doc = self._read(timeout, "ready")
            if not doc.get("ready"):
                raise KmeProcessError(f"KME simulator process: unexpected first line {doc!r}")
            self.ready = doc
        except BaseException:
            self.stop(min(timeout, STOP_TIMEOUT))
            raise
        return self

    # ------------------------------------------------------------ the pipe
    def _died(self, what: str) -> KmeProcessError:
        rc = self.proc.poll()
        tail = ""
        with contextlib.suppress(OSError):
            tail = self.log_path.read_text(errors="replace")[-1500:].strip()
        state = f"exited with status {rc}" if rc is not None else "closed its pipe"
        return KmeProcessError(f"KME simulator process (pid {self.proc.pid}) {state} {what} "
                               f"(log {self.log_path})" + (f"; it ends:\n{tail}" if tail else ""))

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        out = self.proc.stdout
        if out is None:
            raise RuntimeError("KmeProcess without a stdout pipe")   # our bug
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KmeProcessError(f"KME simulator process (pid {self.proc.pid}): no "
                                      f"{what} within {timeout:g} s (log {self.log_path})")
            if not select.select([out], [], [], left)[0]:
                continue
            chunk = os.read(out.fileno(), 65536)
            if not chunk:
                self.proc.wait(STOP_TIMEOUT)
                raise self._died(f"before its {what}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise KmeProcessError(f"KME simulator process: not an object: {line[:200]!r}")
        return doc

    def call(self, op: str, timeout: float = CALL_TIMEOUT, **args: Any) -> Any:
        """One request on the control pipe and its answer (``result``);
        raises :class:`KmeProcessError` if the child is gone or says no."""
        with self._lock:
            if self.proc.poll() is not None or self.proc.stdin is None:
                raise self._died(f"(asked for {op})")
            try:
                self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                self.proc.wait(STOP_TIMEOUT)
                raise self._died(f"(asked for {op})") from None
            doc = self._read(timeout, f"answer to {op}")
        if "error" in doc:
            raise KmeProcessError(f"KME simulator process: {op}: {doc['error']}")
        return doc.get("result")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """EOF on its stdin, then SIGTERM, then SIGKILL, each given
        ``timeout``; always reaped. Returns its exit status."""
        p = self.proc
        if p.stdin is not None and not p.stdin.closed:
            with contextlib.suppress(OSError):
                p.stdin.close()
        for step in (None, signal.SIGTERM, signal.SIGKILL):
            if step is not None and p.poll() is None:
                p.send_signal(step)
            try:
                p.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        if p.stdout is not None:
            p.stdout.close()
        return p.returncode


# ------------------------------------------------------------------ child

def network_state(sim: Any, pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """With ``--topology``: every link, and per QKD path (SAE pair) its
    route, what its links hold and what compromised nodes on it saw
    (key_IDs only)."""
    st = sim.state()
    net = sim.network
    links = {frozenset(x["kmes"]): x for x in st["links"]}
    paths = []
    for a, b in pairs:
        reply = net.status(net.sae_home[a], a, b)
        ok = reply.status == 200
        routes = reply.body["status_extension"].get("qkdgate_routes", []) if ok else []
        hops = [links[frozenset(h)] for r in routes for h in itertools.pairwise(r)]
        seen = {s.key_id for s in net.attacker_knowledge()
                if {s.master_sae, s.slave_sae} == {a, b}}
        paths.append({
            "saes": [a, b], "routes": routes,
            "stored_keys": reply.body["stored_key_count"] if ok else 0,
            "qber": max((h["qber"] for h in hops), default=None),
            "alarms": sorted({x for h in hops for x in h["alarms"]}),
            "compromised": sorted({n for r in routes for n in r} & net.compromised),
            "attacker_key_ids": sorted(seen)})
    return {"links": st["links"], "paths": paths}


def answer(sim: Any, req: Any) -> dict[str, Any]:
    """One control request -> its answer (never raises for a bad request)."""
    if not isinstance(req, dict):
        return {"error": "a request is a JSON object"}
    op = req.get("op")
    try:
        if op == "state":
            return {"result": sim.state()}
        if op == "eve":
            fraction = float(req["fraction"])
            if not 0.0 <= fraction <= 1.0:
                return {"error": "fraction not in 0..1"}
            sim.set_eavesdropper(fraction)
            return {"result": None}
        if op == "network":
            return {"result": network_state(sim, req["pairs"])}
    except (KeyError, TypeError, ValueError) as exc:
        return {"error": f"{op}: {type(exc).__name__}: {exc}"}
    return {"error": f"unknown op {op!r}"}


def _write(out: IO[bytes], doc: dict[str, Any]) -> None:
    out.write(json.dumps(doc).encode() + b"\n")
    out.flush()


async def serve(args: argparse.Namespace) -> None:
    from qkdgate.adapters.kmesim.server import KmeSimulator
    from qkdgate.gateway.demo.config import kme_port
    from qkdgate.gateway.demo.net import TcpForwarder
    topology = None
    if args.topology:
        from qkdgate.gateway.config.topology import load_topology
        topology = load_topology(args.topology)
    kmes = args.kmes.split(",")
    fds = [int(x) for x in args.fds.split(",")]
    listeners = [socket.socket(fileno=fd) for fd in fds]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    out = sys.stdout.buffer
    async with KmeSimulator.start(Path(args.state_dir) / "kme", prefill=args.prefill,
                                  topology=topology) as sim:
        fwds = [TcpForwarder(s, ("127.0.0.1", kme_port(args.qkd, k, sim.ports, sim.ports004)))
                for s, k in zip(listeners, kmes, strict=True)]
        for f in fwds:
            await f.start()
        creds = {}
        for sae in sim.network.sae_home:
            c = sim.credentials(sae)
            creds[sae] = {"kme_id": c.kme_id, "cert": str(c.cert), "key": str(c.key),
                          "ca": str(c.ca)}
        _write(out, {"ready": True, "pid": os.getpid(), "credentials": creds})
        while line := await stdin.readline():       # EOF: the demo stopped us (or died)
            try:
                req = json.loads(line)
            except ValueError:
                req = None
            _write(out, answer(sim, req))
        for f in fwds:
            await f.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkdgate.gateway.demo.kmeproc",
                                 description="the demo's KME simulator (started by qkdgate demo)")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--qkd", default="014")
    ap.add_argument("--prefill", type=int, default=1000)
    ap.add_argument("--kmes", required=True, help="the KME behind each forwarded listener")
    ap.add_argument("--fds", required=True, help="inherited listening sockets, one per KME")
    ap.add_argument("--topology", default=None)
    args = ap.parse_args(argv)
    # Ctrl-C reaches the whole foreground process group: the demo's cleanup
    # stops us in order (EOF on stdin); SIGTERM still ends us at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s kme-sim %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
