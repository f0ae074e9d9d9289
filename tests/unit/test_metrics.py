"""Prometheus metrics scraped over loopback HTTP, and structured logs."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import os
import urllib.request

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qkdgate.gateway.telemetry.events import (
    KeySourceDown,
    KeySourceUp,
    ProtocolViolationReport,
    QkdAlarm,
    RekeyDone,
    RekeyFailedReport,
    UnknownEvent,
)
from qkdgate.gateway.telemetry.metrics import MAX_REASONS, Metrics, configure_logging, with_context
from qkdgate.interfaces import MacsecSaState, SaId, SaState
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.events import (
    KeyInputs,
    PolicyFallback,
    PolicyRecovered,
    SaHardLifetimeBlock,
    TunnelOpFailed,
)

KID = "6f1c2a4e-1c3b-4f5a-9d2e-0a1b2c3d4e5f"


@pytest.fixture
def qkdgate_logger():
    """configure_logging() changes the process-wide "qkdgate" logger: put it
    back so later tests' caplog still sees records."""
    lg = logging.getLogger("qkdgate")
    saved = (lg.handlers[:], lg.level, lg.propagate)
    yield lg
    lg.handlers[:], lg.level, lg.propagate = saved[0], saved[1], saved[2]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def rekey(gen: int, ms: float, ids=(KID,)) -> RekeyDone:
    return RekeyDone("gw-b", "dc1-dc2", gen, KeyInputs("ML-KEM-768", True, tuple(ids)), ms,
                     "timer")


def failed(tunnel: str, reason: str) -> RekeyFailedReport:
    return RekeyFailedReport(tunnel, "gw-b", 3, reason, None, "qkd-local")


