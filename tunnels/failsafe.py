"""``qkdgate failsafe``: neutralise what a dead daemon left in the kernel.

Theory of operation: run by systemd as ``ExecStopPost=`` (so after any
exit, SIGKILL and crashes included) and by operators. It needs nothing from
the daemon but the tunnel registry (:mod:`qkdgate.tunnels.state`), and
falls back to sweeping by kind when the registry is missing or damaged.

* IPsec: every SA whose reqid lies in the recorded (or ``--reqids``) range
  is deleted. The policies stay: they carry required templates, so with no
  SA the kernel drops protected traffic instead of sending it in clear, and
  cleartext arriving for the protected side matches no SA and is dropped
  (RFC 4301 5.2, fail closed). Kernel hard lifetimes would remove the SAs
  anyway; failsafe does not wait for them.
* MACsec: every TX SA of each recorded link (all macsec links with
  ``--all-macsec``) is set inactive and the link is taken down. MACsec SAs
  have no lifetime, so without this the dead daemon's SAK would protect (and
  accept) traffic forever. The parent interface carries no protected
  traffic: it only ever sees MACsec frames or nothing.

* Key consumers (WireGuard, strongSwan: docs/consumers.md): a preshared
  key or PPK has no lifetime at all, so each recorded consumer is failed
  closed by ``qkdgate.tunnels.<kind>.failsafe`` after *every* exit, clean or
  not: WireGuard gets a random preshared key and its peer's allowed IPs
  emptied (no packet passes either way; the daemon puts them back once a
  generation installs).

Under systemd (``--systemd``, as the unit runs it) failsafe reads
``$SERVICE_RESULT`` (systemd.exec(5)). After a *clean* exit
(``success``: the daemon stopped on SIGTERM and chose what to leave) the
IPsec SAs are kept: each carries a kernel hard lifetime, so none outlives
its key, and a ``systemctl restart`` or upgrade is hitless (the new daemon
adopts and replaces them, docs/daemon.md). After a crash, SIGKILL, watchdog
kill or failed start, everything above is done. MACsec is neutralised
either way: it has no kernel lifetime to fall back on.

Each step is attempted even if an earlier one failed; the exit status is 1
if anything could not be done, so systemd records the failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TypedDict

from qkdgate.tunnels.state import DEFAULT_PATH


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", default=DEFAULT_PATH, metavar="PATH",
                   help=f"tunnel registry written by the daemon (default {DEFAULT_PATH})")
    p.add_argument("--netns", action="append", default=[], metavar="NAME",
                   help="act in this network namespace too ('' = the current one); repeatable")
    p.add_argument("--reqids", metavar="MIN-MAX",
                   help="also delete XFRM SAs whose reqid is in this range")
    p.add_argument("--all-macsec", action="store_true",
                   help="deactivate and take down every macsec link, recorded or not")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    p.add_argument("--systemd", action="store_true",
                   help="run as ExecStopPost: after a clean exit ($SERVICE_RESULT=success) "
                        "keep IPsec SAs to their kernel hard lifetime (hitless restart)")


def keep_ipsec_sas(args: argparse.Namespace, environ: dict[str, str]) -> bool:
    """True when IPsec SAs may stay: a clean stop under systemd. Anything
    else (a crash, SIGKILL, watchdog, no $SERVICE_RESULT) deletes them."""
    return bool(args.systemd) and environ.get("SERVICE_RESULT") == "success"


def _parse_range(text: str) -> tuple[int, int]:
    from qkdgate.errors import ConfigError

    try:
        lo, hi = (int(x, 0) for x in text.split("-", 1))
    except ValueError:
        raise ConfigError("--reqids must look like MIN-MAX, e.g. 65536-131071",
                          found=text) from None
    if not 0 < lo <= hi <= 0xFFFFFFFF:
        raise ConfigError("--reqids must satisfy 0 < MIN <= MAX < 2^32", found=text)
    return lo, hi


class _Todo(TypedDict):
    reqids: list[int] | None
    links: list[str]
    consumers: list[dict[str, str]]


def run(args: argparse.Namespace) -> int:
    from qkdgate.tunnels.state import TunnelRegistry

    extra = _parse_range(args.reqids) if args.reqids else None
    plan: dict[str, _Todo] = {}
    for ns, entry in TunnelRegistry.load(args.state).items():
        plan[ns] = {"reqids": entry["ipsec_reqids"], "links": list(entry["macsec_links"]),
                    "consumers": list(entry["consumers"])}
    for ns in args.netns:
        plan.setdefault(ns, {"reqids": None, "links": [], "consumers": []})
    if not plan:
        plan[""] = {"reqids": None, "links": [], "consumers": []}
    if not extra and not args.all_macsec and not any(
            t["reqids"] or t["links"] or t["consumers"] for t in plan.values()):
        # Nothing recorded and nothing asked: say so rather than pretend.
        print(f"failsafe: no tunnels recorded in {args.state}; nothing done "  # noqa: T201 (CLI)
              "(use --reqids and --all-macsec to sweep)", file=sys.stderr)
        return 0
    if keep_ipsec_sas(args, dict(os.environ)):
        print("failsafe: clean exit: IPsec SAs kept until their kernel hard lifetime "  # noqa: T201
              "(hitless restart); MACsec neutralised", flush=True)
        for todo in plan.values():
            todo["reqids"] = None
        extra = None
    failures = 0
    for ns, todo in plan.items():
        failures += _failsafe_ns(ns or None, todo["reqids"], extra, todo["links"],
                                 args.all_macsec, args.dry_run)
        failures += _consumers(ns or None, todo["consumers"], args.dry_run)
    return 1 if failures else 0


CONSUMER_MODULES = {"wireguard": "qkdgate.tunnels.wireguard",
                    "strongswan": "qkdgate.tunnels.strongswan"}


def _consumers(ns: str | None, records: list[dict[str, str]], dry: bool) -> int:
    """Each kind's ``failsafe(ns, records, dry, say) -> failures``."""
    import importlib

    from qkdgate.errors import QkdgateError

    failures = 0
    by_kind: dict[str, list[dict[str, str]]] = {}
    for rec in records:
        by_kind.setdefault(rec.get("kind", ""), []).append(rec)
    for kind, recs in by_kind.items():
        module = CONSUMER_MODULES.get(kind)
        if module is None:
            _say(ns, f"unknown key consumer {kind!r} in the registry: {len(recs)} not handled")
            failures += len(recs)
            continue
        try:
            failures += int(importlib.import_module(module).failsafe(ns, recs, dry, _say))
        except (QkdgateError, ImportError, AttributeError) as exc:
            _say(ns, f"{kind}: {exc}")
            failures += len(recs)
    return failures


