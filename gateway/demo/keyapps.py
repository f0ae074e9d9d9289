"""``qkdgate demo --key-service``: two pretend applications fetch keys from
the gateways' key services through both north-bound APIs.

Theory of operation: :func:`prepare` makes what the key service needs, per
run, in the run's state directory: a PKI (the KME simulator's, adapters/
kmesim/pki.py) with one server certificate per gateway's key service and one
client certificate per application (its CN is its SAE ID), and one SKIP PSK
per gateway (32 random bytes, mode 0600). :func:`yaml_section` is the
``key_service:`` section each gateway's configuration gets: one pool between
APP-A (at gw-a) and APP-B (at gw-b), the demo's policy, times scaled to the
rekey interval, and a SKIP listener behind stunnel4.

:class:`KeyApps` is the two applications: one asyncio loop thread in gw-a's
namespace (APP-A) and one in gw-b's (APP-B), and a conductor thread that,
every ``period``, runs one round per API:

* ETSI GS QKD 014: APP-A ``enc_keys`` at gw-a for slave APP-B (5.3), APP-B
  ``dec_keys`` at gw-b with master APP-A and the key_ID (5.4), over HTTPS
  with mutual TLS;
* SKIP (draft-cisco-skip-02 2, Figure 2): APP-A new-key at gw-a for remote
  system APP-B, APP-B key-by-ID at gw-b, over TLS 1.2 with the draft's
  DHE-PSK suite (3 Table 1), each request one ``openssl s_client -psk``.

The key_ID travels from A to B inside this process (a real application
sends it in-band). Both sides' keys are compared here and dropped; only
counts, statuses, messages and key_ID prefixes are kept. Each round is
counted under the run's phase (:meth:`Recorder.phase_label`) read when
gw-a's answer arrived (the moment a key was served or refused; gw-b's fetch
may come seconds later on a loaded host): a key is served only after the
daemon confirmed a generation, which it does after the tunnel's events for
that generation (gateway/daemon/peer.py), so a served key is never counted
in a phase that had already ended. A phase is the run's wall-clock label,
though (any tunnel of either gateway blocked); each served key is also
recorded with the generation it came from (``qkdgate_generation``) and
the interval in which gw-a decided (``asked`` .. ``t``), and
:func:`judge_served` judges it by that generation's own validity. A refusal (503 / SKIP error) is a
result, not an error; an error is a round that got no answer.

The PSK is passed to ``openssl s_client`` on its command line (it has no
option to read one from a file for TLS 1.2): visible in this host's process
list for the run's lifetime, acceptable for a throw-away demo key only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdgate.gateway.demo.net import LoopThread

log = logging.getLogger("qkdgate.demo")

APP_A, APP_B = "APP-A", "APP-B"     # the applications' SAE IDs (and SKIP system IDs)
POOL = "demo-app"
ETSI014_PORT = 8443                 # in each gateway's namespace, on its loopback
SKIP_PORT = 9443
# draft-cisco-skip-02 3 Table 1: TLS 1.2 PSK, TLS_DHE_PSK_WITH_AES_256_CBC_SHA384
SKIP_CLIENT_TLS = ("-tls1_2", "-cipher", "DHE-PSK-AES256-CBC-SHA384")
APIS = ("etsi014", "skip")
MAX_ATTEMPTS = 4000                 # kept for the report; the counts cover every round


@dataclass(frozen=True)
class Psk:
    identity: str
    key_hex: str
    file: Path


@dataclass(frozen=True)
class KeyServiceFiles:
    ca: Path
    server: dict[str, tuple[Path, Path]]      # gateway -> (cert, key)
    client: dict[str, tuple[Path, Path]]      # application SAE -> (cert, key)
    psk: dict[str, Psk]                       # gateway -> its SKIP listener's PSK


def prepare(folder: Path, rng: Callable[[int], bytes] = os.urandom) -> KeyServiceFiles:
    """The per-run PKI and PSKs (nothing outside ``folder``)."""
    from qkdgate.adapters.kmesim.pki import ensure_pki
    pki = ensure_pki(folder / "keyservice-pki", ["KS-gw-a", "KS-gw-b"], [APP_A, APP_B])
    psk = {}
    for gw, ident in (("gw-a", "encryptor-a"), ("gw-b", "encryptor-b")):
        key = rng(32).hex()
        path = folder / f"{gw}-skip.psk"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{ident}:{key}\n")
        psk[gw] = Psk(ident, key, path)
    return KeyServiceFiles(
        ca=pki.ca,
        server={gw: (pki.kme(f"KS-{gw}").cert, pki.kme(f"KS-{gw}").key)
                for gw in ("gw-a", "gw-b")},
        client={sae: (pki.sae(sae).cert, pki.sae(sae).key) for sae in (APP_A, APP_B)},
        psk=psk)


@dataclass(frozen=True)
class Times:
    """The key service's times for a demo rekeying every ``interval``: a
    generation serves for 2 intervals after its confirmation (so a rekey
    up to one interval late costs nothing), which ends a whole interval
    before the tunnel's hard lifetime (3 intervals, demo/config.py Timers):
    when rekeys stop, keys stop before either gateway's tunnel blocks, even
    if the two gateways confirmed the generation seconds apart. A key is
    fetchable 2.5 intervals after its generation stopped serving (W +
    skew), time for a slow SKIP client under QEMU."""

    lifetime: float
    serve_margin: float
    dec_window: float
    clock_skew: float

    @classmethod
    def for_interval(cls, interval: float) -> Times:
        return cls(4.5 * interval, 2.5 * interval, 2 * interval, 0.5 * interval)


def _ms(x: float) -> str:
    return f"{round(x * 1000)}ms"


def yaml_section(side: str, files: KeyServiceFiles, *, policy: str, interval: float) -> str:
    gw, peer = ("gw-a", "gw-b") if side == "a" else ("gw-b", "gw-a")
    local, remote = (APP_A, APP_B) if side == "a" else (APP_B, APP_A)
    cert, key = files.server[gw]
    t = Times.for_interval(interval)
    return f"""key_service:
  address: 127.0.0.1
  port: {ETSI014_PORT}
  tls: {{cert: {cert}, key: {key}, ca: {files.ca}}}
  serve_margin: {_ms(t.serve_margin)}
  dec_window: {_ms(t.dec_window)}
  clock_skew: {_ms(t.clock_skew)}
  pools:
    - name: {POOL}
      peer: {peer}
      local_sae: {local}
      remote_sae: {remote}
      lifetime: {_ms(t.lifetime)}
      policy: {policy}
  skip:
    - local_system: {local}
      port: {SKIP_PORT}
      psk_file: {files.psk[gw].file}
