"""The key service as the daemon runs it: servers, stunnel, the erase timer.

Theory of operation: :class:`KeyServiceRunner` owns one
:class:`~qkdgate.keyservice.service.KeyService`, its ETSI 014 HTTPS listener,
one SKIP backend per configured local system with the stunnel4 process that
terminates TLS-PSK in front of it (docs/keyservice.md 7), and the one timer
that erases expired generations (:meth:`run`). The daemon builds it from the
config and feeds it generations through :meth:`KeyService.generation_keyed`
and friends; it never reads YAML or files itself (stunnel reads the PSK file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qkdgate.errors import LocalProtocolError
from qkdgate.keymix.combiner import SessionSecret
from qkdgate.keyservice.etsi014 import Etsi014Server
from qkdgate.keyservice.service import KeyService
from qkdgate.keyservice.skip import SkipServer, stunnel_config

log = logging.getLogger("qkdgate.keyservice")
IDLE_WAKE = 60.0            # no generation held: look again at least this often


@dataclass(frozen=True, slots=True)
class SkipListener:
    local_system: str
    accept: str                 # host:port stunnel listens on (TLS-PSK)
    psk_file: str
    tls_mode: str = "both"


class KeyServiceRunner:
    def __init__(self, service: KeyService, *, host: str, port: int, cert: str, key: str,
                 ca: str, state_dir: str | Path, skip: Sequence[SkipListener] = (),
                 stunnel: str = "stunnel4", clock: Callable[[], float] = time.monotonic) -> None:
        self.service, self.clock = service, clock
        self.etsi014 = Etsi014Server(service, host=host, port=port, cert=cert, key=key, ca=ca,
                                     clock=clock)
        self._dir = Path(state_dir) / "keyservice"
        self._skip = list(skip)
        self._stunnel = stunnel
        self.skip_servers: list[SkipServer] = []
        self._procs: list[asyncio.subprocess.Process] = []
        self._drains: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()

    async def start(self) -> None:
        await self.etsi014.start()
        log.info("key service: ETSI 014 on %s:%d, %d pool(s)", self.etsi014.host,
                 self.etsi014.port, len(self.service.pools))
        if not self._skip:
            return
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i, sk in enumerate(self._skip):
            srv = SkipServer(self.service, sk.local_system, self._dir / f"skip-{i}.sock",
                             clock=self.clock)
            await srv.start()
            self.skip_servers.append(srv)
            conf = self._dir / f"stunnel-{i}.conf"
            conf.write_text(stunnel_config(accept=sk.accept, backend=srv.path,
                                           psk_file=sk.psk_file, mode=sk.tls_mode,
                                           name=f"skip-{i}"))
            proc = await asyncio.create_subprocess_exec(
                self._stunnel, str(conf), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            self._procs.append(proc)
            await self._ready(proc, sk)

    async def _ready(self, proc: asyncio.subprocess.Process, sk: SkipListener) -> None:
        if proc.stdout is None:
            raise LocalProtocolError("stunnel started without a stdout pipe")
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise OSError(f"key service: stunnel for SKIP {sk.local_system} on {sk.accept} "
                              "exited at start (port in use? PSK file unreadable?)")
            if b"Configuration successful" in line:
                log.info("key service: SKIP for %s on %s (TLS-PSK, %s)", sk.local_system,
                         sk.accept, sk.tls_mode)
                # stunnel logs every connection: keep reading, or its pipe fills and it stalls
                self._drains.append(asyncio.get_running_loop().create_task(
                    self._drain(proc.stdout, sk.local_system), name=f"stunnel-{sk.local_system}"))
                return

    @staticmethod
    async def _drain(stream: asyncio.StreamReader, who: str) -> None:
        while line := await stream.readline():
            log.debug("stunnel (SKIP %s): %s", who, line.decode(errors="replace").rstrip())

    def changed(self) -> None:
        """A generation arrived: re-arm the erase timer."""
        self._wake.set()

    # The daemon's hooks (gateway/daemon/peer.py), one per protocol step.
    def generation_keyed(self, peer: str, generation: int, session: SessionSecret, role: str,
                         now: float) -> None:
        self.service.generation_keyed(peer, generation, session, role, now)
        self.changed()

    def generation_confirmed(self, peer: str, generation: int, now: float) -> None:
        self.service.generation_confirmed(peer, generation, now)
        self.changed()

    def generation_aborted(self, peer: str, generation: int, now: float) -> None:
        self.service.generation_aborted(peer, generation, now)
        self.changed()

    def peer_failed(self, peer: str, now: float) -> None:
        self.service.peer_failed(peer, now)
        self.changed()

    async def run(self) -> None:
        """The one owner of the erase timer (docs/keyservice.md 4)."""
        while True:
            deadline = self.service.get_timer()
            delay = IDLE_WAKE if deadline is None else max(0.0, deadline - self.clock())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            for pool, generation in self.service.handle_timer(self.clock()):
                log.info("key service: pool %s generation %d erased", pool, generation)

    async def close(self) -> None:
        for task in self._drains:
            task.cancel()
        for proc in self._procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        for srv in self.skip_servers:
            await srv.stop()
        await self.etsi014.stop()
