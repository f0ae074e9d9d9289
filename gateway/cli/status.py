"""``qkdgate status``: what every tunnel is doing, from the running daemon.

Theory of operation: asks the daemon over the control socket
(:mod:`qkdgate.gateway.daemon.control`) and prints one row per tunnel: state,
generation, SA age, the key inputs that made the current SAs (ML-KEM
algorithm, X25519, QKD key_IDs -- IDs only, never keys), time to the next
rekey, traffic counters and the last error. ``--json`` prints the daemon's
answer unchanged for scripts. Exit code 0 if every tunnel is up, 3 if any is
not (so monitoring can run ``qkdgate status -q``), 1 if the daemon cannot
be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="read the control socket path from this configuration")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (default /run/qkdgate/control.sock)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing; exit 0 if all tunnels are up, 3 otherwise")
    p.add_argument("tunnel", nargs="?", help="show only this tunnel (with its generations)")


def run(args: argparse.Namespace) -> int:
    from qkdgate.gateway.daemon.control import request, socket_path

    result = request(socket_path(args), "status")
    tunnels = result.get("tunnels", [])
    if args.tunnel:
        tunnels = [t for t in tunnels if t.get("tunnel") == args.tunnel]
        if not tunnels:
            from qkdgate.errors import ConfigError
            raise ConfigError(f"no tunnel named {args.tunnel!r} in the running daemon")
        result = {**result, "tunnels": tunnels}
    all_up = all(t.get("state") == "up" for t in tunnels)
    if args.quiet:
        return 0 if all_up else 3
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(render(result, detail=bool(args.tunnel)))
    return 0 if all_up else 3


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 0:
        return "overdue"
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _bytes(n: Any) -> str:
    n = int(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def inputs_text(inputs: Any) -> str:
    if not inputs or (not inputs.get("kem") and not inputs.get("qkd_key_ids")):
        return "-"
    parts = [inputs["kem"]] if inputs.get("kem") else []
    if inputs.get("x25519"):
        parts.append("X25519")
    ids = inputs.get("qkd_key_ids") or []
    sources = inputs.get("qkd_sources") or []
    if ids and len(sources) == len(ids):
        # several key sources: each key_ID after the index of its source
        parts.append("QKD[" + ",".join(f"#{s}:{i[:8]}"
                                       for s, i in zip(sources, ids, strict=True)) + "]")
    elif ids:
        # the first 8 hex digits identify a key_ID in a log search
        parts.append("QKD[" + ",".join(i[:8] for i in ids) + "]")
    else:
        parts.append("no QKD")
    return "+".join(parts)


def render(result: dict[str, Any], *, detail: bool = False) -> str:
    head = (f"gateway {result.get('gateway', '?')}  up {_age(result.get('uptime'))}  "
            f"peers: " + ", ".join(f"{p['peer']} {p.get('state', '?')}"
                                   for p in result.get("peers", [])))
    cols = ("TUNNEL", "TYPE", "STATE", "GEN", "SA AGE", "KEY INPUTS", "NEXT REKEY",
            "BYTES IN/OUT", "LAST ERROR")
    rows = [cols]
    for t in result.get("tunnels", []):
        state = t.get("state", "?") + (" (fallback)" if t.get("fallback") else "")
        gen = t.get("generation")
        rows.append((
            t.get("tunnel", "?"), t.get("type", "?"), state,
            "-" if gen is None else str(gen), _age(t.get("sa_age")),
            inputs_text(t.get("inputs")), _age(t.get("next_rekey_in")),
            f"{_bytes(t.get('bytes_in'))}/{_bytes(t.get('bytes_out'))}",
            (t.get("last_error") or "-")[:60],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head]
    if result.get("needs_restart"):
        lines.append("reloaded config has changes that need a restart: "
                     + ", ".join(result["needs_restart"]))
    lines.append("")
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.extend(key_service_lines(result.get("key_service")))
    if detail:
        for t in result.get("tunnels", []):
            lines.append("")
            lines.append(f"{t['tunnel']}: policy {t.get('policy')}, peer {t.get('peer')}")
            for g in t.get("generations", []):
                sas = ", ".join(f"{s['direction']} {s['spi']} reqid {s['reqid']}"
                                for s in g.get("sas", []))
                flag = " active" if g.get("active") else (" adopted" if g.get("adopted") else "")
                lines.append(f"  generation {g['generation']}{flag}: age {_age(g.get('age'))}, "
                             f"{inputs_text(g.get('inputs'))}, SAs: {sas or '-'}")
                lines.extend(f"    {line}" for line in key_id_lines(g.get("inputs"),
                                                                  t.get("qkd_sources")))
    return "\n".join(lines)


def key_id_lines(inputs: Any, names: Any) -> list[str]:
    """One line per QKD key_ID of a generation; with several key sources,
    the source each came from (by its configured name where known)."""
    inputs = inputs or {}
    ids = inputs.get("qkd_key_ids") or []
    sources = inputs.get("qkd_sources") or []
    if len(sources) != len(ids):
        return [f"QKD key_ID {kid}" for kid in ids]
    names = names if isinstance(names, list) else []
    return [f"QKD key_ID {kid} from source #{s}"
            + (f" {names[s]}" if isinstance(s, int) and 0 <= s < len(names) else "")
            for s, kid in zip(sources, ids, strict=True)]


def key_service_lines(ks: Any) -> list[str]:
    """The key service's pools and the generations they serve from, with
    their inputs and QKD key_IDs (docs/keyservice.md 6)."""
    if not isinstance(ks, dict):
        return []
    out = ["", f"key service {ks.get('kme_id')}: {ks.get('delivered', 0)} keys delivered, "
               f"{ks.get('refused', 0)} requests refused"]
    for name, p in (ks.get("pools") or {}).items():
        out.append(f"  pool {name}: {p.get('local_sae')} <-> {p.get('remote_sae')} via peer "
                   f"{p.get('peer')}, {p.get('key_size')} bits, {p.get('policy')}")
        for g in p.get("generations", []):
            out.append(f"    generation {g.get('generation')} {g.get('state')}"
                       f"{' (serving)' if g.get('serving') else ''}: {g.get('inputs')}, "
                       f"served {g.get('served')}, fetched {g.get('fetched')}, "
                       f"remaining {g.get('remaining')}")
            out.extend(f"      QKD key_ID {kid}" for kid in g.get("qkd_key_ids", []))
    return out
