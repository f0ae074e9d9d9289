"""Cross-checks of a parsed configuration, and its plain-data form.

Theory of operation: the schema walker has already checked every value on
its own; :func:`validate` checks values against each other -- references
resolve, names are unique, address families agree, lifetimes are ordered
so make-before-break has room, reqid ranges do not collide -- and raises the
first problem as a :class:`~qkdgate.errors.ConfigError` located by YAML path
and line. :func:`warnings` lists things that are legal but probably not what
the operator meant; ``check-config`` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import re
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qkdgate.interfaces import Mode

if TYPE_CHECKING:
    from qkdgate.gateway.config.model import Config, WireguardConfig


_SECRET_KEY_RE = re.compile(r"(?i)(passw(or)?d|secret|token|psk|private|api_?key|credential)")


def validate(cfg: Config) -> None:
    from qkdgate.gateway.config.model import (
        BUILTIN_KEY_SOURCE_KINDS,
        IDENTITY_PREFIX,
        KIND_NEEDS_MTLS,
        KIND_NEEDS_URL,
        MTLS_KINDS,
        REQID_SPAN,
        SUPPORTED_VERSIONS,
        KemSuite,
        Profile,
        TunnelType,
    )

    if cfg.version not in SUPPORTED_VERSIONS:
        raise cfg.error("version", "unsupported configuration version",
                        expected=" or ".join(map(str, SUPPORTED_VERSIONS)), found=str(cfg.version))
    g = cfg.gateway
    if g.profile is Profile.CNSA2 and g.suite not in (None, KemSuite.ML_KEM_1024):
        raise cfg.error("gateway.suite", "profile cnsa2 needs ML-KEM-1024 (CNSA 2.0)",
                        expected="ML-KEM-1024 or no suite", found=f"'{g.suite.value}'")

    _unique(cfg, "peers", [p.name for p in cfg.peers], "peer name")
    _unique(cfg, "key_sources", [k.name for k in cfg.key_sources], "key source name")
    _unique(cfg, "tunnels", [t.name for t in cfg.tunnels], "tunnel name")

    # -- key sources
    # The registry's list reads every installed package's entry points: only
    # for a kind that is not built in (issue 19: not at every start).
    kinds: set[str] = set(BUILTIN_KEY_SOURCE_KINDS)
    if any(ks.kind not in kinds for ks in cfg.key_sources):
        kinds = _known_kinds(BUILTIN_KEY_SOURCE_KINDS)
    for i, ks in enumerate(cfg.key_sources):
        at = f"key_sources[{i}]"
        if ks.kind not in kinds:
            # the list depends on installed plugins, so it goes in a hint, not in 'expected'
            close = difflib.get_close_matches(ks.kind, sorted(kinds), n=1)
            hint = f", did you mean '{close[0]}'?" if close else \
                f" (known here: {', '.join(sorted(kinds))})"
            raise cfg.error(f"{at}.kind", "unknown key source kind" + hint,
                            expected="a built-in kind or an installed qkdgate.key_sources plugin",
                            found=f"'{ks.kind}'")
        if ks.kind in KIND_NEEDS_URL and ks.url is None:
            raise cfg.error(at, f"key source kind {ks.kind} needs a url",
                            expected="url: https://...", found="no url")
        if ks.url is not None:
            _check_url(cfg, f"{at}.url", ks.url, ks.kind)
        if ks.kind in MTLS_KINDS:
            missing = [k for k in ("cert", "key", "ca") if getattr(ks.tls, k, None) is None]
            if missing:
                raise cfg.error(f"{at}.tls" if ks.tls else at,
                                f"key source kind {ks.kind} needs mutual TLS "
                                + ("(ETSI GS QKD 014 requires it)" if ks.kind in KIND_NEEDS_MTLS
                                   else "(both ETSI 004 bindings run over it)"),
                                expected="tls: {cert, key, ca}",
                                found="no " + ", ".join("tls." + k for k in missing))
        if getattr(ks, "binding", None) is not None and ks.kind != "etsi004":
            raise cfg.error(f"{at}.binding", "binding is an ETSI 004 setting",
                            expected="no binding, or kind etsi004", found=f"kind {ks.kind}")
        if ks.tls is not None:
            _check_tls(cfg, f"{at}.tls", ks.tls)
        for key in ks.options:
            if _SECRET_KEY_RE.search(key) and not key.endswith("_file"):
                # the config is printed, logged and versioned: secrets live in files
                raise cfg.error(f"{at}.options.{key}", "secrets are not written in the "
                                "configuration", expected=f"'{key}_file' naming a file that "
                                "holds it", found=f"'{key}'")
        if ks.kind in KIND_NEEDS_MTLS:
            _check_vendor_options(cfg, i, KIND_NEEDS_MTLS[ks.kind])

    # -- peers
    sources = {k.name for k in cfg.key_sources}
    endpoints: dict[tuple[str, int], int] = {}
    sae_ids: dict[tuple[str, str], int] = {}
    for i, p in enumerate(cfg.peers):
        at = f"peers[{i}]"
        if p.name == g.name:
            raise cfg.error(f"{at}.name", "a peer cannot have this gateway's name",
                            expected=f"a name other than '{g.name}'", found=f"'{p.name}'")
        _check_unicast(cfg, f"{at}.address", p.address)
        listen = g.listen.address
        if p.address.version != listen.version and str(listen) != "::":
            # a UDP socket bound to one family cannot reach the other; "::" is
            # bound dual-stack (IPV6_V6ONLY off) by the daemon
            raise cfg.error(f"{at}.address", f"IPv{p.address.version} peer but "
                            f"gateway.listen.address {listen} is IPv{listen.version}",
                            expected=f"an IPv{listen.version} address, or listen on ::",
                            found=str(p.address))
        first = endpoints.setdefault((str(p.address), p.port), i)
        if first != i:
            raise cfg.error(f"{at}.address", f"same address and port as peers[{first}]",
                            expected="one peer per address and port",
                            found=f"{p.address} port {p.port}")
        _unique(cfg, f"{at}.identities", list(p.identities), "pinned identity")
        for j, ident in enumerate(p.identities):
            if ident.startswith(IDENTITY_PREFIX):
                _check_identity(cfg, f"{at}.identities[{j}]", ident)
        if p.qkd is None:
            continue
        for src_at, src in _qkd_sources(cfg, f"{at}.qkd", p.qkd):
            if src.key_source not in sources:
                raise cfg.error(f"{src_at}.key_source", "unknown key source",
                                expected=_one_of(sources, "a key source defined in key_sources"),
                                found=f"'{src.key_source}'")
            if src.local_sae_id == src.peer_sae_id:
                raise cfg.error(f"{src_at}.peer_sae_id", "the peer's SAE ID equals ours",
                                expected=f"an SAE ID other than '{src.local_sae_id}'",
                                found=f"'{src.peer_sae_id}'")
            if src.key_size % 8:
                raise cfg.error(f"{src_at}.key_size", "key size must be whole bytes",
                                expected="a multiple of 8 bits", found=str(src.key_size))
            first = sae_ids.setdefault((src.key_source, src.peer_sae_id), i)
            if first != i:
                raise cfg.error(f"{src_at}.peer_sae_id",
                                f"same key source and peer SAE ID as peers[{first}]",
                                expected="one peer per SAE ID", found=f"'{src.peer_sae_id}'")

    # -- tunnels
    peers = {p.name: p for p in cfg.peers}
    reqids: list[tuple[int, int]] = []
    ifnames: dict[str, int] = {}
    scis: dict[tuple[str, int], int] = {}
    wg_peers: dict[tuple[str, str], int] = {}
    for i, t in enumerate(cfg.tunnels):
        at = f"tunnels[{i}]"
        if t.peer not in peers:
            raise cfg.error(f"{at}.peer", "unknown peer",
                            expected=_one_of(peers, "a peer defined in peers"), found=f"'{t.peer}'")
        own = t.type.value
        if getattr(t, own) is None:
            raise cfg.error(at, f"type {own} needs a '{own}' section",
                            expected=f"{own}: {{...}}", found=f"no {own} section")
        for other in (k.value for k in TunnelType if k is not t.type):
            if getattr(t, other) is not None:
                raise cfg.error(f"{at}.{other}", f"'{other}' section in a tunnel of type {own}",
                                expected=f"only an '{own}' section",
                                found=f"an '{other}' section")
        if "qkd" in t.policy.required and peers[t.peer].qkd is None:
            raise cfg.error(f"{at}.policy", f"policy {t.policy.value} requires QKD keys but "
                            f"peer '{t.peer}' has no qkd section",
                            expected="a peer with qkd settings or policy pqc-fallback/pqc-only",
                            found=f"'{t.policy.value}'")
        r = t.rekey
        if not r.interval < r.soft_lifetime:
            raise cfg.error(f"{at}.rekey.interval", "rekey interval must be shorter than "
                            "the soft lifetime", expected=f"less than {_s(r.soft_lifetime)}",
                            found=_s(r.interval))
        if not r.soft_lifetime < r.hard_lifetime:
            raise cfg.error(f"{at}.rekey.soft_lifetime", "soft lifetime must be shorter than "
                            "the hard lifetime", expected=f"less than {_s(r.hard_lifetime)}",
                            found=_s(r.soft_lifetime))
        if not r.interval + r.grace < r.hard_lifetime:
            # the old generation must outlive the switch plus the grace period
            raise cfg.error(f"{at}.rekey.grace", "interval + grace must be shorter than "
                            "the hard lifetime",
                            expected=f"less than {_s(r.hard_lifetime - r.interval)}",
                            found=_s(r.grace))
        if t.ipsec is not None:
            _check_ipsec(cfg, f"{at}.ipsec", t.ipsec)
            lo, hi = t.ipsec.reqid, t.ipsec.reqid + REQID_SPAN - 1
            for j, (olo, ohi) in enumerate(reqids):
                if lo <= ohi and olo <= hi and olo:
                    raise cfg.error(f"{at}.ipsec.reqid", f"reqid range {lo}-{hi} overlaps "
                                    f"tunnels[{j}]'s {olo}-{ohi}",
                                    expected=f"reqids {REQID_SPAN} apart", found=str(lo))
            reqids.append((lo, hi))
        else:
            reqids.append((0, 0))
        if t.macsec is not None:
            name = t.macsec_interface
            if name is None:
                raise TypeError(f"{at}: MACsec tunnel without an interface name")   # our bug
            if name == t.macsec.parent:
                raise cfg.error(f"{at}.macsec.interface", "interface equals its parent",
                                expected=f"a name other than '{name}'", found=f"'{name}'")
            first_octet = int(t.macsec.peer_mac[:2], 16)
            if first_octet & 1 or int(t.macsec.peer_mac.replace(":", "").replace("-", ""),
                                      16) == 0:
                raise cfg.error(f"{at}.macsec.peer_mac", "not a unicast MAC address",
                                expected="the peer's interface MAC address",
                                found=t.macsec.peer_mac)
            # the kernel refuses a second MACsec device with the same SCI (our
            # MAC + port) on one parent: IEEE 802.1AE-2018 8.2.1 SCIs are unique
            first = scis.setdefault((t.macsec.parent, t.macsec.port), i)
            if first != i:
                raise cfg.error(f"{at}.macsec.port", f"same parent and SCI port as "
                                f"tunnels[{first}]", expected="a different port on "
                                f"{t.macsec.parent}", found=str(t.macsec.port))
            first = ifnames.setdefault(name, i)
            if first != i:
                raise cfg.error(f"{at}.macsec", f"interface name '{name}' already used by "
                                f"tunnels[{first}]", expected="a unique macsec.interface",
                                found=f"'{name}'")

        if t.wireguard is not None:
            _check_wireguard(cfg, at, t.wireguard, wg_peers, i)
        # strongswan: checks of the strongswan section go here

    # -- telemetry
    m = cfg.telemetry.mqtt
    if m.password_file is not None and m.username is None:
        raise cfg.error("telemetry.mqtt.password_file", "a password needs a username",
                        expected="telemetry.mqtt.username", found="no username")
    if m.tls is not None:
        _check_tls(cfg, "telemetry.mqtt.tls", m.tls)

    # -- key service (docs/keyservice.md 5)
    if cfg.key_service is not None:
        _check_key_service(cfg, cfg.key_service)

    # -- high availability (docs/operations.md "High availability")
    if cfg.ha is not None:
        _check_ha(cfg)


def _check_ha(cfg: Config) -> None:
    """An HA node speaks from the site's virtual address: the peer pins that
    address (replies from a node's own address are dropped, docs/protocol.md
    3); each tunnel's ipsec.local_address is a VIP too (not checked: it may
    be another VRRP address). Only IPsec tunnels fail over for now."""
    listen = cfg.gateway.listen.address
    if listen.is_unspecified:
        raise cfg.error("gateway.listen.address", "an HA node must listen on the site's "
                        "virtual address (the VRRP VIP), not on every address: the peer "
                        "accepts the control channel only from the VIP",
                        expected="the VIP, with net.ipv4.ip_nonlocal_bind=1 on both nodes",
                        found=str(listen))
    for i, t in enumerate(cfg.tunnels):
        if t.ipsec is None:
            raise cfg.error(f"tunnels[{i}].type", "HA fails over IPsec tunnels only",
                            expected="ipsec", found=t.type.value)


def _check_wireguard(cfg: Config, at: str, w: WireguardConfig,
                     seen: dict[tuple[str, str], int], i: int) -> None:
    """One qkdgate tunnel per WireGuard peer: two would fight over its PSK."""
    first = seen.setdefault((w.interface, w.peer_public_key), i)
    if first != i:
        raise cfg.error(f"{at}.wireguard.peer_public_key", f"same interface and peer as "
                        f"tunnels[{first}]", expected="one tunnel per WireGuard peer",
                        found=w.peer_public_key)
    for j, net in enumerate(w.allowed_ips):
        if any(net.version == o.version and net.overlaps(o) for o in w.allowed_ips[:j]):
            raise cfg.error(f"{at}.wireguard.allowed_ips[{j}]", "overlaps an earlier entry",
                            expected="distinct networks", found=str(net))


def warnings(cfg: Config) -> list[str]:
    """Legal but suspicious settings, as 'path: text' lines."""
    out = []
    for i, t in enumerate(cfg.tunnels):
        peer = cfg.peer(t.peer)
        if "qkd" in t.policy.optional and peer.qkd is None:
            out.append(f"tunnels[{i}].policy: {t.policy.value} but peer '{peer.name}' has no qkd "
                       "section: this tunnel will run on PQC keys only")
        if t.macsec is None and t.rekey.macsec_pn_threshold != 0.75:
            out.append(f"tunnels[{i}].rekey.macsec_pn_threshold: ignored for IPsec tunnels")
    for i, p in enumerate(cfg.peers):
        ts = cfg.tunnels_for(p.name)
        if p.qkd is not None and ts and not any(t.policy.uses_qkd for t in ts):
            out.append(f"peers[{i}].qkd: no tunnel to '{p.name}' has a policy that uses QKD; "
                       "these settings are unused")
    out += _qkd_wait_warnings(cfg)
    for i, p in enumerate(cfg.peers):
        # one session per peer rekeys at its tunnels' shortest interval
        intervals = sorted({t.rekey.interval for t in cfg.tunnels_for(p.name)})
        if len(intervals) > 1:
            out.append(f"peers[{i}]: tunnels to '{p.name}' have different rekey intervals; "
                       f"the session with it rekeys every {_s(intervals[0])}")
    used = {s.key_source for p in cfg.peers if p.qkd is not None for s in p.qkd.source_list}
    for i, ks in enumerate(cfg.key_sources):
        if ks.name not in used:
            out.append(f"key_sources[{i}]: '{ks.name}' is not used by any peer")
    for i, p in enumerate(cfg.peers):
        if not cfg.tunnels_for(p.name):
            out.append(f"peers[{i}]: '{p.name}' has no tunnel")
    if not cfg.tunnels:
        out.append("tunnels: none configured; the gateway will protect no traffic")
    for i, t in enumerate(cfg.tunnels):
        if 0 < t.rekey.max_bytes < 1 << 20:
            out.append(f"tunnels[{i}].rekey.max_bytes: {t.rekey.max_bytes} bytes is under 1 MiB; "
                       "expect a rekey every few packets under load")
    m, prom = cfg.telemetry.mqtt, cfg.telemetry.prometheus
    if m.enabled and m.tls is None and not _is_loopback(m.host):
        out.append(f"telemetry.mqtt.tls: none towards {m.host}: tunnel state"
                   + (" and the broker password" if m.password_file else "")
                   + " travel in clear text")
    if prom.enabled and not prom.address.is_loopback:
        out.append(f"telemetry.prometheus.address: {prom.address} serves metrics (topology, "
                   "key-source health) beyond this host; firewall it")
    return out


def _qkd_wait_warnings(cfg: Config) -> list[str]:
    """A tunnel that requires QKD keeps sending only while its rekey gets a
    key before the hard lifetime: when a key source may take longer than
    that to fail (timeout x (retries + 1), ETSI GS QKD 014 client), a slow
    KME blocks the tunnel before a failed rekey is tried again. A
    ``pqc-fallback`` tunnel needs no warning: its QKD wait is cut to fit
    (docs/faults.md "The QKD wait")."""
    out = []
    for i, t in enumerate(cfg.tunnels):
        qkd = cfg.peer(t.peer).qkd
        if qkd is None or "qkd" not in t.policy.required:
            continue
        window = t.rekey.hard_lifetime - t.rekey.interval
        for ref in qkd.source_list:
            ks = cfg.key_source(ref.key_source)
            if ks.worst_wait > window:
                out.append(f"tunnels[{i}].rekey: {t.policy.value}, and key source "
                           f"'{ks.name}' may take {_s(ks.worst_wait)} (timeout x (retries + 1)) to "
                           f"fail, more than the {_s(window)} from a rekey to the hard "
                           "lifetime: a KME that slow blocks this tunnel")
    return out


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def to_plain(obj: Any) -> Any:
    """Dataclasses, enums, addresses, tuples -> JSON-able dicts/lists/scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name))
                for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (ipaddress.IPv4Address, ipaddress.IPv6Address,
                        ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(obj)
    if isinstance(obj, (tuple, list)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, (dict, types.MappingProxyType)):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- helpers

def _unique(cfg: Config, at: str, names: list[str], what: str) -> None:
    seen: dict[str, int] = {}
    field = {"peers": ".name", "key_sources": ".name", "tunnels": ".name"}.get(at, "")
    for i, n in enumerate(names):
        if n in seen:
            raise cfg.error(f"{at}[{i}]{field}", f"duplicate {what} (first at {at}[{seen[n]}])",
                            expected=f"a unique {what}", found=f"'{n}'")
        seen[n] = i


MAX_QKD_SOURCES = 8   # sourced key_IDs carry a u8 index < 16 (docs/protocol.md 4.2, 9.1)


def _qkd_sources(cfg: Config, at: str, q: Any) -> list[tuple[str, Any]]:
    """The sources of one ``peers[].qkd`` with the YAML path of each; checks
    the form (one source or ``sources``, never both) and the rule."""
    single = [k for k in ("key_source", "local_sae_id", "peer_sae_id")
              if getattr(q, k) is not None]
    if q.key_size != 256:      # the default (a JSON dump of the config writes it)
        single.append("key_size")
    if not q.sources:
        missing = [k for k in ("key_source", "local_sae_id", "peer_sae_id")
                   if getattr(q, k) is None]
        if missing:
            raise cfg.error(at, f"missing required key '{missing[0]}'",
                            expected="key_source, local_sae_id and peer_sae_id, or sources",
                            found="no " + ", ".join(missing))
        if q.rule != "all":
            raise cfg.error(f"{at}.rule", "a rule needs several sources",
                            expected="rule: all, or a sources list", found=f"'{q.rule}'")
        return [(at, q.source_list[0])]
    if single:
        raise cfg.error(f"{at}.{single[0]}", "one key source or a sources list, not both",
                        expected=f"'{single[0]}' inside each sources entry",
                        found=f"'{single[0]}' beside sources")
    n = len(q.sources)
    if n > MAX_QKD_SOURCES:
        raise cfg.error(f"{at}.sources", "too many key sources",
                        expected=f"at most {MAX_QKD_SOURCES}", found=str(n))
    if q.rule != "all":
        k_text, _, n_text = q.rule.partition(" of ")
        k, n_rule = int(k_text), int(n_text)
        if n_rule != n:
            raise cfg.error(f"{at}.rule", f"the rule counts {n_rule} sources but sources "
                            f"lists {n}", expected=f"'K of {n}' or all", found=f"'{q.rule}'")
        if k < 1:
            raise cfg.error(f"{at}.rule", "at least one source must deliver",
                            expected=f"'K of {n}' with K >= 1", found=f"'{q.rule}'")
        if k > n:
            raise cfg.error(f"{at}.rule", "more sources required than configured",
                            expected=f"'K of {n}' with K <= {n}", found=f"'{q.rule}'")
    seen: dict[tuple[str, str], int] = {}
    out = []
    for j, src in enumerate(q.sources):
        # the same KME and SAE pair twice would be one key counted twice
        first = seen.setdefault((src.key_source, src.peer_sae_id), j)
        if first != j:
            raise cfg.error(f"{at}.sources[{j}]", f"duplicate source (first at "
                            f"{at}.sources[{first}])", expected="each key source and peer "
                            "SAE ID once", found=f"'{src.key_source}' again")
        out.append((f"{at}.sources[{j}]", src))
    return out


def _one_of(names: Iterable[str], empty: str) -> str:
    names = sorted(names)
    return "one of " + ", ".join(names) if names else empty


def _s(seconds: float) -> str:
    return f"{seconds:g}s"


def _check_unicast(cfg: Config, at: str, addr: Any) -> None:
    if addr.is_unspecified or addr.is_multicast:
        raise cfg.error(at, "not a unicast address", expected="a unicast IP address",
                        found=str(addr))


def _check_url(cfg: Config, at: str, url: str, kind: str) -> None:
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host:
        raise cfg.error(at, "URL without a valid host", expected="https://HOST[:PORT]",
                        found=f"'{url}'")
    from qkdgate.gateway.config.model import MTLS_KINDS
    if kind in MTLS_KINDS and parts.scheme != "https":
        # ETSI GS QKD 014 5.1: HTTPS only; plain HTTP would hand keys to the path
        raise cfg.error(at, "the KME interface must use HTTPS (ETSI GS QKD 014 requires it)",
                        expected="an https:// URL", found=f"'{url}'")
    del port


def _check_tls(cfg: Config, at: str, tls: Any) -> None:
    if (tls.cert is None) != (tls.key is None):
        missing = "key" if tls.key is None else "cert"
        raise cfg.error(at, f"client certificate and key go together; '{missing}' is missing",
                        expected="both cert and key, or neither", found=f"no {missing}")


def _check_key_service(cfg: Config, ks: Any) -> None:
    missing = [k for k in ("cert", "key", "ca") if getattr(ks.tls, k) is None]
    if missing:
        # ETSI GS QKD 014 5.1: SAEs and their KME authenticate each other with TLS.
        raise cfg.error("key_service.tls", "the key service needs mutual TLS",
                        expected="cert, key and ca", found="no " + ", ".join(missing))
    if ks.serve_margin < ks.dec_window + ks.clock_skew:
        raise cfg.error("key_service.serve_margin", "a key served just before its generation "
                        "stops serving must stay fetchable until the secret is erased",
                        expected=f"at least dec_window + clock_skew = "
                                 f"{_s(ks.dec_window + ks.clock_skew)}",
                        found=_s(ks.serve_margin))
    _unique(cfg, "key_service.pools", [p.name for p in ks.pools], "pool name")
    peers = {p.name for p in cfg.peers}
    for i, p in enumerate(ks.pools):
        at = f"key_service.pools[{i}]"
        if p.peer not in peers:
            raise cfg.error(f"{at}.peer", "unknown peer", expected=_one_of(peers, "a peer"),
                            found=f"'{p.peer}'")
        if p.local_sae == p.remote_sae:
            raise cfg.error(f"{at}.remote_sae", "the two SAEs of a pool must differ",
                            expected=f"not '{p.local_sae}'", found=f"'{p.remote_sae}'")
        if p.key_size % 8:
            raise cfg.error(f"{at}.key_size", "key size in bits must be a multiple of 8",
                            expected="a multiple of 8", found=str(p.key_size))
        if p.lifetime <= ks.serve_margin:
            raise cfg.error(f"{at}.lifetime", "the pool would never serve",
                            expected=f"more than serve_margin ({_s(ks.serve_margin)})",
                            found=_s(p.lifetime))
    pairs = [(p.local_sae, p.remote_sae) for p in ks.pools]
    if len(set(pairs)) != len(pairs):
        raise cfg.error("key_service.pools", "two pools for the same SAE pair",
                        expected="one pool per (local_sae, remote_sae)", found="a repeat")
    locals_ = {p.local_sae for p in ks.pools}
    for i, sk in enumerate(ks.skip):
        if sk.local_system not in locals_:
            raise cfg.error(f"key_service.skip[{i}].local_system", "not a local SAE of any pool",
                            expected=_one_of(locals_, "a pools[].local_sae"),
                            found=f"'{sk.local_system}'")


def _check_ipsec(cfg: Config, at: str, s: Any) -> None:
    _check_unicast(cfg, f"{at}.local_address", s.local_address)
    _check_unicast(cfg, f"{at}.remote_address", s.remote_address)
    if s.local_address.version != s.remote_address.version:
        raise cfg.error(f"{at}.remote_address", "address family differs from local_address",
                        expected=f"an IPv{s.local_address.version} address",
                        found=str(s.remote_address))
    if s.local_address == s.remote_address:
        raise cfg.error(f"{at}.remote_address", "remote address equals the local address",
                        expected="the peer's address", found=str(s.remote_address))
    if s.mode is Mode.TUNNEL:
        for side in ("local_subnets", "remote_subnets"):
            if not getattr(s, side):
                raise cfg.error(at, f"tunnel mode needs {side}",
                                expected=f"{side}: [a network, ...]", found=f"no {side}")
        fam_l = {n.version for n in s.local_subnets}
        fam_r = {n.version for n in s.remote_subnets}
        for side, subnets, other in (("local_subnets", s.local_subnets, fam_r),
                                     ("remote_subnets", s.remote_subnets, fam_l)):
            for j, net in enumerate(subnets):
                if net.version not in other:
                    peer_side = "remote" if side == "local_subnets" else "local"
                    raise cfg.error(f"{at}.{side}[{j}]",
                                    f"address family has no match in {peer_side}_subnets",
                                    expected=f"an IPv{sorted(other)[0]} network", found=str(net))
    else:
        for side in ("local_subnets", "remote_subnets"):
            for j, net in enumerate(getattr(s, side)):
                if net.version != s.local_address.version:
                    raise cfg.error(f"{at}.{side}[{j}]", "transport mode selectors must be in "
                                    "the family of the tunnel addresses",
                                    expected=f"an IPv{s.local_address.version} network",
                                    found=str(net))


def _check_identity(cfg: Config, at: str, text: str) -> None:
    """An inline pinned identity must parse (qkdgate.gateway.protocol.identity is the
    one parser of that format); its error is re-located to our path/line."""
    from qkdgate.errors import ConfigError
    try:
        from qkdgate.gateway.protocol.identity import PeerIdentity
    except ImportError:  # pragma: no cover - identity support not in this build
        return
    try:
        PeerIdentity.from_string(text)
    except ConfigError as exc:
        raise cfg.error(at, f"invalid pinned identity: {exc.reason}", expected=exc.expected,
                        found=exc.found) from None


def _known_kinds(fallback: Iterable[str]) -> set[str]:
    """Kinds the adapter registry can build (built-ins and entry points; the
    plugins are not imported here)."""
    try:
        from qkdgate.adapters.registry import available_kinds
    except ImportError:
        return set(fallback)
    return set(available_kinds())


def _check_vendor_options(cfg: Config, i: int, default_profile: str) -> None:
    """Apply the ETSI 014 adapter's own option and SAE ID checks now, so
    check-config reports them with a line number instead of the daemon
    failing at start. The adapter module owns these rules."""
    from qkdgate.errors import ConfigError
    try:
        from qkdgate.adapters.profiles import get_profile
    except ImportError:  # pragma: no cover - adapters not in this build
        return
    ks = cfg.key_sources[i]
    at = f"key_sources[{i}]"
    try:
        profile = get_profile(str(ks.options.get("profile", default_profile)), ks.options)
    except ConfigError as exc:
        raise cfg.error(f"{at}.{exc.path}" if exc.path else f"{at}.options", exc.reason,
                        expected=exc.expected, found=exc.found) from None
    for j, p in enumerate(cfg.peers):
        if p.qkd is None:
            continue
        for n, src in enumerate(p.qkd.source_list):
            if src.key_source != ks.name:
                continue
            at = f"peers[{j}].qkd" + (f".sources[{n}]" if p.qkd.multi else "")
            for key in ("local_sae_id", "peer_sae_id"):
                try:
                    profile.check_sae_id(getattr(src, key), key.replace("_", " "))
                except ConfigError as exc:
                    raise cfg.error(f"{at}.{key}", exc.reason, expected=exc.expected,
                                    found=exc.found) from None
