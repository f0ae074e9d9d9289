"""Mutual TLS between an SAE and its KME (ETSI GS QKD 014 5.1 and 4.2).

Theory of operation: ETSI GS QKD 014 leaves the mapping between an identity
(SAE ID, KME ID) and a certificate open. qkdgate uses the common reading:
the ID is the subject CN or a SAN (DNS name or URI) of the peer certificate.
The SAE side (client) verifies the KME's chain against the configured CA,
its hostname (unless told to check only the KME ID, for KMEs reached by an
address their certificate does not name), and -- where ``kme_id`` is
configured -- that the certificate names that KME. The KME side (server,
simulator) requires a client certificate from its CA and takes the SAE ID
from it.

TLS 1.2 is the floor (ETSI GS QKD 014 5.1). The classical TLS here carries
QKD keys; docs/qkd.md explains why that link must stay inside the site.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path

from qkdgate.errors import ConfigError, KeySourceAuthError


def client_context(cert: str | Path, key: str | Path, ca: str | Path, *,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """An SSLContext for an SAE: presents ``cert``/``key``, trusts only ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = check_hostname
    _load(ctx, cert, key, ca)
    return ctx


def server_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """An SSLContext for a KME: requires a client certificate from ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, cert, key, ca)
    return ctx


def _load(ctx: ssl.SSLContext, cert: str | Path, key: str | Path, ca: str | Path) -> None:
    for what, path in (("tls.cert", cert), ("tls.key", key), ("tls.ca", ca)):
        if not path or not Path(path).is_file():
            raise ConfigError(f"file not found: {path}", path=what)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load certificate/key ({exc.__class__.__name__}: "
                          f"{getattr(exc, 'reason', None) or exc})", path="tls.cert") from None
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load CA ({exc})", path="tls.ca") from None


def cert_names(peercert: Mapping[str, object] | None) -> set[str]:
    """Subject CNs and SAN DNS/URI/IP entries of a certificate as returned
    by :meth:`ssl.SSLSocket.getpeercert` (the verified, decoded form)."""
    names: set[str] = set()
    if not peercert:
        return names
    subject = peercert.get("subject", ())
    for rdn in subject if isinstance(subject, (tuple, list)) else ():
        for attr, value in _pairs(rdn):
            if attr == "commonName":
                names.add(str(value))
    for kind, value in _pairs(peercert.get("subjectAltName", ())):
        if kind in ("DNS", "URI", "IP Address"):
            names.add(str(value))
    return names


def _pairs(seq: object) -> Iterator[tuple[object, object]]:
    """The (name, value) pairs of getpeercert()'s nested tuples."""
    for item in seq if isinstance(seq, (tuple, list)) else ():
        if isinstance(item, tuple) and len(item) == 2:
            yield item[0], item[1]


def check_peer_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, expected: str,
                  role: str = "KME") -> None:
    """Raise KeySourceAuthError unless the verified peer certificate names
    ``expected`` (ETSI GS QKD 014 5.1: the SAE authenticates the KME)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    names = cert_names(cert)
    if expected not in names:
        shown = ", ".join(sorted(names)[:4]) or "no names"
        raise KeySourceAuthError(f"{role} certificate does not name {role} ID {expected!r} "
                                 f"(it names {shown})")