async def test_scrape_over_loopback_after_a_rekey_history():
    m = Metrics()
    server = await m.serve("127.0.0.1", 0)
    try:
        m.handle_event(KeySourceUp("kme-a", "gw-b", "ok"))
        m.handle_event(rekey(1, 40.0))
        m.handle_event(rekey(2, 700.0, ids=(KID, KID.replace("6f", "7f"))))
        m.handle_event(QkdAlarm("gw-b", "kme-a", 0.13, 0.11, ("qber",)))
        m.handle_event(PolicyFallback("dc1-dc2", "pqc-fallback", 3, "QKD alarm"))
        m.handle_event(failed("dc1-dc2", "KeyUnavailable: QKD link down"))
        m.handle_event(KeySourceDown("kme-a", "gw-b", "KeyUnavailable: down"))
        m.handle_event(SaHardLifetimeBlock("dc1-dc2", "out", 0xC0000101, 2))
        m.handle_event(ProtocolViolationReport("gw-b", "bad tag", 1))
        m.handle_event(TunnelOpFailed("dc1-dc2", "add_sa", "EEXIST"))
        m.handle_event(PolicyRecovered("dc1-dc3", "pqc-fallback", 4))
        m.observe_key_source_call("kme-a", "get_new_keys", 0.012)
        m.observe_key_source_call("kme-a", "get_new_keys", 5.0, TimeoutError())
        a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
        sa = SaId(a, b, 0xC0000101)
        for n in (1000, 2500):   # cumulative kernel counters, read twice
            m.observe_sa("dc1-dc2", "out", SaState(sa, 100, "rfc4106(gcm(aes))", 288, 128,
                                                   bytes=n, packets=n // 100))
        # rekey: a new SA starts from zero; the tunnel's counter keeps growing
        m.observe_sa("dc1-dc2", "out", SaState(SaId(a, b, 0xC0000102), 101, "rfc4106(gcm(aes))",
                                               288, 128, bytes=300, packets=3))
        m.observe_sa("dc1-dc3", "in", MacsecSaState(an=1, active=True, next_pn=9, packets=8,
                                                    octets=800))
        text = await asyncio.get_running_loop().run_in_executor(None, scrape, server.port)
    finally:
        await server.close()

    v = lambda name, **kw: value(text, name, **kw)  # noqa: E731
    assert v("qkdgate_rekeys_total", tunnel="dc1-dc2") == 2
    assert v("qkdgate_tunnel_generation", tunnel="dc1-dc2") == 2
    assert v("qkdgate_qkd_keys_consumed_total", tunnel="dc1-dc2") == 3
    assert v("qkdgate_rekey_inputs_total", tunnel="dc1-dc2", kem="ML-KEM-768", x25519="yes",
             qkd="yes") == 2
    assert v("qkdgate_rekey_duration_seconds_count", tunnel="dc1-dc2") == 2
    assert v("qkdgate_rekey_duration_seconds_bucket", tunnel="dc1-dc2", le="0.05") == 1
    assert v("qkdgate_rekey_duration_seconds_bucket", tunnel="dc1-dc2", le="1.0") == 2
    assert v("qkdgate_rekey_failures_total", tunnel="dc1-dc2", reason="KeyUnavailable") == 1
    assert v("qkdgate_key_source_up", source="kme-a") == 0
    assert v("qkdgate_qkd_qber", source="kme-a") == 0.13
    assert v("qkdgate_alarms_total", kind="qkd_alarm") == 1
    assert v("qkdgate_alarms_total", kind="sa_hard_lifetime_block") == 1
    assert v("qkdgate_policy_fallback_active", tunnel="dc1-dc2") == 1
    assert v("qkdgate_policy_fallback_active", tunnel="dc1-dc3") == 0
    assert v("qkdgate_protocol_violations_total", peer="gw-b") == 1
    assert v("qkdgate_tunnel_errors_total", tunnel="dc1-dc2") == 1
    assert v("qkdgate_key_source_request_duration_seconds_count", source="kme-a",
             op="get_new_keys") == 2
    assert v("qkdgate_key_source_errors_total", source="kme-a", op="get_new_keys",
             reason="TimeoutError") == 1
    assert v("qkdgate_sa_bytes_total", tunnel="dc1-dc2", direction="out") == 2800
    assert v("qkdgate_sa_packets_total", tunnel="dc1-dc2", direction="out") == 28
    assert v("qkdgate_sa_bytes_total", tunnel="dc1-dc3", direction="in") == 800
    assert v("qkdgate_build_info", version=__import__("qkdgate").__version__) == 1
    assert KID not in text           # key_IDs are never labels
    # a dedicated registry: nothing leaked into prometheus_client's global one
    assert b"qkdgate_rekeys_total" not in prometheus_client.generate_latest()


def test_failure_reasons_cannot_grow_without_bound():
    m = Metrics()
    for i in range(200):
        m.handle_event(failed("t", f"Peer{i}: garbage"))
    m.handle_event(failed("t", "<script>: x"))
    text = m.exposition().decode()
    reasons = {dict(k[1]).get("reason") for k in samples(text)
               if k[0] == "qkdgate_rekey_failures_total"}
    assert len(reasons) == MAX_REASONS + 1 and "other" in reasons
    assert value(text, "qkdgate_rekey_failures_total", tunnel="t", reason="other") == 169


def test_every_event_class_is_handled_and_an_unknown_one_raises():
    # The metrics know every event the hook carries (a renamed or new event
    # class is a test failure, not a silently missing metric).
    import dataclasses

    from qkdgate.gateway.telemetry import events as de
    from qkdgate.tunnels import events as te

    m = Metrics()
    for mod in (de, te):
        for cls in vars(mod).values():
            if isinstance(cls, type) and issubclass(cls, (de.DaemonEvent, te.TunnelEvent)) \
                    and cls not in (de.DaemonEvent, te.TunnelEvent):
                args = {f.name: _dummy(f.type) for f in dataclasses.fields(cls)}
                m.handle_event(cls(**args))
    with pytest.raises(UnknownEvent):
        m.handle_event({"event": "rekey_done", "tunnel": "t"})    # a dict is not an event


def _dummy(annotation):
    text = str(annotation)
    if "KeyInputs" in text:
        return KeyInputs()
    if text.startswith("tuple"):
        return ()
    if text.startswith("int"):
        return 1
    if text.startswith("float"):
        return 0.5
    if text.startswith("bool"):
        return False
    return "x"


@pytest.mark.expect_logged_exception   # a traceback holding a key, on purpose
def test_logs_carry_context_and_never_a_key(monkeypatch, qkdgate_logger):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    key = SecretBytes(bytes(range(32)))
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    log = with_context(logging.getLogger("qkdgate.daemon"), tunnel="dc1-dc2", peer="gw-b")
    log.info("installed SA with key %s", key)
    log.info("raw %s hex %s", key.reveal(), key.reveal().hex())
    log.warning("b64 %s", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
    try:
        raise ValueError(key.reveal().hex())
    except ValueError:
        log.exception("boom")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == 4
    assert all(x["tunnel"] == "dc1-dc2" and x["peer"] == "gw-b" for x in lines)
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "qkdgate.daemon"
    out = buf.getvalue()
    assert key.reveal().hex() not in out and "AAECAwQFBgcI" not in out
    assert "<32 bytes>" in lines[1]["msg"] and "[redacted]" in lines[1]["msg"]
    assert "fp=" in lines[0]["msg"]          # SecretBytes shows only a fingerprint


def test_text_logs_under_journald_carry_priorities(tmp_path, monkeypatch, qkdgate_logger):
    path = tmp_path / "journal-stream"
    with open(path, "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("info", "text", stream=stream)
        log = logging.getLogger("qkdgate.tunnel")
        log.warning("rekey overdue", extra={"tunnel": "dc1-dc2"})
        log.debug("not shown at info")
    assert path.read_text() == "<4>rekey overdue [tunnel=dc1-dc2]\n"
