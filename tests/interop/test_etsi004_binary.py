"""The binary ETSI 004 binding over real mutual TLS on loopback: the
simulator's binary server and qkdgate's binary client.

Bad input: whatever a client sends, the server answers frames it can parse
and closes only that connection for the rest (an announced length above the
maximum is refused before any payload is read); the server keeps serving.
Whatever the KME answers, the client raises a key-source error (FrameError
for broken frames), drops the stream, and the next call works again.
A client written like the reference client (client.py: raw socket, struct,
the reference's own default QoS) gets its OPEN_CONNECT answered too."""

import asyncio
import ssl
import struct
import uuid

import pytest

from qkdgate.adapters import etsi004_frame as frame
from qkdgate.adapters.etsi004 import QoS
from qkdgate.adapters.etsi004_binary import Etsi004BinaryClient
from qkdgate.adapters.etsi004_source import Etsi004KeySource, make_key_id, parse_key_id, stream_tag
from qkdgate.adapters.settings import source_settings
from qkdgate.errors import (
    KeySourceAuthError,
    KeySourceError,
    KeySourceProtocolError,
    KeyUnavailable,
)


async def _no_sleep(_delay: float) -> None:
    return None


def _source(sim, sae, **options):
    return Etsi004KeySource(sim.credentials(sae).settings(binding="etsi-binary",
                                                          retries=options.pop("retries", 1),
                                                          **options), sleep=_no_sleep)


def _ctx(sim, sae):
    cred = sim.credentials(sae)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cred.ca))
    ctx.load_cert_chain(str(cred.cert), str(cred.key))
    ctx.check_hostname = False
    return ctx


async def _raw_conn(sim, sae="SAE-A", kme="KME-A"):
    return await asyncio.open_connection(sim.host, sim.ports004[kme], ssl=_ctx(sim, sae))


