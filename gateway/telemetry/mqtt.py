"""MQTT telemetry: events, periodic status and a retained online/offline state.

Theory of operation: the daemon hands typed events
(:mod:`qkdgate.gateway.telemetry.events`) to :meth:`Telemetry.publish_event`,
which turns them into their flat wire form, sanitizes it, wraps them in a
versioned envelope and appends them to a bounded queue. It never awaits and
never fails, so a slow or absent broker cannot stall a rekey; when the queue
is full the *oldest* event is dropped and counted (the freshest state is the
useful one, and ``seq`` gaps show subscribers what they missed).

:meth:`Telemetry.run` is one long-lived task: connect (aiomqtt), publish a
retained ``online`` state (the broker holds a retained ``offline`` last will
for us), then drain the queue and publish the status every ``interval``.
Any MQTT error closes the connection and retries after an exponential
backoff with jitter; the event being sent when the link broke is retried
first. :meth:`Telemetry.close` publishes ``offline`` and disconnects.

The MQTT socket must reach the broker while tunnels are down or blocking, so
an optional ``bypass(sock)`` (``IpsecBackend.bypass_socket``) is applied to
the TCP socket *before* ``connect()``: its SYN already skips the tunnels'
policies. Topics and payloads are specified in docs/telemetry.md.

Secrets never leave: :func:`sanitize` drops SecretBytes, any bytes-like
value, any field whose name ends in key/secret/psk/password/token/seed/salt,
long hex or base64 blobs, and objects it does not know, and counts what it
dropped. Passwords come from a file and live only in the MQTT client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import ipaddress
import json
import logging
import math
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qkdgate import __version__
from qkdgate.errors import ConfigError
from qkdgate.gateway.telemetry.events import DaemonEvent, Event, UnknownEvent
from qkdgate.keymix.secret import SecretBytes
from qkdgate.private_file import read_private_file
from qkdgate.tunnels.events import TunnelEvent

log = logging.getLogger("qkdgate.telemetry")

SCHEMA_VERSION = 1
# Events the daemon emits (docs/telemetry.md); others are accepted if their
# name is topic-safe, so a newer daemon does not need a newer telemetry.
KNOWN_EVENTS = frozenset({
    "rekey_done", "rekey_failed", "key_source_up", "key_source_down", "qkd_alarm",
    "policy_fallback", "policy_recovered", "sa_hard_lifetime_block", "status"})

_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TOPIC_PART = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_SECRET_NAME = re.compile(
    r"(?:^|[_.-])(?:key|keys|secret|secrets|psk|password|passwd|passphrase|token|seed|salt|"
    r"material|privkey|private)$", re.IGNORECASE)
# 128+ bits of hex, or 30+ bytes of base64 without spaces: key-shaped.
_BLOB = re.compile(r"[0-9A-Fa-f]{32,}|[A-Za-z0-9+/_-]{40,}={0,2}")
_MAX_DEPTH = 8
_MAX_STR = 1024


# --------------------------------------------------------------------------
# sanitizing
# --------------------------------------------------------------------------

def sanitize(value: Any, redacted: list[str] | None = None, path: str = "$") -> Any:
    """A JSON-safe copy of ``value`` without anything that could be key
    material. Paths of dropped items are appended to ``redacted``."""
    dropped = redacted if redacted is not None else []
    return _clean(value, dropped, path, 0)


_DROP = object()


def _clean(value: Any, dropped: list[str], path: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        dropped.append(path)
        return _DROP
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return _clean(value.value, dropped, path, depth + 1)
    if isinstance(value, str):
        if _BLOB.search(value):
            dropped.append(path)
            return _DROP
        return value if len(value) <= _MAX_STR else value[:_MAX_STR] + "..."
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address,
                          ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            name = str(k) if isinstance(k, (str, int)) else None
            sub = f"{path}.{name}"
            if name is None or _SECRET_NAME.search(name):
                dropped.append(sub if name is not None else f"{path}.?")
                continue
            c = _clean(v, dropped, sub, depth + 1)
            if c is not _DROP:
                out[name] = c
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        out_list = []
        for i, v in enumerate(items):
            c = _clean(v, dropped, f"{path}[{i}]", depth + 1)
            if c is not _DROP:
                out_list.append(c)
        return out_list
    # SecretBytes, bytes, bytearray, memoryview and anything unknown: an
    # object we cannot inspect might hold a key, so it does not leave.
    dropped.append(path)
    return _DROP


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class MqttOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: SecretBytes | None = field(default=None, repr=False)
    topic_prefix: str = "qkdgate"
    client_id: str | None = None
    qos: int = 1
    interval: float = 10.0          # status period, seconds
    queue_size: int = 1000
    keepalive: int = 30
    timeout: float = 10.0           # connect / publish acknowledgement
    backoff_initial: float = 0.5
    backoff_max: float = 60.0

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> MqttOptions:
        """From ``qkdgate.gateway.config.model.MqttConfig``: reads the password
        file and builds the TLS context (verification always on)."""
        tls = None
        if cfg.tls is not None:
            try:
                tls = ssl.create_default_context(cafile=cfg.tls.ca)
                tls.minimum_version = ssl.TLSVersion.TLSv1_2
                if cfg.tls.cert:
                    tls.load_cert_chain(cfg.tls.cert, cfg.tls.key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load MQTT TLS files: {exc}",
                                  path="telemetry.mqtt.tls") from None
        password = None
        if cfg.password_file:
            # The same reader as identity and PSK files (issue 17 finding 8c):
            # no symlink, regular file (a FIFO is refused, not waited on),
            # ours, mode 0600. MQTT 3.1.1 3.1.3.5: at most 65535 bytes.
            try:
                raw = read_private_file(cfg.password_file, "MQTT password file", 65535 + 3)
            except ConfigError as exc:
                raise ConfigError(exc.reason, file=exc.file, path="telemetry.mqtt.password_file",
                                  expected=exc.expected, found=exc.found) from None
            password = SecretBytes(raw.rstrip(b"\r\n"))
            if len(password.reveal()) > 65535:
                raise ConfigError("MQTT password file is longer than 65535 bytes",
                                  path="telemetry.mqtt.password_file")
            try:
                password.reveal().decode("utf-8")   # MQTT 3.1.1 3.1.3.5: UTF-8 in practice
            except UnicodeDecodeError:
                raise ConfigError("MQTT password file is not UTF-8 text",
                                  path="telemetry.mqtt.password_file") from None
        # "[2001:db8::1]" is how the config writes an IPv6 literal; sockets
        # want it bare.
        host = cfg.host[1:-1] if cfg.host.startswith("[") and cfg.host.endswith("]") else cfg.host
        return cls(host=host, port=cfg.port, tls=tls, username=cfg.username,
                   password=password, topic_prefix=cfg.topic_prefix, client_id=cfg.client_id,
                   qos=cfg.qos, interval=cfg.interval, **overrides)


@dataclass
class TelemetryStats:
    queued: int = 0
    published: int = 0
    dropped: int = 0       # queue full: oldest event discarded
    redacted: int = 0      # fields removed by the sanitizer
    rejected: int = 0      # events refused (bad name, not a mapping)
    connects: int = 0
    failures: int = 0      # connection attempts or sessions that ended in error
    connected: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------
# the publisher
# --------------------------------------------------------------------------

class Telemetry:
    """One gateway's MQTT publisher. ``status`` returns the periodic status
    body; ``client_factory`` is ``aiomqtt.Client`` unless a test swaps it."""

    def __init__(self, options: MqttOptions, gateway: str, *,
                 bypass: Callable[[socket.socket], None] | None = None,
                 status: Callable[[], Mapping[str, Any]] | None = None,
                 now: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random,
                 client_factory: Callable[..., Any] | None = None) -> None:
        if not _TOPIC_PART.fullmatch(gateway):
            raise ConfigError(f"gateway name {gateway!r} is not usable in an MQTT topic")
        self.options = options
        self.gateway = gateway
        self.base = f"{options.topic_prefix}/{gateway}"
        self.stats = TelemetryStats()
        self._bypass = bypass
        self._status = status
        self._now = now
        self._rng = rng
        self._factory = client_factory
        self._queue: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()     # ends the backoff sleep at close()
        self._done = asyncio.Event()       # run() has returned
        self._running = False
        self._closing = False
        self._close_deadline = 0.0
        self._seq = 0

    # -- topics and payloads ----------------------------------------------

    @property
    def state_topic(self) -> str:
        return f"{self.base}/state"

    @property
    def status_topic(self) -> str:
        return f"{self.base}/status"

    def event_topic(self, name: str) -> str:
        return f"{self.base}/events/{name}"

    def _envelope(self, kind: str, name: str, body: Mapping[str, Any]) -> bytes:
        self._seq += 1
        doc = {"v": SCHEMA_VERSION, kind: name, "gateway": self.gateway,
               "ts": round(self._now(), 3), "seq": self._seq}
        doc.update(body)
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    def _state_payload(self, state: str, reason: str) -> bytes:
        return json.dumps({"v": SCHEMA_VERSION, "gateway": self.gateway, "state": state,
                           "reason": reason, "ts": round(self._now(), 3),
                           "version": __version__}, separators=(",", ":")).encode()

    # -- the non-blocking entry point -------------------------------------

    def _stopping(self) -> bool:
        """close() has been called (a method, so each check reads it afresh)."""
        return self._closing

    def publish_event(self, event: Event) -> bool:
        """The daemon hook: queue one typed event (its wire form,
        docs/telemetry.md). Never blocks; returns False if an older event
        was dropped. Anything that is not an event is a bug in the caller
        and raises :class:`UnknownEvent`."""
        if not isinstance(event, (DaemonEvent, TunnelEvent)):
            raise UnknownEvent(event, "MQTT telemetry")
        return self.publish(event.to_dict())

    def publish(self, doc: object) -> bool:
        """Queue one flat event dict (``{"event": name, fields...}``, as
        :meth:`DaemonEvent.to_dict` makes it) after sanitizing it. Never
        blocks, never raises; returns False if the event was refused or an
        older one was dropped."""
        try:
            if not isinstance(doc, Mapping):
                self.stats.rejected += 1
                return False
            name = doc.get("event")
            if not isinstance(name, str) or not _EVENT_NAME.fullmatch(name):
                self.stats.rejected += 1
                log.warning("telemetry: refused an event with an invalid name")
                return False
            redacted: list[str] = []
            body = sanitize({k: v for k, v in doc.items() if k != "event"}, redacted)
            for reserved in ("v", "kind", "gateway", "ts", "seq"):
                body.pop(reserved, None)
            if redacted:
                self.stats.redacted += len(redacted)
                # Names only: the values are exactly what must not be logged.
                log.warning("telemetry: removed %d field(s) from %s event: %s",
                            len(redacted), name, ", ".join(redacted[:8]))
            if name == "status":
                payload = self._envelope("kind", "status", body)
                return self._enqueue(self.status_topic, payload, True)
            payload = self._envelope("event", name, body)
            return self._enqueue(self.event_topic(name), payload, False)
        except Exception:
            self.stats.rejected += 1
            log.exception("telemetry: could not queue an event")
            return False

    def _enqueue(self, topic: str, payload: bytes, retain: bool) -> bool:
        ok = True
        while len(self._queue) >= max(1, self.options.queue_size):
            self._queue.popleft()
            self.stats.dropped += 1
            ok = False
        self._queue.append((topic, payload, retain))
        self.stats.queued += 1
        self._wake.set()
        return ok

    def pending(self) -> int:
        return len(self._queue)

    # -- the connection task ----------------------------------------------

    async def run(self) -> None:
        """Publish until :meth:`close`; reconnects with backoff forever."""
        delay = self.options.backoff_initial
        self._running = True
        self._done.clear()
        try:
            while not self._stopping():
                try:
                    await self._session()
                    delay = self.options.backoff_initial
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - aiomqtt.MqttError, OSError, TLS
                    self.stats.failures += 1
                    log.warning("telemetry: MQTT broker %s:%d: %s; retrying in %.1f s",
                                self.options.host, self.options.port, exc, delay)
                finally:
                    self.stats.connected = False
                if self._stopping():   # close() ran while we were connected or waiting
                    break
                # Jitter around the delay so a fleet does not reconnect in step.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay * (0.5 + self._rng()))
                delay = min(delay * 2, self.options.backoff_max)
        finally:
            self._running = False
            self._done.set()

    # The timeout bounds the flush only: the offline state and the disconnect
    # still run after it, which a caller's asyncio.timeout() would cancel.
    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Flush what is queued (for at most ``timeout``), publish the
        retained ``offline`` state, disconnect and let :meth:`run` return."""
        self._closing = True
        self._close_deadline = time.monotonic() + timeout
        self._wake.set()
        self._closed.set()
        if self._running:
            try:
                await asyncio.wait_for(self._done.wait(), timeout + 1.0)
            except TimeoutError:
                log.warning("telemetry: MQTT session did not end in time")

    def _make_client(self) -> Any:
        import aiomqtt  # imported here: the CLI's --help must stay fast

        o = self.options
        will = aiomqtt.Will(self.state_topic, self._state_payload("offline", "connection lost"),
                            qos=1, retain=True)
        factory = self._factory or aiomqtt.Client
        client = factory(
            o.host, o.port, username=o.username,
            password=o.password.reveal().decode() if o.password is not None else None,
            identifier=o.client_id or f"qkdgate-{self.gateway}", will=will,
            tls_context=o.tls, keepalive=o.keepalive, timeout=o.timeout)
        if self._bypass is not None:
            _bypass_before_connect(client, self._bypass)
        return client

    async def _session(self) -> None:
        client = self._make_client()
        async with client:
            self.stats.connected = True
            self.stats.connects += 1
            log.info("telemetry: connected to MQTT broker %s:%d", self.options.host,
                     self.options.port)
            try:
                await client.publish(self.state_topic, self._state_payload("online", "connected"),
                                     qos=1, retain=True)
                await self._pump(client)
            except asyncio.CancelledError:
                # Cancelled (daemon shutting down without close()): a clean
                # DISCONNECT suppresses the will, so say offline ourselves.
                await self._say_offline(client, 1.0)
                raise
            await self._say_offline(client, max(0.1, self._close_deadline - time.monotonic()))

    async def _pump(self, client: Any) -> None:
        next_status = time.monotonic()
        while True:
            if self._status is not None and time.monotonic() >= next_status:
                self._publish_status()
                next_status = time.monotonic() + self.options.interval
            while self._queue:
                if self._closing and time.monotonic() > self._close_deadline:
                    return
                topic, payload, retain = self._queue[0]
                await client.publish(topic, payload, qos=self.options.qos, retain=retain)
                # Removed only once the broker has it (QoS 1): an event in
                # flight when the link breaks is sent again first.
                if self._queue and self._queue[0][1] is payload:
                    self._queue.popleft()
                self.stats.published += 1
            if self._closing:
                return
            self._wake.clear()
            wait = max(0.05, next_status - time.monotonic()) if self._status else None
            # Idle: wake on a new event, the status timer, or the broker going
            # away (noticed now, not at the next publish, so the retry starts
            # at once and `connected` tells the truth).
            gone = getattr(client, "_disconnected", None)  # aiomqtt 2.5 internal future
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([waker] + ([gone] if gone is not None else []), timeout=wait,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
            if gone is not None and gone.done():
                cause = None if gone.cancelled() else gone.exception()
                raise ConnectionError(f"the MQTT broker closed the connection ({cause})")

    async def _say_offline(self, client: Any, timeout: float) -> None:  # noqa: ASYNC109  as close()
        try:
            await asyncio.wait_for(client.publish(
                self.state_topic, self._state_payload("offline", "shutdown"), qos=1, retain=True),
                timeout)
        except Exception as exc:  # noqa: BLE001
            log.warning("telemetry: could not publish the offline state: %s", exc)

    def _publish_status(self) -> None:
        try:
            body = dict(self._status() if self._status else {})
        except Exception:
            log.exception("telemetry: status provider failed")
            body = {}
        body["telemetry"] = self.stats.as_dict()
        self.publish({"event": "status", **body})


def _bypass_before_connect(client: Any, bypass: Callable[[socket.socket], None]) -> None:
    """Make paho (under aiomqtt 2.5 / paho-mqtt 2.2) create its TCP socket
    through us, so ``bypass`` runs before ``connect()``."""
    paho = client._client

    def create_connection() -> socket.socket:
        err: OSError | None = None
        for family, kind, proto, _, addr in socket.getaddrinfo(
                paho._host, paho._port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                try:
                    bypass(sock)
                except Exception as exc:  # noqa: BLE001 - a TunnelError becomes a retry
                    raise OSError(f"cannot exempt the MQTT socket from tunnel policies: "
                                  f"{exc}") from None
                sock.settimeout(paho._connect_timeout)
                sock.connect(addr)
                return sock
            except OSError as exc:
                sock.close()
                err = exc
        raise err or OSError(f"no address for {paho._host}")

    paho._create_socket_connection = create_connection
