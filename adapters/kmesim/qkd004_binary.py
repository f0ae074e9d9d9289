"""The simulated KMEs' ETSI 004 binary binding: frames over mutual TLS.

Theory of operation: one asyncio TLS server per KME (client certificate
from the demo CA required; the caller is its CN, which must be an SAE
attached to this KME). Each connection is a loop: read the 8-byte header,
refuse it at once if its version, service type or announced length is not
acceptable (the payload is never read then), read exactly the payload,
decode it (:mod:`qkdgate.adapters.etsi004_frame`), run the call on the
shared :class:`~.qkd004.Qkd004Service` -- the same state machine the JSON
binding serves -- and write one response frame. A frame the codec refuses
closes that connection only; the server and every other connection carry
on. Faults (per KME, server.Faults): ``delay`` before answering, ``drop``
(close after acting), ``raw004`` (these bytes instead of the answer, then
the connection closed unless ``raw004_close`` is False, so a truncated
frame is seen as one; for the next ``raw004_left`` answers, or all: -1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

from qkdgate.adapters import etsi004_frame as frame
from qkdgate.adapters.etsi004 import Status
from qkdgate.adapters.kmesim.qkd004 import Qkd004Service, metadata_bytes
from qkdgate.errors import LocalProtocolError, QkdgateError

log = logging.getLogger("qkdgate.kmesim")


def _caller(writer: asyncio.StreamWriter) -> str | None:
    cert = writer.get_extra_info("peercert")
    for rdn in (cert or {}).get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    return None


class Qkd004BinaryServer:
    """Serves one KME's binary 004 endpoint. ``faults`` returns the KME's
    current fault switches (an object with ``delay``, ``drop``, ``raw004``)."""

    def __init__(self, kme_id: str, service: Qkd004Service, home: Callable[[str], str | None],
                 faults: Callable[[], object], *,
                 max_message: int = frame.DEFAULT_MAX_MESSAGE) -> None:
        self.kme_id, self.service, self._home, self._faults = kme_id, service, home, faults
        self.max_message = max_message
        self.refused: list[str] = []        # FrameError reasons, newest last (tests read it)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, ctx: ssl.SSLContext) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, ssl=ctx,
                                                  reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            for t in list(self._conns):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            caller = _caller(writer)
            if caller is None or self._home(caller) != self.kme_id:
                log.info("%s 004 binary: refused caller %s (not an SAE of this KME)",
                         self.kme_id, caller)
                return
            while await self._one(caller, reader, writer):
                pass
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("%s 004 binary: connection ended: %s", self.kme_id, exc)
        except QkdgateError as exc:
            # e.g. a stream opened over JSON whose QoS the binary form cannot
            # carry: this connection ends, the server goes on.
            log.warning("%s 004 binary: closing the connection: %s", self.kme_id, exc)
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError,
                                     asyncio.CancelledError):
                await writer.wait_closed()

    async def _one(self, caller: str, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; False ends the connection."""
        try:
            header = await reader.readexactly(frame.HEADER_LEN)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self._refuse(caller, frame.FrameError("truncated", "header cut short"))
            return False
        try:
            stype, length = frame.parse_header(header, frame.REQUESTS, self.max_message)
            try:
                payload = await reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise frame.FrameError("truncated", f"{len(exc.partial)} of {length} payload "
                                       "bytes before the stream ended") from None
            req = frame.decode_payload(stype, payload)
        except frame.FrameError as exc:
            self._refuse(caller, exc)
            return False
        answer = self._dispatch(caller, req)
        f = self._faults()
        delay = getattr(f, "delay", 0.0)
        if delay:
            await asyncio.sleep(delay)
        if getattr(f, "drop", 0) > 0:
            f.drop -= 1     # type: ignore[attr-defined]
            log.info("%s 004 binary: dropping the answer (fault)", self.kme_id)
            return False
        raw = getattr(f, "raw004", None)
        if isinstance(raw, bytes):
            left = getattr(f, "raw004_left", -1)
            if left > 0:
                f.raw004_left = left - 1        # type: ignore[attr-defined]
                if left == 1:
                    f.raw004 = None             # type: ignore[attr-defined]
            writer.write(raw)
            await writer.drain()
            return not getattr(f, "raw004_close", True)
        writer.write(frame.encode(answer))
        await writer.drain()
        return True

    def _refuse(self, caller: str, exc: frame.FrameError) -> None:
        self.refused.append(exc.reason)
        log.info("%s 004 binary: closing %s's connection: %s", self.kme_id, caller, exc)

    def _dispatch(self, caller: str, req: frame.Message) -> frame.Message:
        svc = self.service
        if isinstance(req, frame.OpenConnectRequest):
            ksid = frame.ksid_str(req.key_stream_id)
            res = svc.open_connect(caller, req.source, req.destination, req.qos, ksid)
            if res is None:
                # URIs that do not name the caller and another SAE: the
                # reference answers 4 to URIs it cannot use (server.py:214-218).
                return frame.OpenConnectResponse(int(Status.NO_QKD_CONNECTION))
            if res.status in frame.OPEN_LONG:     # 0, 1, 7: QoS and key_stream_ID too
                return frame.OpenConnectResponse(int(res.status), res.qos,
                                                 frame.ksid_bytes(res.key_stream_id))
            return frame.OpenConnectResponse(int(res.status))
        if isinstance(req, frame.GetKeyRequest):
            ksid = frame.ksid_str(req.key_stream_id)
            if ksid is None:
                return frame.GetKeyResponse(int(Status.NO_QKD_CONNECTION))
            r = svc.get_key(caller, ksid, req.index, req.metadata_size)
            if r.status == Status.SUCCESSFUL and r.key is not None and r.index is not None:
                return frame.GetKeyResponse(0, r.index, r.key,
                                            metadata_bytes(r.metadata or {}))
            if r.status == Status.METADATA_TOO_SMALL:
                return frame.GetKeyResponse(8, metadata_size=r.metadata_size)
            return frame.GetKeyResponse(int(r.status))
        if isinstance(req, frame.CloseRequest):
            ksid = frame.ksid_str(req.key_stream_id)
            st = Status.NO_QKD_CONNECTION if ksid is None else svc.close(caller, ksid)
            return frame.CloseResponse(int(st))
        raise LocalProtocolError(f"004 binary: no handler for {type(req).__name__}")
