"""Where profiled CPU goes, by area of qkdgate (bench/profile_rekey.py on the
host, bench/vs_strongswan.py --cprofile in the lab): a cProfile's own times,
the standard library's and the builtins' charged to the area of the code
that called them, as a table, then the functions with the most time of
their own. Nothing here imports qkdgate."""
import pstats
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = str(HERE.parent) + "/"
# (area, pattern on the file path): the first match names a function's area
AREAS = [
    ("recording kernel (stands in for XFRM)", r"qkdgate/testing/fakes\.py"),
    ("bench: completion polling", r"^bench/"),
    ("tunnels: netlink (XFRM messages built and sent, answers parsed)",
     r"^tunnels/(xfrm\w*|netlink\w*)\.py"),
    ("tunnels: SA specs, generation records, timers, install bookkeeping",
     r"^tunnels/(manager|tunnel|ipsec_tunnel|timers|events)\.py"),
    ("tunnels: other", r"^tunnels/"),
    ("keymix (KDF, combiner, per-SA keys)", r"^keymix/"),
    ("protocol: messages, fragments, exchange", r"^gateway/protocol/"),
    ("daemon: peer runner, tunnel loop, journal", r"^gateway/daemon/"),
    ("telemetry and logging", r"^gateway/telemetry/|/logging/"),
    ("KME client (ETSI 014 over HTTPS)", r"^adapters/|aiohttp|yarl|multidict|/ssl\.py"),
    ("cryptography (ML-KEM, ML-DSA, X25519, HKDF)",
     r"cryptography|kyber|oqs|<built-in method _?openssl"),
    ("asyncio and the event loop", r"asyncio|selectors"),
]


def area_of(filename: str) -> str | None:
    rel = filename.replace(ROOT, "")
    for name, pat in AREAS:
        if re.search(pat, rel):
            return name
    return None


Func = tuple[str, int, str]


def charge(stats: dict[Func, tuple], func: Func, amount: float, into: dict[str, float],
           depth: int = 0) -> None:
    """Add ``amount`` of ``func``'s own time to its area; time of the standard
    library and builtins goes to the areas of its callers, in proportion to
    what each caller's calls took (cProfile records that per caller edge)."""
    filename, _line, name = func
    area = area_of(filename if filename != "~" else name)
    callers = stats[func][4] if func in stats else {}
    if area is not None or not callers or depth > 12:
        into[area or "other (stdlib, builtins)"] += amount
        return
    weights = {c: edge[3] for c, edge in callers.items()}   # cumulative time per edge
    total = sum(weights.values()) or 1.0
    for c, w in weights.items():
        charge(stats, c, amount * w / total, into, depth + 1)


def report(st: pstats.Stats, reps: int, n: int, top: int) -> None:
    """Print the table per rekey-all (``reps`` profiled) of ``n`` tunnels."""
    stats = st.stats   # type: ignore[attr-defined]
    by_area: dict[str, float] = defaultdict(float)
    funcs = []
    for func, (_cc, _nc, tt, _ct, _callers) in stats.items():
        mine: dict[str, float] = defaultdict(float)
        charge(stats, func, tt, mine)
        for k, v in mine.items():
            by_area[k] += v
        area = max(mine, key=mine.__getitem__) if mine else "other (stdlib, builtins)"
        filename, line, name = func
        funcs.append((tt, area, f"{filename.replace(ROOT, '').replace(sys.base_prefix, '')}"
                                f":{line} {name}"))
    total = sum(by_area.values())
    left_out = sum(v for k, v in by_area.items() if k.startswith(("recording", "bench")))
    daemons = total - left_out
    print(f"\nprofiled CPU per rekey-all: {total / reps:.3f} s, of which the daemons "
          f"{daemons / reps:.3f} s = {daemons / reps / n * 1e3:.2f} ms a tunnel "
          f"(both sides together)")
    print("\n(standard library and builtins charged to their callers' areas)")
    print("| area | CPU per rekey-all | share of the daemons' |\n|---|---|---|")
    for area, t in sorted(by_area.items(), key=lambda kv: -kv[1]):
        share = "" if area.startswith(("recording", "bench")) else f"{100 * t / daemons:.1f} %"
        print(f"| {area} | {t / reps * 1e3:.1f} ms | {share} |")
    print(f"\ntop {top} functions by their own time (the daemons' only):")
    print("| own time per rekey-all | area (charged to) | function |\n|---|---|---|")
    for tt, area, where in sorted(funcs, reverse=True):
        if top <= 0:
            break
        if area.startswith(("recording", "bench")):
            continue
        print(f"| {tt / reps * 1e3:.1f} ms | {area} | `{where}` |")
        top -= 1


