"""MQTT telemetry against a real Mosquitto broker on loopback.

Each broker test starts ``mosquitto`` (Debian package) with a temporary
config on 127.0.0.1 and a free port, subscribes with aiomqtt and asserts
what arrives. The events are those of a real rekey: FakeQkdLink keys,
ML-KEM-768 and X25519 through the keymix combiner into an ESP SA installed
in the recording backend.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from qkdgate.gateway.telemetry.mqtt import MqttOptions, Telemetry
from qkdgate.interfaces import SaId, SaSpec
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.fakes import FakeQkdLink, RecordingIpsecBackend

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                reason="mosquitto not installed (tools/apt-packages.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, tmp: Path, port: int | None = None, extra: str = "") -> None:
        self.tmp, self.port, self.extra = tmp, port or free_port(), extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        conf = self.tmp / f"mosquitto-{self.port}.conf"
        # As root, mosquitto would switch to its own user, which cannot read
        # pytest's private temp dirs (the password file).
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"listener {self.port} 127.0.0.1\npersistence false\n{user}"
                        f"log_dest stderr\n{self.extra or 'allow_anonymous true'}\n")
        with open(self.tmp / "mosquitto.log", "ab") as log:   # the child keeps its own copy
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                assert self.proc.poll() is None, (self.tmp / "mosquitto.log").read_text()
                time.sleep(0.02)
        raise AssertionError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()


async def until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def opts(port: int, **kw) -> MqttOptions:
    base = dict(port=port, backoff_initial=0.05, backoff_max=0.2, timeout=3.0)
    base.update(kw)
    return MqttOptions(**base)


class Subscriber:
    """Collects every message under qkdgate/# in the background."""

    def __init__(self, port: int, topic: str = "qkdgate/#", **auth) -> None:
        self.port, self.topic, self.auth = port, topic, auth
        self.messages: list[aiomqtt.Message] = []

    async def __aenter__(self):
        self.client = aiomqtt.Client("127.0.0.1", self.port, identifier=f"sub-{os.getpid()}-"
                                     f"{id(self)}", **self.auth)
        await self.client.__aenter__()
        await self.client.subscribe(self.topic, qos=1)
        self.task = asyncio.create_task(self._collect())
        return self

    async def _collect(self):
        async for msg in self.client.messages:
            self.messages.append(msg)

    async def __aexit__(self, *exc):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)

    def payloads(self, suffix: str) -> list[dict]:
        return [json.loads(m.payload) for m in self.messages if str(m.topic).endswith(suffix)]

    async def wait_for(self, suffix: str, count: int = 1, timeout: float = 5.0,
                       where=lambda p: True) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [p for p in self.payloads(suffix) if where(p)]
            if len(got) >= count:
                return got
            await asyncio.sleep(0.02)
        raise AssertionError(f"only {self.payloads(suffix)} on *{suffix} after {timeout} s; "
                             f"topics seen: {[str(m.topic) for m in self.messages]}")


# --------------------------------------------------------------------------
# a real rekey, and the events the daemon's hook would emit for it
# --------------------------------------------------------------------------

