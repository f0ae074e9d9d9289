"""The tunnel registry: what qkdgate put in the kernel, for ``qkdgate failsafe``.

Theory of operation: MACsec SAs have no kernel lifetime and XFRM SAs live
until their hard lifetime, so when the daemon dies someone must find and
neutralise what it installed without the daemon's memory. The backends
record it here, in a small JSON file (default ``/run/qkdgate/tunnels.json``,
on tmpfs so it vanishes with the kernel state it describes):

    {"version": 1, "namespaces": {"": {"ipsec_reqids": [min, max],
                                        "macsec_links": ["macsec0"],
                                        "consumers": [{"kind": "wireguard",
                                                       "interface": "wg0",
                                                       "peer": "<public key>"}]}}}

Key consumers (docs/consumers.md) record one flat string dict each, with
its ``kind``; ``qkdgate failsafe`` hands a kind's records to
``qkdgate.tunnels.<kind>.failsafe``.

Whoever builds the backends (``qkdgate.gateway.daemon.build``) makes one
registry and hands it to each backend's constructor; a backend given none
records nothing (tests, benches, the failsafe itself). There is no
process-wide default object.

The key ``""`` is the daemon's own namespace, others are netns names. Writes
are atomic (temporary file + rename) and happen only when the recorded set
changes (a new reqid range bound or link), never per rekey. Reading a
missing or damaged file yields an empty registry: failsafe then falls back
to sweeping by kind (every macsec link, the configured reqid range).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import TypedDict

log = logging.getLogger("qkdgate.tunnels")

DEFAULT_PATH = "/run/qkdgate/tunnels.json"


class NamespaceRecord(TypedDict):
    """What qkdgate installed in one network namespace."""

    ipsec_reqids: list[int] | None      # [min, max] of the reqids of SAs installed
    macsec_links: list[str]
    consumers: list[dict[str, str]]     # key consumers: {"kind": ..., their fields}


class TunnelRegistry:
    def __init__(self, path: str = DEFAULT_PATH) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.data: dict[str, NamespaceRecord] = self.load(path)

    @staticmethod
    def load(path: str) -> dict[str, NamespaceRecord]:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            spaces = raw["namespaces"]
            if raw.get("version") != 1 or not isinstance(spaces, dict):
                return {}
            out: dict[str, NamespaceRecord] = {}
            for ns, entry in spaces.items():
                r = entry.get("ipsec_reqids")
                links = entry.get("macsec_links", [])
                consumers = entry.get("consumers", [])
                out[str(ns)] = {
                    "ipsec_reqids": [int(r[0]), int(r[1])] if r else None,
                    "macsec_links": [str(x) for x in links if isinstance(x, str)],
                    "consumers": [{str(k): str(v) for k, v in c.items()} for c in consumers
                                  if isinstance(c, dict) and isinstance(c.get("kind"), str)],
                }
            return out
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return {}

    def _entry(self, netns: str | None) -> NamespaceRecord:
        return self.data.setdefault(netns or "", {"ipsec_reqids": None, "macsec_links": [],
                                                  "consumers": []})

    def _save(self) -> None:
        try:
            self._write()
        except OSError as exc:
            # Installing the SA anyway beats failing the tunnel: its kernel
            # hard lifetime stays the backstop. Say loudly that failsafe is blind.
            log.warning("cannot record tunnels in %s (%s): qkdgate failsafe will not find "
                        "them; pass --reqids/--all-macsec", self.path, exc.strerror)

    def _write(self) -> None:
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "namespaces": self.data}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add_reqid(self, netns: str | None, reqid: int) -> None:
        with self._lock:
            e = self._entry(netns)
            r = e["ipsec_reqids"]
            if r is not None and r[0] <= reqid <= r[1]:
                return
            e["ipsec_reqids"] = [min(reqid, r[0]), max(reqid, r[1])] if r else [reqid, reqid]
            self._save()

    def add_macsec_link(self, netns: str | None, name: str) -> None:
        with self._lock:
            links = self._entry(netns)["macsec_links"]
            if name not in links:
                links.append(name)
                self._save()

    def remove_macsec_link(self, netns: str | None, name: str) -> None:
        with self._lock:
            links = self._entry(netns)["macsec_links"]
            if name in links:
                links.remove(name)
                self._save()

    def add_consumer(self, netns: str | None, record: dict[str, str]) -> None:
        """Record a key consumer (``record["kind"]`` names it) for failsafe."""
        with self._lock:
            consumers = self._entry(netns)["consumers"]
            if record not in consumers:
                consumers.append(dict(record))
                self._save()
