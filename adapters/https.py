"""HTTPS with mutual TLS to a KME: one pooled client, bounded retries.

Theory of operation: :class:`KmeHttps` is the only place qkdgate opens
connections to a KME; the ETSI 014 and 004 clients call :meth:`request`
with a classifier that maps non-200 answers to the right
:class:`~qkdgate.errors.KeySourceError`. It owns the aiohttp session
(keep-alive pool, per-request timeout), checks the KME ID in the server
certificate on every response before reading it, bounds body size, and
retries only what can succeed on retry: network errors, timeouts, and
502/503/504. Backoff is exponential with full jitter; ``sleep`` and ``rng``
are injected so tests run the schedule without waiting.

aiohttp was chosen because it is asyncio-native, pools keep-alive
connections per host, takes an :class:`ssl.SSLContext` as is (mutual TLS,
TLS 1.2 floor), exposes each connection's verified peer certificate, and
is widely deployed with prompt security releases; the simulator uses its
server too, so one HTTP stack is audited rather than two.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from qkdgate.adapters.tls import check_peer_id
from qkdgate.errors import (
    KeySourceAuthError,
    KeySourceError,
    KeySourceProtocolError,
    KeySourceTimeout,
    KeyUnavailable,
)

log = logging.getLogger("qkdgate.adapters.https")

MAX_BODY_BYTES = 4 * 1024 * 1024
RETRY_STATUSES = frozenset({502, 503, 504})

Classifier = Callable[[str, int, bytes], KeySourceError]


class KmeHttps:
    def __init__(self, *, ssl_context: ssl.SSLContext, timeout: float, retries: int,
                 kme_id: str | None, label: str, reuse_connections: bool = True,
                 server_hostname: str | None = None, backoff: float = 0.2,
                 max_backoff: float = 5.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        self._ssl, self.timeout, self.retries = ssl_context, timeout, retries
        self.kme_id, self.label = kme_id, label
        self._reuse, self._server_hostname = reuse_connections, server_hostname
        self._backoff, self._max_backoff = backoff, max_backoff
        self._sleep, self._rng = sleep, rng
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0   # HTTP requests sent, retries included (telemetry)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = _KmeConnector(ssl=self._ssl, limit=16, force_close=not self._reuse,
                                      kme_id=self.kme_id)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept": "application/json"})
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def _tls_refusal(self, url: URL) -> str | None:
        if url.host is None or url.port is None:
            return None
        return await asyncio.to_thread(_probe, self._ssl, url.host, url.port,
                                       self._server_hostname, min(self.timeout, 2.0))

    async def request(self, what: str, http_method: str, url: URL, classify: Classifier, *,
                      params: Mapping[str, str] | None = None,
                      body: Mapping[str, object] | None = None,
                      retries: int | None = None) -> bytes:
        """One logical request: a 200 body, or a KeySourceError subclass.
        ``retries`` overrides the configured count (0 for calls that must
        not be repeated)."""
        session = self._get_session()
        kme = self.label
        last: KeySourceError = KeyUnavailable(f"{kme} {what}: no attempt made")
        for attempt in range((self.retries if retries is None else retries) + 1):
            if attempt:
                delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1)) * self._rng()
                log.debug("%s %s: retry %d in %.3f s after: %s", kme, what, attempt, delay, last)
                await self._sleep(delay)
            self.requests += 1
            try:
                # No redirects: a KME answer pointing elsewhere must not make us
                # present our SAE certificate, or key requests, to another host.
                async with session.request(http_method, url, params=params, json=body,
                                           server_hostname=self._server_hostname,
                                           allow_redirects=False) as resp:
                    raw = await _read_bounded(resp)
                    status = resp.status
            except KeySourceError:
                raise
            except aiohttp.ClientConnectorCertificateError as exc:
                raise KeySourceAuthError(f"{kme} {what}: KME certificate not trusted "
                                         f"({_reason(exc.certificate_error)})") from None
            except aiohttp.ClientSSLError as exc:
                raise KeySourceAuthError(
                    f"{kme} {what}: TLS handshake failed ({_reason(exc)})") from None
            except TimeoutError:
                last = KeySourceTimeout(f"{kme} {what}: no answer within {self.timeout} s")
                continue
            except (aiohttp.ClientError, OSError) as exc:
                if _is_tls_alert(exc):
                    # With TLS 1.3 the KME rejects our certificate after our side
                    # of the handshake is done, so the refusal arrives on read.
                    raise KeySourceAuthError(f"{kme} {what}: KME refused our TLS client "
                                             f"certificate ({_reason(exc)})") from None
                if isinstance(exc, aiohttp.ServerDisconnectedError):
                    # aiohttp reports a TLS 1.3 client-certificate refusal as a
                    # bare disconnect: ask the TLS layer directly what happened.
                    refused = await self._tls_refusal(url)
                    if refused:
                        raise KeySourceAuthError(f"{kme} {what}: KME refused our TLS client "
                                                 f"certificate ({refused})") from None
                last = KeyUnavailable(f"{kme} {what}: network error ({_reason(exc)})")
                continue
            if status == 200:
                return raw
            err = classify(what, status, raw)
            if status in RETRY_STATUSES:
                last = err
                continue
            raise err
        raise last


def _probe(ctx: ssl.SSLContext, host: str, port: int, server_hostname: str | None,
           timeout: float) -> str | None:
    """Why a KME dropped us right after the handshake, or None if it did not
    refuse us. With TLS 1.3 the server checks our certificate after our side
    of the handshake is complete, so aiohttp sees only "Server disconnected".
    A blocking socket surfaces the TLS alert a server sends; asyncio servers
    (like aiohttp) abort without one, so a connection that closes without
    answering a harmless HEAD counts as a refusal too."""
    try:
        with (socket.create_connection((host, port), timeout=timeout) as raw,
              ctx.wrap_socket(raw, server_hostname=server_hostname or host) as tls):
            tls.sendall(b"HEAD / HTTP/1.1\r\nHost: kme\r\nConnection: close\r\n\r\n")
            first = tls.recv(1)
    except ssl.SSLError as exc:
        return _reason(exc)
    except OSError:
        return None
    return None if first else "connection closed right after the TLS handshake"


class _KmeIdCheck:
    """Checks the KME ID in the server certificate of every new connection,
    before the first request is written on it (ETSI GS QKD 014 5.1: the SAE
    authenticates the KME). Plugged in where aiohttp checks certificate
    fingerprints, so a wrong KME never sees a request."""

    def __init__(self, kme_id: str) -> None:
        self.kme_id = kme_id

    def check(self, transport: asyncio.Transport) -> None:
        try:
            check_peer_id(transport.get_extra_info("ssl_object"), self.kme_id)
        except KeySourceAuthError:
            transport.close()
            raise


if not hasattr(aiohttp.TCPConnector, "_get_fingerprint"):  # pragma: no cover
    raise ImportError("this aiohttp has no TCPConnector._get_fingerprint hook; "
                      "qkdgate's KME ID check needs aiohttp 3.x as pinned in pyproject.toml")


class _KmeConnector(aiohttp.TCPConnector):
    def __init__(self, *args: Any, kme_id: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kme_check = _KmeIdCheck(kme_id) if kme_id else None

    def _get_fingerprint(self, req: Any) -> Any:
        return self._kme_check or super()._get_fingerprint(req)


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    if (resp.content_length or 0) > MAX_BODY_BYTES:
        raise KeySourceProtocolError(f"KME answer of {resp.content_length} bytes is too large")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise KeySourceProtocolError(f"KME answer larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)


def _is_tls_alert(exc: BaseException) -> bool:
    e: BaseException | None = exc
    for _ in range(5):
        if e is None:
            return False
        if isinstance(e, ssl.SSLError):
            return True
        text = str(e).lower()
        if "alert" in text and ("certificate" in text or "handshake" in text):
            return True
        e = e.__cause__ or e.__context__
    return False


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    r = (getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
         or type(exc).__name__)
    return " ".join(str(r).split())[:160]