"""


@dataclass
class Answer:
    """One request's outcome: a key (kept only to compare) or why not."""

    status: int | None              # None: no HTTP answer (connection, TLS)
    key_id: str | None = None
    key: bytes | None = None
    qkd: bool = False               # the key's generation had a QKD key
    single_source: bool = False
    message: str = ""
    generation: int | None = None   # the generation it came from (qkdgate_generation)


def _generation(ext: Any) -> int | None:
    """The generation a key came from: the ``qkdgate_generation`` of its
    answer's vendor extension (ETSI GS QKD 014 6.3; SKIP's ``qkdgate_extension``)."""
    g = ext.get("qkdgate_generation") if isinstance(ext, dict) else None
    return g if isinstance(g, int) and not isinstance(g, bool) else None


def _tally() -> dict[str, int]:
    return {"served": 0, "refused": 0, "fetch_refused": 0, "mismatch": 0, "errors": 0,
            "without_qkd": 0, "single_source": 0}


class KeyApps:
    """APP-A and APP-B, one round per API every ``period`` seconds."""

    def __init__(self, files: KeyServiceFiles, ns_a: str, ns_b: str,
                 phase: Callable[[], str], elapsed: Callable[[], float], *,
                 period: float = 1.0) -> None:
        self.files, self.phase, self.elapsed, self.period = files, phase, elapsed, period
        self.ns = {APP_A: ns_a, APP_B: ns_b}
        self.loops: dict[str, LoopThread] = {}
        self._sessions: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.by_phase: dict[str, dict[str, dict[str, int]]] = {api: {} for api in APIS}
        self.statuses: dict[str, Counter[str]] = {api: Counter() for api in APIS}
        self.last: dict[str, str] = dict.fromkeys(APIS, "")
        self.attempts: list[dict[str, Any]] = []
        self.rounds = 0

    # ------------------------------------------------------------ running
    def start_loops(self) -> KeyApps:
        """The applications' loops, each in its gateway's namespace."""
        for sae, ns in self.ns.items():
            self.loops[sae] = LoopThread(ns, f"app-{sae[-1].lower()}").start()
        return self

    def start(self) -> KeyApps:
        """The loops and the conductor: one :meth:`round` per API every ``period``."""
        self.start_loops()
        self._thread = threading.Thread(target=self._main, name="key-apps", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Idempotent: the run's end and the cleanup both call it."""
        if self._stop.is_set() and not self.loops:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        for sae, lt in self.loops.items():
            s = self._sessions.pop(sae, None)
            if s is not None:
                try:
                    lt.call(s.close(), timeout=10)
                except Exception as exc:  # noqa: BLE001  stopping: note it, stop the rest
                    log.warning("key apps: closing %s's session: %s", sae, exc)
            lt.stop()
        self.loops = {}

    def _main(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            for api in APIS:
                if self._stop.is_set():
                    break
                self.round(api)
            with self._lock:
                self.rounds += 1
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t0)))

    def round(self, api: str) -> str:
        """One key from APP-A's gateway and the same from APP-B's; the outcome."""
        enc, dec = (self._enc_014, self._dec_014) if api == "etsi014" else \
            (self._new_key_skip, self._key_by_id_skip)
        phase, at = self.phase(), self.elapsed()
        asked = at                   # gw-a decided between asked and at
        b = None
        fetched = None
        try:
            a = self.loops[APP_A].call(enc(), timeout=60)
            phase, at = self.phase(), self.elapsed()      # when gw-a served or refused
            if a.status == 200 and a.key_id is not None:
                b = self.loops[APP_B].call(dec(a.key_id), timeout=60)
                fetched = self.elapsed()
        except Exception as exc:  # noqa: BLE001  a round that got no answer is counted, not fatal
            a, b = Answer(None, message=f"{type(exc).__name__}: {exc}"[:200]), None
        return self._count(api, phase, at, a, b, asked=asked, fetched=fetched)

    def _count(self, api: str, phase: str, at: float, a: Answer, b: Answer | None, *,
               asked: float | None = None, fetched: float | None = None) -> str:
        with self._lock:
            row = self.by_phase[api].setdefault(phase, _tally())
            if a.status is None:
                outcome = "error"
                row["errors"] += 1
                self.last[api] = f"no answer: {a.message}"
            elif a.status != 200:
                outcome = "refused"
                row["refused"] += 1
                self.statuses[api][str(a.status)] += 1
                self.last[api] = f"{a.status} {a.message}"[:160]
            elif b is None or b.status != 200:
                outcome = "fetch_refused"
                row["fetch_refused"] += 1
                self.statuses[api][f"fetch {b.status if b else None}"] += 1
                self.last[api] = f"fetch at gw-b: {b.status if b else None} " \
                                 f"{b.message if b else ''}"[:160]
            elif b.key != a.key or b.key_id != a.key_id:
                outcome = "mismatch"
                row["mismatch"] += 1
                self.last[api] = "MISMATCH: the two sides got different keys"
            else:
                outcome = "served"
                row["served"] += 1
                row["without_qkd"] += 0 if a.qkd else 1
                row["single_source"] += 1 if a.single_source else 0
                self.statuses[api]["200"] += 1
            if len(self.attempts) < MAX_ATTEMPTS:
                self.attempts.append({
                    "t": at, "asked": at if asked is None else asked, "fetched": fetched,
                    "generation": a.generation, "api": api, "phase": phase, "outcome": outcome,
                    "status": a.status, "key_ID": (a.key_id or "")[:8] or None,
                    "fetch_status": b.status if b else None,
                    "reason": (b.message if outcome == "fetch_refused" and b else
                               a.message if outcome in ("refused", "error") else None)})
            return outcome

    # ------------------------------------------------------ ETSI GS QKD 014
    def _session(self, sae: str) -> Any:
        import aiohttp

        from qkdgate.adapters.tls import client_context
        if sae not in self._sessions:
            cert, key = self.files.client[sae]
            ctx = client_context(cert, key, self.files.ca)
            self._sessions[sae] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=20))
        return self._sessions[sae]

    async def _post(self, sae: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        url = f"https://127.0.0.1:{ETSI014_PORT}/api/v1/keys/{path}"
        async with self._session(sae).post(url, json=body) as r:
            return r.status, await r.json(content_type=None)

    @staticmethod
    def _refusal(status: int, doc: Any) -> Answer:
        doc = doc if isinstance(doc, dict) else {}
        det = doc.get("details")
        reason = next((d.get("qkdgate_reason") for d in (det if isinstance(det, list) else [det])
                       if isinstance(d, dict) and d.get("qkdgate_reason")), None)
        return Answer(status, message=(str(doc.get("message", "")) +
                                       (f" ({reason})" if reason else ""))[:200])

    def _from_014(self, status: int, doc: Any) -> Answer:
        if status != 200:
            return self._refusal(status, doc)
        k = doc["keys"][0]
        ext = doc.get("key_container_extension") or {}
        return Answer(200, k["key_ID"], base64.b64decode(k["key"]),
                      bool(ext.get("qkdgate_qkd_key_IDs")), bool(ext.get("qkdgate_single_source")),
                      generation=_generation(ext))

    async def _enc_014(self) -> Answer:
        # ETSI GS QKD 014 5.3: the master asks its KME for keys for the slave
        return self._from_014(*await self._post(APP_A, f"{APP_B}/enc_keys", {"number": 1}))

    async def _dec_014(self, key_id: str) -> Answer:
        # ETSI GS QKD 014 5.4: the slave fetches them by key_ID, naming the master
        return self._from_014(*await self._post(APP_B, f"{APP_A}/dec_keys",
                                                {"key_IDs": [{"key_ID": key_id}]}))

    # ---------------------------------------------------------------- SKIP
    async def _skip(self, gw: str, path: str) -> Answer:
        psk = self.files.psk[gw]
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{SKIP_PORT}", *SKIP_CLIENT_TLS,
            "-psk_identity", psk.identity, "-psk", psk.key_hex, "-quiet",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(
            proc.communicate(f"GET {path} HTTP/1.0\r\nHost: kp\r\n\r\n".encode()), 30)
        head, _, body = out.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1."):
            return Answer(None, message="no TLS-PSK session with the Key Provider")
        status = int(head.split()[1])
        doc = json.loads(body) if body else {}
        if status != 200:
            return self._refusal(status, doc)
        ext = doc.get("qkdgate_extension") or {}
        # draft-cisco-skip-02 4.2 Table 6: keyId and key, hexadecimal
        return Answer(200, str(doc["keyId"]).lower(), bytes.fromhex(doc["key"]),
                      bool(ext.get("qkdgate_qkd_key_IDs")), bool(ext.get("qkdgate_single_source")),
                      generation=_generation(ext))

    async def _new_key_skip(self) -> Answer:
        return await self._skip("gw-a", f"/key?remoteSystemID={APP_B}")

    async def _key_by_id_skip(self, key_id: str) -> Answer:
        return await self._skip("gw-b", f"/key/{key_id}?remoteSystemID={APP_A}")

    # ------------------------------------------------------------- reports
    def view(self) -> dict[str, dict[str, Any]]:
        """Totals per API for the live view."""
        with self._lock:
            out = {}
            for api in APIS:
                tot = _tally()
                for row in self.by_phase[api].values():
                    for k, v in row.items():
                        tot[k] += v
                out[api] = {**tot, "last": self.last[api]}
            return out

    def summary(self) -> dict[str, Any]:
        with self._lock:
            apis = {}
            for api in APIS:
                tot = _tally()
                for row in self.by_phase[api].values():
                    for k, v in row.items():
                        tot[k] += v
                apis[api] = {**tot, "by_phase": {p: dict(r) for p, r in
                                                 self.by_phase[api].items()},
                             "statuses": dict(self.statuses[api]),
                             "last_refusal": self.last[api]}
            return {"pool": POOL, "applications": [APP_A, APP_B], "period": self.period,
                    "rounds": self.rounds, "apis": apis, "attempts": list(self.attempts)}


def judge_served(ks: dict[str, Any], *, qkd_required: bool = True,
                 master: str = "gw-a", slave: str = "gw-b") -> list[str]:
    """Every served key, judged by its own generation (what the daemons
    did, :meth:`~qkdgate.gateway.demo.view.Recorder.generation_windows`
    under ``ks["generations"]``), not by the run's wall-clock phase: gw-a
    decided to serve it at a moment between ``asked`` and ``t``, and that
    interval must meet its generation's validity on every tunnel of gw-a
    that carried it -- switched to it (confirmed both ways) and not past
    ``valid_until`` (hard lifetime or a block) -- and, with
    ``qkd_required`` (hybrid-required), the generation had a QKD key. gw-b
    must have installed the generation before APP-B's fetch was answered.
    Returns one line per violation (empty: every key was served honestly)."""
    windows = ks.get("generations") or []
    bad: list[str] = []
    for x in ks.get("attempts") or []:
        if x.get("outcome") != "served":
            continue
        g, asked, at = x.get("generation"), x.get("asked", x.get("t")), x.get("t")
        what = f"{x.get('api')} key {x.get('key_ID')} served in [{asked}, {at}] s"
        if g is None:
            bad.append(f"{what}: the answer named no generation")
            continue
        mine = [w for w in windows if w["gateway"] == master and w["generation"] == g]
        if not mine:
            bad.append(f"{what}: {master} never installed generation {g}")
        for w in mine:
            where = f"{master}/{w['tunnel']} generation {g}"
            if w.get("switched") is None or w.get("valid_until") is None:
                bad.append(f"{what}: {where} never carried traffic")
            elif at < w["switched"] or asked > w["valid_until"]:
                bad.append(f"{what}: {where} was valid in [{w['switched']}, "
                           f"{w['valid_until']}] s only")
            if qkd_required and not w.get("qkd"):
                bad.append(f"{what}: {where} had no QKD key")
        fetched = x.get("fetched")
        theirs = [w for w in windows if w["gateway"] == slave and w["generation"] == g]
        if not theirs or (fetched is not None
                          and min(w["installed"] for w in theirs) > fetched):
            bad.append(f"{what}: {slave} had not installed generation {g} when APP-B "
                       f"fetched it at {fetched} s")
    return bad