async def real_rekey() -> tuple[list[dict], list[bytes]]:
    import ipaddress

    from qkdgate.keymix.classical import x25519_keypair, x25519_shared
    from qkdgate.keymix.combiner import HybridInputs, combine
    from qkdgate.keymix.kem import get_kem
    from qkdgate.keymix.schedule import esp_key

    link = FakeQkdLink("SAE-A", "SAE-B")
    t0 = time.monotonic()
    qa = (await link.source("SAE-A").get_new_keys("SAE-B", 1))[0]
    qb = (await link.source("SAE-B").get_keys_by_id("SAE-A", [qa.key_id]))[0]
    kem = get_kem("ML-KEM-768")
    priv, pub = kem.generate_keypair()
    ct, ss_enc = kem.encapsulate(pub)
    ss_dec = kem.decapsulate(priv, ct)
    xa, xa_pub = x25519_keypair()
    xb, xb_pub = x25519_keypair()
    xs = x25519_shared(xa, xb_pub)
    th = bytes(range(48))
    sa = combine(HybridInputs("ML-KEM-768", ss_enc, xs, qa.key, (qa.key_id,), th))
    sb = combine(HybridInputs("ML-KEM-768", ss_dec, x25519_shared(xb, xa_pub), qb.key,
                              (qb.key_id,), th))
    assert sa.secret == sb.secret
    backend = RecordingIpsecBackend()
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    spi = backend.allocate_spi(b, a)
    key = esp_key(sa, "dc1-dc2", "r2i", spi, 7)
    backend.install_inbound(SaId(b, a, spi), SaSpec(key=key, reqid=100))
    latency = (time.monotonic() - t0) * 1000
    secrets = [qa.key.reveal(), ss_enc.reveal(), xs.reveal(), sa.secret.reveal(), key.reveal()]
    events = [
        {"event": "key_source_up", "source": "kme-a", "peer": "gw-b"},
        {"event": "rekey_done", "tunnel": "dc1-dc2", "peer": "gw-b", "generation": 7,
         "inputs": {"kem": "ML-KEM-768", "x25519": True, "qkd_key_ids": [qa.key_id]},
         "latency_ms": latency, "spi_in": spi},
        {"event": "qkd_alarm", "source": "kme-a", "qber": 0.13, "threshold": 0.11},
        {"event": "policy_fallback", "tunnel": "dc1-dc2", "policy": "pqc-fallback",
         "reason": "QKD alarm: QBER 0.13 above 0.11"},
        {"event": "rekey_failed", "tunnel": "dc1-dc2", "generation": 8,
         "reason": "KeyUnavailable: QKD link down"},
        # A careless caller: every secret of the rekey, under names and in
        # places a sanitizer must catch.
        {"event": "rekey_done", "tunnel": "dc1-dc2", "generation": 9,
         "key": key, "psk": "correct horse", "session": sa.secret, "raw": qa.key.reveal(),
         "detail": {"esp_key_hex": key.reveal().hex(), "note": key.reveal().hex(),
                    "b64": base64.b64encode(sa.secret.reveal()).decode(),
                    "list": [xs, ss_enc.reveal()], "obj": sa},
         "inputs": {"kem": "ML-KEM-768", "qkd_key_ids": [qa.key_id]}},
    ]
    return events, secrets


def leaks(blob: bytes, secrets: list[bytes]) -> list[str]:
    found = []
    text = blob.decode("utf-8", "replace")
    for s in secrets:
        forms = {"raw": s, "hex": s.hex().encode(), "HEX": s.hex().upper().encode(),
                 "b64": base64.b64encode(s), "b64url": base64.urlsafe_b64encode(s)}
        for name, form in forms.items():
            # any 12-byte window of the encoded secret
            for i in range(0, max(1, len(form) - 16), 4):
                if form[i:i + 16] in blob:
                    found.append(f"{name} of a {len(s)}-byte secret")
                    break
        if "correct horse" in text:
            found.append("psk text")
    return found


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

