"""Fuzz bench: a chosen number of mutated inputs through every parser an
attacker or a broken peer can reach, and the h11 invariant for each: parse,
or the remote/config error type, never anything else.

    .venv/bin/python bench/fuzz.py [--cases 100000] [--targets a,b] [--seed 1]
                                   [--no-coverage] [--max-len 20000]

Targets and the only exceptions each may raise:

  protocol.decode     peer message decoder           RemoteProtocolError
  protocol.fragment   fragment header + Reassembler  RemoteProtocolError
  protocol.session    PeerSession.receive_datagram   nothing (counts and drops)
  etsi014             status / key container / key_IDs parsers, error bodies
                                                     KeySourceError
  etsi004             OPEN_CONNECT / GET_KEY answers KeySourceError,
                                                     LocalProtocolError (status 5)
  etsi004-binary      binary 004 frames (requests    FrameError
                      and answers), re-encoded when parsed: the same bytes
  config              the YAML config loader         ConfigError
  control             control socket requests        nothing (answers an error)

Each case is a seed input (real messages of a full exchange, valid KME
answers, the example config, valid control requests) or random bytes, put
through 1-4 mutations: bit flips, byte and "interesting value" writes,
truncation, insertion, deletion, duplication of a slice, a splice with
another seed. The random generator is seeded (--seed), so a run is
repeatable. Output: per target, the cases, seconds, cases per second, which
allowed exceptions were raised how often, and every other exception type
with a count and the first input (hex) that raised it; then line and
branch coverage (coverage.py) of the decoders' source files. The exit
status is 1 if any non-protocol exception was seen.

Not a test (tests/fuzz runs the Hypothesis targets in the test command);
the documented run is in docs/security.md ("Fuzzing").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import hmac
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Source files whose coverage is reported (the decoders and their callers).
COVERED = [
    "gateway/protocol/messages.py", "gateway/protocol/fragment.py",
    "adapters/etsi014_codec.py", "adapters/etsi004.py",
    "gateway/config/model.py", "gateway/config/schema.py", "gateway/config/validate.py",
    "gateway/daemon/control.py",
    "gateway/protocol/session.py", "gateway/protocol/handshake.py",
    "adapters/etsi004_frame.py",
]

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x00, 0x20, 0x22, 0x5B, 0x7B, 0x0A, 0x3A]


@dataclass
class Target:
    name: str
    seeds: list[bytes]
    run: Callable[[bytes], list[str] | None]   # optional outcome labels to count
    allowed: tuple[type[BaseException], ...]
    files: tuple[str, ...]                      # source files whose coverage it reports
    max_len: int = 20_000
    counts: collections.Counter = field(default_factory=collections.Counter)
    bad: dict[str, tuple[int, bytes, str]] = field(default_factory=dict)


def mutate(rnd: random.Random, data: bytes, seeds: list[bytes], max_len: int) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(8)
        n = len(b)
        if op == 0 and n:                      # flip one bit
            i = rnd.randrange(n)
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and n:                    # an interesting byte
            b[rnd.randrange(n)] = rnd.choice(INTERESTING)
        elif op == 2 and n:                    # a random byte
            b[rnd.randrange(n)] = rnd.randrange(256)
        elif op == 3:                          # truncate
            del b[rnd.randint(0, n):]
        elif op == 4:                          # insert random bytes
            i = rnd.randint(0, n)
            b[i:i] = rnd.randbytes(rnd.randint(1, 8))
        elif op == 5 and n:                    # delete a slice
            i = rnd.randrange(n)
            del b[i:i + rnd.randint(1, 16)]
        elif op == 6 and n:                    # duplicate a slice
            i = rnd.randrange(n)
            j = min(n, i + rnd.randint(1, 64))
            b[j:j] = b[i:j]
        else:                                  # splice with another seed
            other = rnd.choice(seeds)
            i, j = rnd.randint(0, n), rnd.randint(0, len(other))
            b = b[:i] + other[j:]
    return bytes(b[:max_len])


# -- targets -------------------------------------------------------------------

def protocol_targets() -> list[Target]:
    sys.path.insert(0, str(ROOT / "tests" / "protocol"))
    from protocol_harness import make_pair  # type: ignore[import-not-found]

    from qkdgate.errors import RemoteProtocolError
    from qkdgate.gateway.protocol import messages as m
    from qkdgate.gateway.protocol.fragment import Reassembler, fragment, parse_header

    pair = make_pair()
    pair.roundtrip_until_done()
    datagrams = [d for _, d in pair.log]
    r, msgs = Reassembler(), []
    for d in datagrams:
        raw = r.feed(d, 0.0)
        if raw is not None:
            msgs.append(raw)

    def fragments(data: bytes) -> None:
        parse_header(data)
        reasm = Reassembler()
        # one datagram fed alone, then in a run with the real fragments
        reasm.feed(data, 0.0)
        for i, d in enumerate(datagrams[:6]):
            reasm.feed(d, float(i))

    session_counter = [0]

    def session(data: bytes) -> list[str]:
        n = session_counter[0] = session_counter[0] + 1
        gw = pair.a if n % 2 else pair.b
        if n % 4 < 2 and len(data) > m.MAC_LEN:
            # Re-seal the mutated message with a valid mac1 (as anyone can
            # without a PSK) and fragment it, so it reaches the state machine.
            key = m.mac1_key(gw.name, None)
            body = data[:-m.MAC_LEN]
            data = body + hmac.new(key, body, hashlib.sha256).digest()[:m.MAC_LEN]
            datagrams = fragment(data, n) if len(data) <= 16384 else [data[:1200]]
            label = "re-sealed message: handled without an exception"
        else:
            datagrams, label = [data], "raw datagram: handled without an exception"
        for d in datagrams:
            gw.session.receive_datagram(d, pair.now)
        while gw.session.next_event() is not None:
            pass
        gw.session.datagrams_to_send(pair.now)
        return [label]

    def decode(data: bytes) -> None:
        m.decode(data)

    return [Target("protocol.decode", msgs, decode, (RemoteProtocolError,), (COVERED[0],)),
            Target("protocol.fragment", datagrams, fragments, (RemoteProtocolError,),
                   (COVERED[1],)),
            Target("protocol.session", datagrams + msgs, session, (),
                   (*COVERED[:2], *COVERED[8:10]))]


def etsi_targets() -> list[Target]:
    from qkdgate.adapters import etsi004
    from qkdgate.adapters import etsi014_codec as codec
    from qkdgate.errors import KeySourceError, LocalProtocolError

    kid = [str(uuid.UUID(int=i, version=4)) for i in range(1, 4)]
    key = base64.b64encode(bytes(range(32))).decode()
    status = {"source_KME_ID": "KME-A", "target_KME_ID": "KME-B", "master_SAE_ID": "SAE-A",
              "slave_SAE_ID": "SAE-B", "key_size": 256, "stored_key_count": 25000,
              "max_key_count": 100000, "max_key_per_request": 128, "max_key_size": 1024,
              "min_key_size": 64, "max_SAE_ID_count": 0}
    container = {"keys": [{"key_ID": k, "key": key} for k in kid[:2]],
                 "key_container_extension": {}}
    seeds014 = [json.dumps(d).encode() for d in (
        status, container, {"key_IDs": [{"key_ID": k} for k in kid]},
        {"message": "keys are being generated", "details": [{"reason": "x"}]})]

    parsers = (("status", codec.parse_status),
               ("key_container", lambda d: codec.parse_key_container(d, size_bits=256,
                                                                     max_keys=3)),
               ("key_IDs", codec.parse_key_ids))

    methods = ("status", "enc_keys", "dec_keys")
    http = (400, 401, 404, 500, 503)

    def run014(data: bytes) -> list[str]:
        # error bodies: parse_error never raises, classify_error always
        # returns a KeySourceError (one method and status per case, by length)
        err = codec.classify_error(methods[len(data) % 3], http[len(data) % 5], data)
        if not isinstance(err, KeySourceError):
            raise AssertionError("classify_error returned a non-KeySourceError")
        out = []
        for name, fn in parsers:
            try:
                fn(data)
                out.append(f"{name}: (parsed)")
            except KeySourceError as exc:
                out.append(f"{name}: {type(exc).__name__}")
        return out

    seeds004 = [json.dumps(d).encode() for d in (
        {"status": 0, "key_stream_ID": kid[0],
         "qos": {"key_chunk_size": 32, "max_bps": 1000, "min_bps": 100, "jitter": 10,
                 "priority": 0, "timeout": 1000, "ttl": 3600,
                 "metadata_mimetype": "application/json"}},
        {"status": 0, "index": 7, "key_buffer": key, "metadata": {"size": 0}},
        {"status": 8, "metadata_size": 512})]

    def run004(data: bytes) -> list[str]:
        out = []
        for name, fn in (("OPEN_CONNECT", etsi004.parse_open),
                         ("GET_KEY", lambda d: etsi004.parse_get_key(d, 32))):
            try:
                fn(data)
                out.append(f"{name}: (parsed)")
            except (KeySourceError, LocalProtocolError) as exc:
                out.append(f"{name}: {type(exc).__name__}")
        return out

    # KME bodies: parse_error reads 4 KiB, the codec refuses more than 4 MiB
    return [Target("etsi014", seeds014, run014, (), (COVERED[2],), max_len=8192),
            Target("etsi004", seeds004, run004, (), (COVERED[3],), max_len=8192)]


def config_target() -> Target:
    from qkdgate.errors import ConfigError
    from qkdgate.gateway.config.model import parse_config

    seeds = [p.read_bytes() for p in sorted((ROOT / "tests" / "config").glob("good-*.yaml"))]
    seeds.append((ROOT / "systemd" / "qkdgate.yaml").read_bytes())

    def run(data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        try:
            cfg = parse_config(text, "f.yaml", base_dir="/etc/qkdgate")
        except ConfigError as exc:
            if "\n" in str(exc):
                raise AssertionError("multi-line ConfigError") from None
            raise
        cfg.to_dict()

    return Target("config", seeds, run, (ConfigError,), tuple(COVERED[4:7]))


def control_target() -> Target:
    import types

    from qkdgate.errors import ConfigError
    from qkdgate.gateway.daemon.control import MAX_REQUEST, ControlServer
    from qkdgate.gateway.daemon.daemon import Daemon

    class StandIn:
        def rekey(self, tunnel: str) -> dict[str, Any]:
            if tunnel != "t1":
                raise ConfigError(f"no tunnel named {tunnel!r}")
            return {"tunnel": "t1"}

    async def status(req: Any) -> dict[str, Any]:
        return {"gateway": "gw-a"}

    server = ControlServer("/nonexistent/control.sock", {
        "status": status, "rekey": types.MethodType(Daemon._ctl_rekey, StandIn())})
    loop = asyncio.new_event_loop()

    async def answer(data: bytes) -> dict[str, Any]:
        reader = asyncio.StreamReader(limit=MAX_REQUEST)
        reader.feed_data(data)
        reader.feed_eof()
        return await server._answer(reader)

    def run(data: bytes) -> list[str]:
        got = loop.run_until_complete(answer(data))
        json.dumps(got)
        if got["ok"]:
            return ["answered ok"]
        kind = got["error"]["type"]
        if kind not in ("bad_request", "ConfigError"):
            raise AssertionError(f"control answered {kind}")
        return [f"answered {kind}"]

    seeds = [b'{"cmd": "status"}\n', b'{"cmd": "rekey", "tunnel": "t1"}\n',
             b'{"cmd": "reload"}\n', b'{"cmd": "rekey", "tunnel": ["t1"]}\n']
    return Target("control", seeds, run, (), (COVERED[7],))


def etsi004_binary_target() -> Target:
    from qkdgate.adapters import etsi004_frame as frame

    vectors = json.loads((ROOT / "tests" / "vectors" / "etsi004-frames.json").read_text())
    seeds = [bytes.fromhex(c["frame"]) for c in vectors["cases"]]

    def run(data: bytes) -> list[str]:
        out = []
        for name, allowed in (("request", frame.REQUESTS), ("response", frame.RESPONSES)):
            try:
                msg = frame.decode(data, allowed)
            except frame.FrameError as exc:
                out.append(f"{name}: FrameError {exc.reason}")
                continue
            if frame.encode(msg) != data:
                raise AssertionError("a parsed frame does not re-encode to its bytes")
            out.append(f"{name}: (parsed)")
        return out

    return Target("etsi004-binary", seeds, run, (), (COVERED[10],), max_len=4096)


BUILDERS: dict[str, Callable[[], list[Target]]] = {
    "protocol": protocol_targets, "etsi": etsi_targets,
    "etsi004-binary": lambda: [etsi004_binary_target()],
    "config": lambda: [config_target()], "control": lambda: [control_target()],
}


# -- running -------------------------------------------------------------------

def run_target(t: Target, cases: int, rnd: random.Random, max_len: int) -> float:
    max_len = min(max_len, t.max_len)
    start = time.perf_counter()
    for i in range(cases):
        r = rnd.random()
        if r < 0.05:
            data = rnd.randbytes(rnd.randint(0, 300))
        elif r < 0.10:
            data = rnd.choice(t.seeds)          # unmutated: the happy path stays covered
        else:
            data = mutate(rnd, rnd.choice(t.seeds), t.seeds, max_len)
        try:
            labels = t.run(data)
            t.counts.update(labels if labels is not None else ["(parsed)"])
        except t.allowed as exc:
            t.counts[type(exc).__name__] += 1
        except Exception as exc:   # noqa: BLE001 - exactly what the bench looks for
            name = type(exc).__name__
            t.counts["NON-PROTOCOL " + name] += 1
            t.bad.setdefault(name, (i, data, repr(exc)[:200]))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000, help="cases per target")
    ap.add_argument("--targets", default="", help="comma-separated name prefixes (default all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=20_000, help="longest mutated input, bytes")
    ap.add_argument("--no-coverage", action="store_true")
    args = ap.parse_args(argv)

    cov = None
    if not args.no_coverage:
        import coverage
        cov = coverage.Coverage(data_file=None, branch=True,
                                include=[str(ROOT / p) for p in COVERED])
        cov.start()
    targets = [t for build in BUILDERS.values() for t in build()]
    if args.targets:
        wanted = [w.strip() for w in args.targets.split(",") if w.strip()]
        targets = [t for t in targets if any(t.name.startswith(w) for w in wanted)]
    total_bad = 0
    print(f"fuzz: {args.cases} cases per target, seed {args.seed}, "
          f"coverage {'off' if cov is None else 'on'}")
    for t in targets:
        # a seeded, repeatable mutation stream; nothing cryptographic
        rnd = random.Random(f"{args.seed}/{t.name}")  # noqa: S311
        secs = run_target(t, args.cases, rnd, args.max_len)
        bad = sum(n for k, n in t.counts.items() if k.startswith("NON-PROTOCOL"))
        total_bad += bad
        print(f"\n{t.name}: {args.cases} cases in {secs:.1f} s "
              f"({args.cases / secs:,.0f}/s), non-protocol exceptions: {bad}")
        for k, n in t.counts.most_common():
            print(f"  {n:>9}  {k}")
        for name, (i, data, text) in t.bad.items():
            print(f"  first {name} at case {i}: {text}\n    input ({len(data)} bytes): "
                  f"{data[:120].hex()}{'...' if len(data) > 120 else ''}")
    if cov is not None:
        cov.stop()
        print("\ncoverage of the decoders (lines, branches):")
        ran = {f for t in targets for f in t.files}
        for p in (p for p in COVERED if p in ran):
            try:
                _, stmts, _, missing, _ = cov.analysis2(str(ROOT / p))
            except coverage.CoverageException:
                continue
            data = cov.get_data()
            arcs = data.arcs(str(ROOT / p)) or []
            pct = 100.0 * (len(stmts) - len(missing)) / max(1, len(stmts))
            print(f"  {p:<34} {pct:5.1f}% of {len(stmts)} lines, {len(arcs)} arcs seen")
        with open(os.devnull, "w") as devnull:
            total = cov.report(file=devnull, include=[str(ROOT / p) for p in ran])
        print(f"  total of these files (lines and branches, coverage.py): {total:.1f}%")
    print(f"\nfuzz: {'FAIL' if total_bad else 'ok'}: {total_bad} non-protocol exception(s)")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