def _say(ns: str | None, text: str) -> None:
    print(f"failsafe[{ns or 'default netns'}]: {text}", flush=True)  # noqa: T201 (CLI output)


def _failsafe_ns(ns: str | None, reqids: list[int] | None, extra: tuple[int, int] | None,
                 links: list[str], all_macsec: bool, dry: bool) -> int:
    from qkdgate.errors import TunnelError

    failures = 0
    ranges = [tuple(r) for r in (reqids, extra) if r]
    if ranges:
        try:
            failures += _ipsec(ns, ranges, dry)
        except TunnelError as exc:
            _say(ns, f"IPsec: {exc}")
            failures += 1
    if links or all_macsec:
        try:
            failures += _macsec(ns, links, all_macsec, dry)
        except TunnelError as exc:
            _say(ns, f"MACsec: {exc}")
            failures += 1
    return failures


def _ipsec(ns: str | None, ranges: list[tuple[int, ...]], dry: bool) -> int:
    from qkdgate.tunnels.xfrm import XfrmBackend

    failures = 0
    be = XfrmBackend(ns, verify=False)
    try:
        doomed = [st for st in be.list_sas() if any(lo <= st.reqid <= hi for lo, hi in ranges)]
        if dry:
            for st in doomed:
                _say(ns, f"would delete SA spi={st.sa_id.spi:#x} reqid={st.reqid}")
        else:
            for st, err in zip(doomed, be.remove_sas([st.sa_id for st in doomed]), strict=True):
                if err is not None and err.errno != 3:  # ESRCH: expired meanwhile, fine
                    _say(ns, f"delete SA spi={st.sa_id.spi:#x}: {err}")
                    failures += 1
        guarded = [p for p in be.list_policies()
                   if p.template is not None and not p.template.optional]
        larval = sum(1 for st in doomed if not st.aead)   # SPIs reserved, never keyed
        _say(ns, f"IPsec: {'would delete' if dry else 'deleted'} {len(doomed)} SA(s)"
                 f"{f' ({larval} reserved SPI(s) never keyed)' if larval else ''}; "
                 f"{len(guarded)} policy(ies) with required templates kept (traffic blocked)")
    finally:
        be.close()
    return failures


def _macsec(ns: str | None, links: list[str], all_macsec: bool, dry: bool) -> int:
    from qkdgate.errors import TunnelError
    from qkdgate.tunnels.macsec import MacsecBackend

    failures = 0
    be = MacsecBackend(ns)
    try:
        names = list(dict.fromkeys(links + (be.macsec_links() if all_macsec else [])))
        for name in names:
            try:
                sas = be.tx_sas(name)
            except TunnelError as exc:
                if exc.errno == 19:  # ENODEV: the link is gone, nothing can leak through it
                    _say(ns, f"MACsec {name}: already gone")
                    continue
                _say(ns, f"MACsec {name}: {exc}")
                failures += 1
                sas = []
            for st in sas:
                if dry:
                    _say(ns, f"would deactivate {name} TX SA AN {st.an}")
                    continue
                try:
                    be.set_tx_sa_active(name, st.an, False)
                except TunnelError as exc:
                    _say(ns, f"MACsec {name} AN {st.an}: {exc}")
                    failures += 1
            if not dry:
                try:
                    be.set_link_up(name, False)
                except TunnelError as exc:
                    _say(ns, f"MACsec {name} link down: {exc}")
                    failures += 1
            _say(ns, f"MACsec {name}: {len(sas)} TX SA(s) {'would be ' if dry else ''}"
                     f"deactivated, link {'would go' if dry else 'taken'} down")
    finally:
        be.close()
    return failures


if __name__ == "__main__":  # python -m qkdgate.tunnels.failsafe
    parser = argparse.ArgumentParser(prog="qkdgate failsafe")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