async def _closed(reader) -> bool:
    """The server closed the connection (EOF, or TLS reset) within 5 s."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except (ConnectionError, ssl.SSLError):
        return True


async def _still_serves(sim):
    a, b = _source(sim, "SAE-A"), _source(sim, "SAE-B")
    try:
        await b.connect("SAE-A")
        keys = await a.get_new_keys("SAE-B")
        assert (await b.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key
    finally:
        await a.close()
        await b.close()


KS = uuid.uuid4().bytes
BAD_REQUESTS = [
    ("too_long", frame.HEADER.pack(frame.VERSION, 0x04, 2**31)),   # no payload follows
    ("version", frame.HEADER.pack(b"\x01\x00\x02", 0x08, 16) + KS),
    ("service_type", frame.HEADER.pack(frame.VERSION, 0x06, 16) + KS),
    ("service_type", frame.HEADER.pack(frame.VERSION, 0x09, 4) + b"\0\0\0\0"),
    ("uri", frame.HEADER.pack(frame.VERSION, 0x02, 11) + b"qkd://SAE-A"),
    ("length", frame.HEADER.pack(frame.VERSION, 0x04, 20) + KS + b"\0\0\0\0"),
    ("mime", frame.HEADER.pack(frame.VERSION, 0x02, 4 + 284 + 16) + b"a\0b\0"
     + struct.pack("!7I", *[1] * 7) + b"x" * 256 + KS),
]


@pytest.mark.parametrize("reason,data", BAD_REQUESTS, ids=[f"{r}-{i}" for i, (r, _) in
                                                            enumerate(BAD_REQUESTS)])
async def test_server_closes_a_connection_that_sends_a_bad_frame(sim, reason, data):
    reader, writer = await _raw_conn(sim)
    try:
        writer.write(data)
        await writer.drain()
        assert await _closed(reader)
    finally:
        writer.close()
    assert sim.qkd004_binary["KME-A"].refused[-1] == reason
    await _still_serves(sim)


async def test_server_refuses_a_huge_length_without_waiting_for_the_payload(sim):
    reader, writer = await _raw_conn(sim)
    try:
        writer.write(frame.HEADER.pack(frame.VERSION, 0x02, frame.DEFAULT_MAX_MESSAGE + 1))
        await writer.drain()
        # closed at once, with the announced 64 KiB never sent
        assert await asyncio.wait_for(_closed(reader), 2)
    finally:
        writer.close()
    assert sim.qkd004_binary["KME-A"].refused == ["too_long"]


async def test_server_notices_a_truncated_frame(sim):
    reader, writer = await _raw_conn(sim)
    writer.write(frame.HEADER.pack(frame.VERSION, 0x08, 16) + KS[:6])
    await writer.drain()
    writer.write_eof() if writer.can_write_eof() else None
    writer.close()
    for _ in range(100):
        if sim.qkd004_binary["KME-A"].refused:
            break
        await asyncio.sleep(0.02)      # the server's read ends on its own schedule
    assert sim.qkd004_binary["KME-A"].refused == ["truncated"]
    await _still_serves(sim)


async def test_an_sae_of_another_kme_is_refused(sim):
    reader, writer = await _raw_conn(sim, sae="SAE-B", kme="KME-A")
    try:
        writer.write(frame.encode(frame.CloseRequest(KS)))
        await writer.drain()
        assert await _closed(reader)
    finally:
        writer.close()


async def test_a_client_written_like_the_reference_gets_its_answer(sim):
    # QUBIP/etsi-qkd-004 client.py: construct_request (205-211), open_connect
    # payload (118-125), construct_qos with its defaults (23-29, 213-226),
    # parse_open_connect_response (228-258), by struct alone.
    reader, writer = await _raw_conn(sim)
    try:
        qos = struct.pack("!7I", 32, 40000, 0, 10, 0, 5000, 3600) \
            + b"application/json".ljust(256, b"\x00")
        payload = b"client://SAE-A\x00" + b"server://SAE-B\x00" + qos + uuid.UUID(int=0).bytes
        req = struct.pack("!BBB", 1, 0, 1) + struct.pack("!b", 0x02) \
            + struct.pack("!I", len(payload)) + payload
        writer.write(req)
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(8), 5)
        assert header[:4] == b"\x01\x00\x01\x03"
        body = await reader.readexactly(struct.unpack("!I", header[4:8])[0])
        status = struct.unpack("!I", body[:4])[0]
        assert status == 1          # opened; the peer SAE has not joined yet (docs/qkd.md)
        ksid = uuid.UUID(bytes=body[4 + 284:4 + 284 + 16])
        assert str(ksid) in sim.qkd004.streams       # the KME chose the key_stream_ID
        assert struct.unpack("!7I", body[4:32])[0] == 32
    finally:
        writer.close()


# ------------------------------------------------------------ the client side

BAD_ANSWERS = [
    ("too_long", frame.HEADER.pack(frame.VERSION, 0x05, 2**31)),
    ("version", frame.HEADER.pack(b"\x02\x00\x01", 0x05, 4) + b"\0\0\0\x02"),
    ("service_type", frame.HEADER.pack(frame.VERSION, 0x03, 4) + b"\0\0\0\x02"),  # wrong reply
    ("service_type", frame.HEADER.pack(frame.VERSION, 0x07, 4) + b"\0\0\0\x02"),
    ("truncated", frame.HEADER.pack(frame.VERSION, 0x05, 40) + b"\0\0\0\0"),
    ("metadata", frame.HEADER.pack(frame.VERSION, 0x05, 8) + struct.pack("!II", 8, 2**24)),
    ("metadata", frame.HEADER.pack(frame.VERSION, 0x05, 48)
     + struct.pack("!III", 0, 0, 32) + b"k" * 32 + struct.pack("!I", 2**20)),
    ("length", frame.HEADER.pack(frame.VERSION, 0x05, 6) + b"\0\0\0\x02\0\0"),
]


@pytest.mark.parametrize("reason,data", BAD_ANSWERS, ids=[f"{r}-{i}" for i, (r, _) in
                                                          enumerate(BAD_ANSWERS)])
async def test_client_refuses_a_bad_answer_and_recovers(sim, reason, data):
    a, b = _source(sim, "SAE-A"), _source(sim, "SAE-B")
    try:
        await b.connect("SAE-A")
        await a.connect("SAE-B")
        sim.faults["KME-A"].raw004 = data
        with pytest.raises(frame.FrameError) as ei:
            await a.get_new_keys("SAE-B")
        assert ei.value.reason == reason and isinstance(ei.value, KeySourceProtocolError)
        sim.faults["KME-A"].raw004 = None
        keys = await a.get_new_keys("SAE-B")            # a fresh stream, the same index
        assert parse_key_id(keys[0].key_id)[2] == 0
        assert (await b.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key
    finally:
        sim.faults["KME-A"].raw004 = None
        await a.close()
        await b.close()


STATUS_ANSWERS = [(2, KeyUnavailable, "insufficient key"), (3, KeyUnavailable, "has not opened"),
                  (4, KeyUnavailable, "no QKD connection"), (6, KeySourceError, "status 6"),
                  (9, KeySourceProtocolError, "unknown status 9"),
                  (7, KeySourceProtocolError, "not allowed")]


@pytest.mark.parametrize("status,error,match", STATUS_ANSWERS,
                         ids=[str(s[0]) for s in STATUS_ANSWERS])
async def test_get_key_status_mapping_on_the_binary_binding(sim, status, error, match):
    a, b = _source(sim, "SAE-A"), _source(sim, "SAE-B")
    try:
        await b.connect("SAE-A")
        await a.connect("SAE-B")
        sim.faults["KME-A"].raw004 = frame.encode(frame.GetKeyResponse(status))
        with pytest.raises(error, match=match):
            await a.get_new_keys("SAE-B")
    finally:
        sim.faults["KME-A"].raw004 = None
        await a.close()
        await b.close()


async def test_status_7_that_opened_the_stream_is_closed_and_reopened(sim):
    # The reference opens the stream with status 7 (tests.py:39-47); ours does
    # not. Either way the key source reopens with the counter-proposal.
    a, b = _source(sim, "SAE-A"), _source(sim, "SAE-B")
    try:
        await b.connect("SAE-A")
        ksid = a.stream_id("SAE-B")
        counter = QoS(key_chunk_size=32, min_bps=5000, timeout=5000)
        # the KME opens the stream, then its answer is replaced by a status 7
        sim.faults["KME-A"].raw004 = frame.encode(
            frame.OpenConnectResponse(7, counter, uuid.UUID(ksid).bytes))
        sim.faults["KME-A"].raw004_left, sim.faults["KME-A"].raw004_close = 1, False
        await a.connect("SAE-B")        # 7 -> reopen: 5 -> CLOSE -> OPEN with the counter
        assert sim.faults["KME-A"].raw004 is None
        assert (await a.status("SAE-B")).extensions["etsi004_open"] is True
        assert sim.qkd004.streams[ksid].connected == {"SAE-A", "SAE-B"}
        keys = await a.get_new_keys("SAE-B")
        assert (await b.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key
    finally:
        sim.faults["KME-A"].raw004 = None
        await a.close()
        await b.close()


async def test_index_far_ahead_is_status_2_on_the_binary_binding(sim):
    a, b = _source(sim, "SAE-A"), _source(sim, "SAE-B")
    try:
        await b.connect("SAE-A")
        await a.connect("SAE-B")
        tag = stream_tag(a.stream_id("SAE-B"))
        with pytest.raises(KeyUnavailable, match="insufficient key"):
            await b.get_keys_by_id("SAE-A", [make_key_id(tag, 1, 100000)])
    finally:
        await a.close()
        await b.close()


async def test_wrong_ca_is_an_auth_error(sim, tmp_path):
    s = source_settings(sim.credentials("SAE-A").settings(binding="etsi-binary"), "etsi004")
    other = ssl.create_default_context()          # the system store: not the demo CA
    c = Etsi004BinaryClient(s, ssl_context=other)
    try:
        with pytest.raises(KeySourceAuthError):
            await c.request_close(str(uuid.uuid4()))
    finally:
        await c.close()


async def test_kme_down_is_unavailable(sim):
    s = source_settings(sim.credentials("SAE-A").settings(binding="etsi-binary"), "etsi004")
    port = sim.ports004["KME-A"]
    await sim.qkd004_binary["KME-A"].stop()
    c = Etsi004BinaryClient(s)
    try:
        with pytest.raises(KeyUnavailable, match="cannot connect"):
            await c.request_close(str(uuid.uuid4()))
    finally:
        await c.close()
    assert port


async def test_kme_id_is_checked_on_the_binary_binding(sim):
    settings = sim.credentials("SAE-A").settings(binding="etsi-binary")
    settings["kme_id"] = "KME-B"                   # KME-A's certificate does not name it
    c = Etsi004BinaryClient(source_settings(settings, "etsi004"))
    try:
        with pytest.raises(KeySourceAuthError, match="does not name KME ID 'KME-B'"):
            await c.request_close(str(uuid.uuid4()))
    finally:
        await c.close()


async def test_a_stream_opened_over_json_that_binary_cannot_carry_ends_one_connection(sim):
    from qkdgate.adapters.etsi004 import Etsi004Client
    j = Etsi004Client(sim.credentials("SAE-B").settings(retries=0))
    a = _source(sim, "SAE-A")
    try:
        await j.open_connect("qkd://SAE-A", "qkd://SAE-B", QoS(metadata_mimetype="é" * 128),
                             key_stream_id=a.stream_id("SAE-B"))   # 256 bytes of UTF-8
        with pytest.raises(KeyUnavailable, match="closed the connection"):
            await a.connect("SAE-B")
        # the KME joined SAE-A before the answer failed to encode: drop that stream
        sim.qkd004.streams.clear()
    finally:
        await j.close()
        await a.close()
    await _still_serves(sim)
