"""The real daemon SIGKILLed at every durable-state point of a rekey.

Two ``qkdgate run`` processes (recording kernel fakes handed to run()) key one tunnel.
Their KMEs are a stand-in with the dangerous failure mode the journal exists
for: after the master restarts, its KME hands out again the key the master
last used and the key it last delivered (as a KME does that thinks those
deliveries were lost), and both KMEs serve any key_ID as often as asked. The master is killed at the N-th crash
point (every journal write step: before, torn, written, synced; and right
after its QKD key went into the combiner), restarted, and must go on keying.

Ground truth comes from inside each process: every call of the combiner
with a QKD key is logged ("use"), and so is every inbound installation with
its generation. Checked: no gateway uses a key_ID twice, installed
generations only grow, both ends keep rekeying after the restart. A control
run with the journal disabled shows the check catching the reuse.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
from daemon_pair import write_pair

WRAPPER = r'''
import hashlib, hmac, json, os, signal, sys, uuid
NAME, USE_LOG, KME_STATE = os.environ["QG_NAME"], os.environ["QG_USE_LOG"], os.environ["QG_KME"]
CRASH = os.environ.get("QG_CRASH", "")        # e.g. "reserve:append-torn#2"
log_fd = os.open(USE_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

def note(**kw):
    os.write(log_fd, (json.dumps({"gw": NAME, **kw}) + "\n").encode())

op = [""]          # which journal operation is writing
counts = {}
def crash_point(point):
    label = f"{op[0]}:{point}" if op[0] else point
    counts[label] = counts.get(label, 0) + 1
    if os.environ.get("QG_TRACE"):
        note(kind="point", point=label, n=counts[label])
    if CRASH == f"{label}#{counts[label]}":
        note(kind="killed", point=label)
        os.kill(os.getpid(), signal.SIGKILL)

from qkdgate.gateway.daemon import journal as J
_init = J.Journal.__init__
def _journal_init(self, *a, **kw):
    kw["_crash_hook"] = crash_point
    _init(self, *a, **kw)
J.Journal.__init__ = _journal_init
def _labelled(name, fn):
    def wrapper(self, *a, **kw):
        op[0] = name
        try:
            return fn(self, *a, **kw)
        finally:
            op[0] = ""
    return wrapper
J.Journal.reserve_qkd_keys = _labelled("reserve", J.Journal.reserve_qkd_keys)
J.Journal.record_generations = _labelled("record", J.Journal.record_generations)
if os.environ.get("QG_NO_JOURNAL"):
    # The control: no key_ID is ever remembered (as with no journal at all),
    # but epochs still grow across restarts (the clock floor of
    # next_local_epoch), as the protocol requires since issue 17 finding 3:
    # with no journal the restarted side would draw a random epoch, half the
    # time below the one its peer remembers, and never rekey again.
    class _Forgetful(J.Journal):
        def _open(self):
            self._fd = 1 << 20   # never written; marks it open
        def _append(self, *recs):
            pass
        def reserve_qkd_keys(self, tunnel, generation, key_ids):
            pass
        def close(self):
            pass
    from qkdgate.gateway.daemon import build as daemon_build
    daemon_build.open_journal = lambda cfg: _Forgetful.open(cfg.gateway.state_dir)

# Protocol timing, injected (what is checked is which keys are refused and
# used, not how long the protocol waits):
# * after the restart the master's KME replays up to four used key_IDs; each
#   is refused (fail closed) and fails its exchange, which the protocol
#   retries with backoff (RETRY_BASE 2 s doubling: 2+4+8 s of pure waiting);
# * an exchange that does stall (a lost datagram) ends at its timeout:
#   EXCHANGE_TIMEOUT 10 s here instead of 30 s (a handshake on a loaded
#   2-core host takes up to ~4 s). The slave's own rekey, begun while the
#   master was dead, no longer stalls against the restarted master: the
#   master's INIT names the slave by its journal's epoch and wins the
#   collision (docs/protocol.md 7).
import dataclasses
from qkdgate.gateway.daemon import build as daemon_build_
_session_config = daemon_build_.session_config
def _quick_retries(*a, **kw):
    return dataclasses.replace(_session_config(*a, **kw), retry_base=0.1, retry_max=0.4,
                               exchange_timeout=10.0)
daemon_build_.session_config = _quick_retries

from qkdgate.keymix import combiner
_combine = combiner.combine
def _logged_combine(inputs):
    session = _combine(inputs)
    if inputs.qkd_key is not None:
        note(kind="use", ids=list(inputs.qkd_key_ids))
        crash_point("combined")
    return session
combiner.combine = _logged_combine

from qkdgate.tunnels import manager as TM
_install = TM.TunnelManager.install_inbound
def _logged_install(self, generation, *a, **kw):
    note(kind="install", gen=generation)
    crash_point("install")
    return _install(self, generation, *a, **kw)
TM.TunnelManager.install_inbound = _logged_install

from qkdgate.interfaces import KeySourceStatus, QkdKey
from qkdgate.keymix.secret import SecretBytes
SEED = b"qkdgate crash test"

def _kid(k):
    return str(uuid.UUID(bytes=hashlib.sha256(b"%d" % k).digest()[:16], version=4))

def _last_used():
    # What this gateway last mixed (from the use log): the worst key to see again.
    last = None
    if os.path.exists(USE_LOG):
        for line in open(USE_LOG):
            r = json.loads(line)
            if r["gw"] == NAME and r["kind"] == "use":
                last = r["ids"][-1]
    return last

class ReplayingKme:
    """Master: key_IDs from a counter kept in a file. After a start it first
    re-delivers the key this gateway last used (for three requests), then the
    key it last delivered (if different): a KME that believes those
    deliveries were lost.
    Serves any key_ID to the slave, as often as asked."""
    replays = None
    async def get_new_keys(self, peer, number=1, size_bits=256, additional_slave_sae_ids=()):
        n = int(open(KME_STATE).read()) if os.path.exists(KME_STATE) else 0
        if ReplayingKme.replays is None:
            # Three times: an exchange that fetched a key may still be
            # abandoned (simultaneous INITs), and the reuse must not hide.
            used, delivered = _last_used(), _kid(n - 1) if n else None
            ReplayingKme.replays = [used] * 3 if used else []
            if delivered and delivered != used:
                ReplayingKme.replays.append(delivered)
        out = []
        for _ in range(number):
            if ReplayingKme.replays:
                kid = ReplayingKme.replays.pop(0)
            else:
                kid, n = _kid(n), n + 1
                with open(KME_STATE, "w") as f:
                    f.write(str(n))
            out.append(self._key(kid, size_bits))
        return out
    async def get_keys_by_id(self, master, key_ids):
        return [self._key(k, 256) for k in key_ids]
    def _key(self, kid, bits):
        return QkdKey(kid, SecretBytes(hmac.new(SEED, kid.encode(), "sha256").digest()[:bits // 8]))
    async def status(self, peer):
        return KeySourceStatus("K", "K", "SAE-A", "SAE-B", 256, 1000, 1000, 16, 1024, 64)
    async def close(self):
        pass

from qkdgate.adapters import registry
registry.create_key_source = lambda kind, settings: ReplayingKme()

# The shipped `qkdgate run` has no fake kernel: hand run() the recording fakes.
import argparse
from qkdgate.gateway.cli import run as R
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend
parser = argparse.ArgumentParser()
R.add_arguments(parser)
sys.exit(R.run(parser.parse_args(sys.argv[2:]), ipsec_backend=RecordingIpsecBackend(),
               macsec_backend=RecordingMacsecBackend()))
'''


# Seconds from a restart to two more rekeys. 30 s was exceeded in two full host
# runs at load 8 (2026-12-06; never in four runs alone): four histories of two
# Python daemons each share 2 cores, and until the collision rule of
# docs/protocol.md 7 a restarted master could stall for exchange_timeout (10 s
# here) before its next INIT went through. What the test checks is which keys
# are used, not how fast.
RESTART_BUDGET = 60


class Pair:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        _, _, self.path_a, self.path_b = write_pair(tmp, interval="1s", soft="4s", hard="8s")
        self.log = tmp / "use.log"
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, path: str, crash: str = "", journal: bool = True):
        env = dict(os.environ, QG_NAME=name, QG_USE_LOG=str(self.log),
                   QG_KME=str(self.tmp / f"kme-{name}"), QG_CRASH=crash)
        if not journal:
            env["QG_NO_JOURNAL"] = "1"
        with open(self.tmp / f"{name}.out", "ab") as out:   # the child keeps its own copy
            self.procs[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-c", WRAPPER, "run", "-c", path,
                stdout=out, stderr=asyncio.subprocess.STDOUT, env=env)

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(x) for x in self.log.read_text().splitlines() if x]

    async def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.records()):
                return True
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()


def uses(recs, gw):
    return [r for r in recs if r["gw"] == gw and r["kind"] == "use"]


def violations(recs) -> list[str]:
    out = []
    for gw in ("gw-a", "gw-b"):
        seen: set[str] = set()
        last_gen = 0
        for r in recs:
            if r["gw"] != gw:
                continue
            if r["kind"] == "use":
                for k in r["ids"]:
                    if k in seen:
                        out.append(f"{gw} used QKD key {k} twice")
                    seen.add(k)
            elif r["kind"] == "install":
                if r["gen"] <= last_gen:
                    out.append(f"{gw} installed generation {r['gen']} after {last_gen}")
                last_gen = r["gen"]
    return out


async def run_once(tmp: Path, crash: str, journal: bool = True) -> tuple[list, str]:
    p = Pair(tmp)
    try:
        await p.start("gw-b", p.path_b, journal=journal)
        await p.start("gw-a", p.path_a, crash=crash, journal=journal)
        killed = await p.wait(lambda r: any(x["kind"] == "killed" for x in r), 25)
        point = next((x["point"] for x in p.records() if x["kind"] == "killed"), "")
        assert killed, f"crash point {crash} never reached:\n" + \
            (tmp / "gw-a.out").read_text()[-1500:]
        await asyncio.wait_for(p.procs["gw-a"].wait(), 5)
        assert p.procs["gw-a"].returncode == -signal.SIGKILL
        before = len(uses(p.records(), "gw-a"))
        await p.start("gw-a", p.path_a, journal=journal)            # restart, no crash
        # RESTART_BUDGET: a restart on a loaded host, plus two rekeys
        ok = await p.wait(lambda r: len(uses(r, "gw-a")) >= before + 2
                          and len(uses(r, "gw-b")) >= before + 1, RESTART_BUDGET)
        assert ok, f"no rekeys after the restart (killed at {point}):\n" + \
            (tmp / "gw-a.out").read_text()[-2000:]
    finally:
        await p.stop()
    return p.records(), point


async def run_both_killed(tmp: Path, crash_b: str = "") -> list:
    """Both gateways SIGKILLed at once (power cut of a site pair), restarted.
    With ``crash_b`` gw-b dies at that crash point and gw-a at once after it
    (e.g. "install#2": as gw-b installs its 2nd generation's first SA, which
    neither end has committed; it must not be installed again,
    journal.record_started)."""
    p = Pair(tmp)
    try:
        await p.start("gw-b", p.path_b, crash=crash_b)
        await p.start("gw-a", p.path_a)
        if crash_b:
            assert await p.wait(lambda r: any(x["kind"] == "killed" for x in r), 25), \
                (tmp / "gw-b.out").read_text()[-1500:]
        else:
            assert await p.wait(lambda r: len(uses(r, "gw-a")) >= 3, 25)
        for proc in p.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
        before = len(uses(p.records(), "gw-a"))
        await p.start("gw-b", p.path_b)
        await p.start("gw-a", p.path_a)
        assert await p.wait(lambda r: len(uses(r, "gw-a")) >= before + 2, RESTART_BUDGET), \
            "no rekeys after both restarted"
    finally:
        await p.stop()
    return p.records()


# The master's second rekey, killed: inside the fsynced append that reserves
# its QKD key (before the write, between its halves, written but not synced,
# synced), right after the key went into the combiner, and inside the append
# that records the generation. Then restarted; run_once() has checked that
# both ends went on keying. Plus two histories where both ends die at once: anywhere, and as
# gw-b installs its 2nd generation (neither end has committed it).
CRASH_POINTS = ([f"reserve:append-{s}#2" for s in ("before", "torn", "written", "synced")]
                + ["combined#2"]
                + [f"record:append-{s}#2" for s in ("torn", "synced")])


async def test_sigkill_the_real_daemon_during_a_rekey(tmp_path):
    # Four histories at a time: each mostly waits for rekey timers (about 9 s).
    gate = asyncio.Semaphore(4)

    async def one(i: int, crash: str) -> tuple[str, str, list[str]]:
        async with gate:
            recs, point = await run_once(tmp_path / f"p{i}", crash)
        return crash, point, violations(recs)

    async def both() -> tuple[str, str, list[str]]:
        async with gate:
            return "both", "both", violations(await run_both_killed(tmp_path / "both"))

    # Every history runs to its end (return_exceptions): a failure must not
    # leave the others' tasks to be cancelled mid-spawn with daemons running.
    async def mid_install() -> tuple[str, str, list[str]]:
        async with gate:
            return "install", "install", violations(
                await run_both_killed(tmp_path / "mid-install", crash_b="install#2"))

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(CRASH_POINTS)), both(),
                                   mid_install(), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    for crash, point, bad in results:
        assert point == crash.split("#")[0], (crash, point)
        assert not bad, f"killed at {crash}: {bad}"


async def test_control_without_the_journal_reuses_a_qkd_key(tmp_path):
    # Kill the master right after it mixed its 3rd QKD key; its KME hands the
    # same key out again on restart. Without the journal it is used again.
    recs, point = await run_once(tmp_path, "combined#3", journal=False)
    assert point == "combined"
    assert any("used QKD key" in v for v in violations(recs))
