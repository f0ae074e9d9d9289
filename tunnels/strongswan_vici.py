"""The narrow strongSwan interface: charon reached over vici, nothing else.

Theory of operation: qkdgate needs six things from a running charon (as
strongSwan's own kernel_ipsec interface is narrow, this one is too), each
taking a parameter object rather than a vici dictionary:

* ``load_ppk`` / ``unload_shared`` / ``shared_ids``: an RFC 8784 postquantum
  preshared key under a unique id (vici ``load-shared`` type ``PPK``,
  ``unload-shared``, ``get-shared``). The id is what charon names the key by;
  the PPK_ID sent on the wire is the key's *owner* identity, set to the same
  string, so both gateways find generation g's key by one name.
* ``load_conn``: a connection definition (swanctl.conf's ``connections.<name>``
  tree as a mapping) with ``ppk_id`` set and ``ppk_required = yes``.
* ``initiate`` / ``terminate_ike`` / ``list_sas``: start an IKE_SA with its
  CHILD_SAs and learn its unique id, delete one by unique id, read what is up.

Every failure of the socket, of the vici framing or a command charon refuses
becomes :class:`ViciError` (a :class:`~qkdgate.errors.TunnelError`, so the
daemon's tunnel error handling covers it). Messages carry command names and
charon's own error text, never key bytes: the PPK is handed to the vici
encoder and nowhere else.

The PyPI ``vici`` package (extra ``strongswan``) is imported on first use, so
qkdgate without strongSwan never needs it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from qkdgate.errors import TunnelError
from qkdgate.keymix.secret import SecretBytes

# vici list values: swanctl (src/swanctl/commands/load_conns.c, is_list_key)
# splits these comma-separated keys into lists before sending; charon's vici
# plugin parses them only as lists.
LIST_KEYS = frozenset({
    "local_addrs", "remote_addrs", "proposals", "esp_proposals", "ah_proposals",
    "local_ts", "remote_ts", "vips", "pools", "groups", "cert_policy",
})


class ViciError(TunnelError):
    """charon refused a vici command, or the vici socket failed."""

    def __init__(self, op: str, detail: str = "", errno: int | None = None) -> None:
        super().__init__(f"vici {op}", errno, detail)


class ViciAuthFailed(ViciError):
    """``initiate`` failed because the peer refused our IKE_AUTH: its charon
    sent AUTHENTICATION_FAILED (RFC 7296 3.10.1). With ``ppk_required``
    that is what a responder does while its connection still names another
    PPK_ID (charon 5.9.8 logs "received PPK_ID '...', but require '...'")
    or holds other bytes under it."""


@dataclass(frozen=True)
class Ppk:
    """An RFC 8784 PPK: ``ppk_id`` names it on the wire and in charon."""

    ppk_id: str
    key: SecretBytes

    def __post_init__(self) -> None:
        if not self.ppk_id or len(self.ppk_id) > 255:
            raise ValueError("a PPK id is 1..255 characters")
        if len(self.key) < 32:   # RFC 8784 3: at least 256 bits of entropy
            raise ValueError("a PPK has at least 32 bytes")


@dataclass(frozen=True)
class ConnSpec:
    """One connection as swanctl.conf's ``connections.<name>`` holds it,
    loaded with ``ppk_id`` naming the current PPK and ``ppk_required``."""

    name: str
    body: Mapping[str, object]
    ppk_id: str

    def message(self) -> dict[str, object]:
        body = _vici_tree(self.body)
        # RFC 8784 3: without a PPK the peer would fall back to NO_PPK_AUTH;
        # ppk_required refuses that, so a missing key fails closed.
        body["ppk_id"] = self.ppk_id
        body["ppk_required"] = "yes"
        return {self.name: body}


@dataclass(frozen=True)
class ChildSaInfo:
    name: str
    unique_id: int
    state: str
    spi_in: int
    spi_out: int


@dataclass(frozen=True)
class IkeSaInfo:
    """One IKE_SA as ``list-sas`` reports it (no key material)."""

    conn: str
    unique_id: int
    state: str
    initiator: bool
    local_id: str
    remote_id: str
    established_s: int
    children: tuple[ChildSaInfo, ...] = field(default=())


class Vici(Protocol):
    """What a strongSwan consumer needs from charon (this module's client,
    a test double in qkdgate.testing)."""

    def load_ppk(self, ppk: Ppk) -> None: ...
    def unload_shared(self, key_id: str) -> None: ...
    def shared_ids(self) -> frozenset[str]: ...
    def load_conn(self, conn: ConnSpec) -> None: ...
    def initiate(self, conn: str, child: str, timeout_ms: int) -> int: ...
    def terminate_ike(self, unique_id: int, timeout_ms: int) -> None: ...
    def list_sas(self, conn: str | None = None) -> list[IkeSaInfo]: ...
    def close(self) -> None: ...


def _vici_tree(body: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in body.items():
        if isinstance(v, Mapping):
            out[k] = _vici_tree(v)
        elif isinstance(v, (list, tuple)):
            out[k] = [str(x) for x in v]
        elif isinstance(v, bool):
            out[k] = "yes" if v else "no"
        elif k in LIST_KEYS:
            out[k] = [s.strip() for s in str(v).split(",") if s.strip()]
        else:
            out[k] = str(v)
    return out


def _text(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


class ViciClient:
    """A vici session on charon's UNIX socket (``charon.plugins.vici.socket``).

    One request at a time; not thread-safe (the consumer owns one client)."""

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        try:
            import vici  # type: ignore[import-untyped]  # optional extra
        except ImportError as e:
            raise ViciError("connect", "the PyPI package 'vici' is missing "
                            "(pip install 'qkdgate[strongswan]')") from e
        self._exc: tuple[type[BaseException], ...] = (
            vici.exception.SessionException, vici.exception.CommandException,
            vici.exception.DeserializationException, OSError, ValueError)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise ViciError("connect", path, e.errno) from None
        self._s = vici.Session(self._sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ViciClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._exc as e:
            errno = e.errno if isinstance(e, OSError) else None
            raise ViciError(op, _text(e) if not isinstance(e, OSError) else "", errno) from None

    def _drain(self, op: str, gen: Iterator[Any]) -> list[Any]:
        return self._call(op, list, gen)  # type: ignore[no-any-return]

    def load_ppk(self, ppk: Ppk) -> None:
        # vici README "load-shared": id (unique), type PPK, data, owners
        self._call("load-shared", self._s.load_shared, {
            "id": ppk.ppk_id, "type": "PPK", "data": ppk.key.reveal(),
            "owners": [ppk.ppk_id]})

    def unload_shared(self, key_id: str) -> None:
        self._call("unload-shared", self._s.unload_shared, {"id": key_id})

    def shared_ids(self) -> frozenset[str]:
        r = self._call("get-shared", self._s.get_shared)
        return frozenset(_text(k) for k in r.get("keys", []))

    def load_conn(self, conn: ConnSpec) -> None:
        self._call("load-conn", self._s.load_conn, conn.message())

    def unload_conn(self, name: str) -> None:
        self._call("unload-conn", self._s.unload_conn, {"name": name})

    def initiate(self, conn: str, child: str, timeout_ms: int) -> int:
        """Start a new IKE_SA of ``conn`` with CHILD_SA ``child``; wait until it
        is up (or charon gives up) and return the new IKE_SA's unique id."""
        logs: list[Any] = []     # charon's control-log events (vici README "initiate")
        try:
            for m in self._s.initiate({"ike": conn, "child": child, "timeout": str(timeout_ms),
                                       "init-limits": "no"}):
                logs.append(m)
        except self._exc as e:
            detail = _text(e) if not isinstance(e, OSError) else ""
            errno = e.errno if isinstance(e, OSError) else None
            refused = any("AUTHENTICATION_FAILED" in _text(m.get("msg", b"")) for m in logs
                          if isinstance(m, Mapping))
            raise (ViciAuthFailed if refused else ViciError)("initiate", detail, errno) from None
        ids = {int(_text(m["ikesa-uniqueid"])) for m in logs if "ikesa-uniqueid" in m}
        if not ids:
            raise ViciError("initiate", f"{conn}/{child}: no IKE_SA in charon's log")
        return max(ids)

    def terminate_ike(self, unique_id: int, timeout_ms: int) -> None:
        self._drain("terminate", self._s.terminate({
            "ike-id": str(unique_id), "timeout": str(timeout_ms)}))

    def list_sas(self, conn: str | None = None) -> list[IkeSaInfo]:
        filt = {"ike": conn} if conn else None
        out = []
        for msg in self._drain("list-sas", self._s.list_sas(filt)):
            for name, sa in msg.items():
                children = tuple(
                    ChildSaInfo(_text(c.get("name", k)), int(_text(c.get("uniqueid", 0))),
                                _text(c.get("state", "")), int(_text(c.get("spi-in", "0")), 16),
                                int(_text(c.get("spi-out", "0")), 16))
                    for k, c in sa.get("child-sas", {}).items())
                out.append(IkeSaInfo(
                    conn=_text(name), unique_id=int(_text(sa["uniqueid"])),
                    state=_text(sa.get("state", "")),
                    initiator=_text(sa.get("initiator", "no")) == "yes",
                    local_id=_text(sa.get("local-id", "")),
                    remote_id=_text(sa.get("remote-id", "")),
                    established_s=int(_text(sa.get("established", "0"))),
                    children=children))
        return out