async def test_events_of_a_real_rekey_arrive_without_secrets(broker):
    events, secrets = await real_rekey()
    tel = Telemetry(opts(broker.port), "gw-a")
    async with Subscriber(broker.port) as sub:
        task = asyncio.create_task(tel.run())
        await sub.wait_for("/state", where=lambda p: p["state"] == "online")
        for e in events:
            assert tel.publish(e)
        await sub.wait_for("/events/rekey_done", 2)
        await sub.wait_for("/events/rekey_failed")
        await tel.close()
        await sub.wait_for("/state", where=lambda p: p["state"] == "offline")
        await task

    done = sub.payloads("/events/rekey_done")[0]
    assert done["v"] == 1 and done["event"] == "rekey_done" and done["gateway"] == "gw-a"
    assert done["tunnel"] == "dc1-dc2" and done["generation"] == 7
    assert done["inputs"] == events[1]["inputs"]
    assert done["latency_ms"] > 0
    alarm = sub.payloads("/events/qkd_alarm")[0]
    assert alarm["qber"] == 0.13
    assert sub.payloads("/events/policy_fallback")[0]["policy"] == "pqc-fallback"
    assert sub.payloads("/events/rekey_failed")[0]["reason"].startswith("KeyUnavailable")
    assert sub.payloads("/events/key_source_up")[0]["source"] == "kme-a"
    topics = [str(m.topic) for m in sub.messages]
    assert "qkdgate/gw-a/events/rekey_done" in topics
    # sequence numbers increase in publication order
    seqs = [json.loads(m.payload)["seq"] for m in sub.messages if "/events/" in str(m.topic)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # the careless event arrived, stripped to what is public
    careless = sub.payloads("/events/rekey_done")[1]
    assert careless["generation"] == 9 and careless["inputs"]["qkd_key_ids"]
    assert set(careless) == {"v", "event", "gateway", "ts", "seq", "tunnel", "generation",
                             "detail", "inputs"}
    assert careless["detail"] == {"list": []}
    assert tel.stats.redacted == 10   # 4 by name, 3 blobs, 3 objects/bytes
    # no secret of the rekey, in any encoding, in any payload
    for m in sub.messages:
        assert not leaks(bytes(m.payload), secrets), (str(m.topic), m.payload)


async def test_retained_online_and_last_will_offline_when_killed(broker, tmp_path):
    # A gateway process SIGKILLed mid-session: the broker publishes its will.
    script = (
        "import asyncio, sys\n"
        "from qkdgate.gateway.telemetry.mqtt import MqttOptions, Telemetry\n"
        "async def main():\n"
        f"    t = Telemetry(MqttOptions(port={broker.port}, keepalive=5), 'gw-k')\n"
        "    asyncio.create_task(t.run())\n"
        "    while not t.stats.connected: await asyncio.sleep(0.01)\n"
        "    await asyncio.sleep(0.2)\n"
        "    print('up', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"up"
        # a subscriber arriving later gets the retained state
        async with Subscriber(broker.port, "qkdgate/gw-k/state") as sub:
            online = await sub.wait_for("/state")
            assert online[0]["state"] == "online" and sub.messages[0].retain
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            off = await sub.wait_for("/state", where=lambda p: p["state"] == "offline")
            assert off[0]["reason"] == "connection lost" and off[0]["v"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    async with Subscriber(broker.port, "qkdgate/gw-k/state") as late:
        retained = await late.wait_for("/state")
        assert retained[0]["state"] == "offline" and late.messages[0].retain


async def test_broker_down_never_blocks_and_counts_drops():
    port = free_port()  # nothing listens here
    tel = Telemetry(opts(port, queue_size=500), "gw-a")
    task = asyncio.create_task(tel.run())
    await asyncio.sleep(0.05)
    # never waits for a broker: publish is a plain call that only queues (it
    # cannot await a connection), so 10,000 of them run without the loop
    # turning once: the run task sees none of them before they all returned
    assert not inspect.iscoroutinefunction(tel.publish)
    failures_before = tel.stats.failures
    results = [tel.publish({"event": "rekey_done", "tunnel": "t", "generation": i})
               for i in range(10_000)]
    assert tel.stats.failures == failures_before
    assert tel.stats.dropped == 10_000 - 500
    assert tel.pending() == 500
    assert results.count(False) == 9_500
    assert await until(lambda: tel.stats.failures >= 2)
    assert not task.done()                                # retrying with backoff
    await tel.close()
    await asyncio.wait_for(task, 10)     # close ends the retry loop (no timing claim)


async def test_queued_events_survive_a_broker_outage(tmp_path):
    port = free_port()
    tel = Telemetry(opts(port), "gw-a")
    task = asyncio.create_task(tel.run())
    for g in range(1, 6):   # rekeys while the broker is down
        tel.publish({"event": "rekey_done", "tunnel": "t", "generation": g})
    await asyncio.sleep(0.2)
    b = Broker(tmp_path, port).start()
    try:
        async with Subscriber(port) as sub:
            got = await sub.wait_for("/events/rekey_done", 5, timeout=8)
            assert [p["generation"] for p in got] == [1, 2, 3, 4, 5]
            b.stop()                       # outage mid-session
            assert await until(lambda: not tel.stats.connected)
        tel.publish({"event": "rekey_done", "tunnel": "t", "generation": 6})
        b.start()                          # same port: the client reconnects
        async with Subscriber(port) as sub:
            got = await sub.wait_for("/events/rekey_done", 1, timeout=8)
            assert got[0]["generation"] == 6
        assert tel.stats.connects >= 2
    finally:
        await tel.close()
        await asyncio.wait_for(task, 3)
        b.stop()


async def test_socket_bypasses_tunnel_policies_before_connect(broker):
    backend = RecordingIpsecBackend()
    seen = []

    def bypass(sock: socket.socket) -> None:
        with pytest.raises(OSError):
            sock.getpeername()             # not connected yet: the SYN is exempt too
        seen.append(sock.fileno())
        backend.bypass_socket(sock)

    tel = Telemetry(opts(broker.port), "gw-a", bypass=bypass)
    task = asyncio.create_task(tel.run())
    async with Subscriber(broker.port) as sub:
        tel.publish({"event": "key_source_down", "source": "kme-a"})
        await sub.wait_for("/events/key_source_down")
    assert seen and backend.ops[0][0] == "bypass_socket"
    await tel.close()
    await task


async def test_failing_bypass_refuses_to_connect_and_retries(broker):
    def bypass(sock):
        raise OSError(1, "xfrm policy refused")

    tel = Telemetry(opts(broker.port), "gw-a", bypass=bypass)
    task = asyncio.create_task(tel.run())
    assert await until(lambda: tel.stats.failures >= 2)
    assert tel.stats.connects == 0
    await tel.close()
    await asyncio.wait_for(task, 2)


async def test_periodic_retained_status(broker):
    calls = []

    def status():
        calls.append(1)
        return {"tunnels": {"dc1-dc2": {"generation": len(calls), "state": "up"}}}

    tel = Telemetry(opts(broker.port, interval=0.1), "gw-a", status=status)
    task = asyncio.create_task(tel.run())
    async with Subscriber(broker.port, "qkdgate/gw-a/status") as sub:
        got = await sub.wait_for("/status", 3)
    assert got[-1]["kind"] == "status" and got[-1]["tunnels"]["dc1-dc2"]["state"] == "up"
    assert got[-1]["telemetry"]["connected"] is True
    await tel.close()
    await task
    async with Subscriber(broker.port, "qkdgate/gw-a/status") as late:
        assert (await late.wait_for("/status"))[0]["kind"] == "status"  # retained


async def test_password_authentication(tmp_path):
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "gw-a", "s3cret-pw"],
                   check=True, capture_output=True)
    pwfile.chmod(0o600)
    b = Broker(tmp_path, extra=f"allow_anonymous false\npassword_file {pwfile}").start()
    try:
        good = Telemetry(opts(b.port, username="gw-a", password=SecretBytes(b"s3cret-pw")), "gw-a")
        bad = Telemetry(opts(b.port, username="gw-a", password=SecretBytes(b"wrong")), "gw-b")
        tasks = [asyncio.create_task(t.run()) for t in (good, bad)]
        async with Subscriber(b.port, username="gw-a", password="s3cret-pw") as sub:
            good.publish({"event": "key_source_up", "source": "kme-a"})
            await sub.wait_for("/events/key_source_up")
        assert await until(lambda: bad.stats.failures >= 1)
        assert bad.stats.connects == 0
        assert "s3cret" not in repr(good.options)
        for t in (good, bad):
            await t.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 3)
    finally:
        b.stop()
