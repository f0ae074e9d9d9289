"""The local control socket between ``qkdgate run`` and the CLI.

Theory of operation: the daemon listens on a Unix stream socket (default
``/run/qkdgate/control.sock``). Only root and the daemon's own user may
talk to it, enforced twice: the socket file is created mode 0600 inside a
0700 directory we own, and every connection's peer credentials
(``SO_PEERCRED``, unix(7)) are checked, so a wrong umask or a loosened
directory never opens it up.

Wire format: one request per connection, one JSON object per line (UTF-8,
at most :data:`MAX_REQUEST` bytes): ``{"cmd": "status"}``,
``{"cmd": "rekey", "tunnel": "t1"}``. The answer is one line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type": ...,
"message": ...}}``. Handlers receive the request dict and return JSON-able
data; a :class:`~qkdgate.errors.QkdgateError` becomes an error answer, and
anything else is logged as a bug and answered as ``internal``, never
crashing the daemon. Answers never contain key material: handlers return
IDs, provenance and counters only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qkdgate.errors import QkdgateError

log = logging.getLogger("qkdgate.control")

DEFAULT_PATH = "/run/qkdgate/control.sock"
MAX_REQUEST = 64 * 1024
Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class ControlError(QkdgateError):
    """The control socket could not be used, or the daemon refused a request."""

    def __init__(self, message: str, kind: str = "control") -> None:
        self.kind = kind
        super().__init__(message)


class BadRequest(ControlError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "bad_request")


def peer_uid(sock: socket.socket) -> int:
    # unix(7) SO_PEERCRED: struct ucred { pid_t pid; uid_t uid; gid_t gid; }
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Serves ``handlers`` (name -> async callable) on a Unix socket."""

    def __init__(self, path: str, handlers: Mapping[str, Handler], *,
                 allowed_uids: frozenset[int] | None = None) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.allowed_uids = allowed_uids if allowed_uids is not None \
            else frozenset({0, os.geteuid()})
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))  # noqa: ASYNC240 - no I/O
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
        if st.st_uid != os.geteuid() and st.st_uid != 0:
            raise ControlError(f"control socket directory {directory} belongs to uid "
                               f"{st.st_uid}; refusing to use it")
        if stat.S_IMODE(st.st_mode) & 0o002 and not st.st_mode & stat.S_ISVTX:
            raise ControlError(f"control socket directory {directory} is world-writable")
        self._remove_stale()
        # The socket is born 0600 (no window with a looser mode). Bind it
        # synchronously: the umask is process-wide, so it must not be held
        # across an await where other tasks create files.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            # e.g. ENXIO on a 9p or other network file system without socket files
            raise ControlError(f"control socket {self.path}: cannot bind: {exc.strerror or exc} "
                               "(the directory must be on a local file system that holds "
                               "UNIX sockets, such as /run)") from None
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                       limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)
        log.info("control socket listening on %s", self.path)

    def _remove_stale(self) -> None:
        if not os.path.exists(self.path):
            return
        if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
            raise ControlError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)   # left by a daemon that died
            return
        finally:
            probe.close()
        raise ControlError(f"another qkdgate daemon is serving {self.path}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock)
            if uid not in self.allowed_uids:
                log.warning("control: refused connection from uid %d", uid)
                answer = _error("permission", "only root may use the control socket")
                # Read (and ignore) the request first: closing an AF_UNIX socket
                # with unread data resets the peer, which would then see
                # ECONNRESET instead of this answer.
                with contextlib.suppress(TimeoutError, ValueError, asyncio.LimitOverrunError):
                    await asyncio.wait_for(reader.readline(), timeout=1.0)
            else:
                answer = await self._answer(reader)
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10.0)
        except asyncio.LimitOverrunError:
            return _error("bad_request", f"request longer than {MAX_REQUEST} bytes")
        except ValueError:   # StreamReader reports an over-long line as ValueError
            return _error("bad_request", f"request longer than {MAX_REQUEST} bytes")
        except TimeoutError:
            return _error("bad_request", "no request within 10 s")
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error("bad_request", f"request is not a JSON object: {exc}")
        except RecursionError:   # nesting deeper than the decoder recurses (control fuzz)
            return _error("bad_request", "request is nested too deeply")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _error("bad_request", 'request must be an object with a string "cmd"')
        handler = self.handlers.get(request["cmd"])
        if handler is None:
            return _error("bad_request", f"unknown command {request['cmd']!r} "
                                         f"(known: {', '.join(sorted(self.handlers))})")
        try:
            return {"ok": True, "result": await handler(request)}
        except ControlError as exc:
            return _error(exc.kind, str(exc))
        except QkdgateError as exc:
            return _error(type(exc).__name__, str(exc))
        except Exception:
            log.exception("control: handler %r failed", request["cmd"])
            return _error("internal", "internal error (see the daemon log)")


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": kind, "message": message}}


def request(path: str, cmd: str, *, timeout: float = 10.0, **params: Any) -> Any:
    """Send one request (blocking; for the CLI). Returns ``result`` or raises
    :class:`ControlError` saying what went wrong in operator terms."""
    payload = json.dumps({"cmd": cmd, **params}).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is `qkdgate run` running?",
                               "unreachable") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root",
                               "permission") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing listens on {path}: the daemon is not running",
                               "unreachable") from None
        # A refusal may arrive before we finish sending: its answer is still queued.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 16 * 1024 * 1024:
                raise ControlError("answer from the daemon too large", "protocol")
    except TimeoutError:
        raise ControlError(f"the daemon did not answer within {timeout:g} s", "timeout") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}", "unreachable") \
            from None
    finally:
        sock.close()
    try:
        answer = json.loads(buf.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError("malformed answer from the daemon", "protocol") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError("malformed answer from the daemon", "protocol")
    if not answer["ok"]:
        err = answer.get("error") or {}
        raise ControlError(str(err.get("message", "request failed")), str(err.get("type", "?")))
    return answer.get("result")


def socket_path(args: Any) -> str:
    """The socket the CLI should use: ``--socket``, else the config's, else the default."""
    if getattr(args, "socket", None):
        return str(args.socket)
    if getattr(args, "config", None):
        from qkdgate.gateway.config.model import load_config
        return load_config(args.config).gateway.control_socket
    return DEFAULT_PATH
