"""A stdlib-only reference of the ETSI GS QKD 004 binary framing, written
from QUBIP/etsi-qkd-004 (client/client.py@28507a37, server/server.py@acc76c58;
the line numbers below are theirs), independently of qkdgate's codec.

It reads and writes exactly what the reference does -- nothing more (no
limits, no hostile-input checks: qkdgate's codec adds those). Messages are
plain dicts shaped like tests/vectors/etsi004-frames.json "decoded".
"""

import struct
import uuid

VERSION = "1.0.1"                                   # client.py:12
OPEN_REQ, OPEN_RES, KEY_REQ, KEY_RES, CLOSE_REQ, CLOSE_RES = 2, 3, 4, 5, 8, 9   # client.py:32-37
NAMES = {OPEN_REQ: "OPEN_CONNECT_REQUEST", OPEN_RES: "OPEN_CONNECT_RESPONSE",
         KEY_REQ: "GET_KEY_REQUEST", KEY_RES: "GET_KEY_RESPONSE",
         CLOSE_REQ: "CLOSE_REQUEST", CLOSE_RES: "CLOSE_RESPONSE"}
QOS = ["Key_chunk_size", "Max_bps", "Min_bps", "Jitter", "Priority", "Timeout", "TTL"]  # client.py:217-223
MIME = 256                                          # client.py:42


def _frame(service_type, payload):
    # client.py:205-211 construct_request / server.py:351-357 construct_response
    version = struct.pack("!BBB", *[int(x) for x in VERSION.split(".")])
    return version + struct.pack("!b", service_type) + struct.pack("!I", len(payload)) + payload


def _qos(q):
    # client.py:213-226 construct_qos
    ints = struct.pack("!7I", *[q[n] for n in QOS])
    return ints + q["Metadata_mimetype"].encode().ljust(MIME, b"\x00")


def _parse_qos(raw):
    # client.py parse_qos: '!7I' then the MIME type with its NULs stripped
    vals = struct.unpack("!7I", raw[:28])
    return dict(zip(QOS, vals, strict=True), Metadata_mimetype=raw[28:].decode().strip("\x00"))


def _ksid(s):
    return (uuid.UUID(s) if s else uuid.UUID(int=0)).bytes     # client.py:63, 125


def encode(m):
    t = m["type"]
    if t == "OPEN_CONNECT_REQUEST":                 # client.py:118-125
        p = m["source"].encode() + b"\x00" + m["destination"].encode() + b"\x00"
        return _frame(OPEN_REQ, p + _qos(m["qos"]) + _ksid(m["key_stream_id"]))
    if t == "OPEN_CONNECT_RESPONSE":                # server.py:255-257, 216-218
        p = struct.pack("!I", m["status"])
        if m.get("qos") is not None:
            p += _qos(m["qos"]) + _ksid(m["key_stream_id"])
        return _frame(OPEN_RES, p)
    if t == "GET_KEY_REQUEST":                      # client.py:155-157
        return _frame(KEY_REQ, _ksid(m["key_stream_id"]) + struct.pack("!I", m["index"])
                      + struct.pack("!I", m["metadata_size"]))
    if t == "GET_KEY_RESPONSE":
        p = struct.pack("!I", m["status"])
        if m["status"] == 0:                        # server.py:315-321
            key, meta = bytes.fromhex(m["key"]), m["metadata"].encode()
            p += (struct.pack("!I", m["index"]) + struct.pack("!I", len(key)) + key
                  + struct.pack("!I", len(meta)) + meta)
        elif m["status"] == 8:                      # server.py:307-310
            p += struct.pack("!I", m["metadata_size"])
        return _frame(KEY_RES, p)
    if t == "CLOSE_REQUEST":                        # client.py:183
        return _frame(CLOSE_REQ, _ksid(m["key_stream_id"]))
    if t == "CLOSE_RESPONSE":                       # server.py:348
        return _frame(CLOSE_RES, struct.pack("!I", m["status"]))
    raise ValueError(t)


def decode(frame):
    major, minor, patch, stype = struct.unpack("!BBBb", frame[:4])   # client.py:99
    (length,) = struct.unpack("!I", frame[4:8])                      # client.py:100
    p = frame[8:8 + length]
    assert f"{major}.{minor}.{patch}" == VERSION and len(p) == length
    t = NAMES[stype]
    if stype == OPEN_REQ:                           # server.py:359-375
        s_end = p.find(b"\x00")
        d_end = p.find(b"\x00", s_end + 1)
        q_end = d_end + 1 + 28 + MIME
        ks = uuid.UUID(bytes=p[q_end:q_end + 16])
        return {"type": t, "source": p[:s_end].decode(), "destination": p[s_end + 1:d_end].decode(),
                "qos": _parse_qos(p[d_end + 1:q_end]),
                "key_stream_id": None if ks.int == 0 else str(ks)}
    if stype in (KEY_REQ,):                         # server.py:266-268
        index, msize = struct.unpack("!II", p[16:24])
        return {"type": t, "key_stream_id": str(uuid.UUID(bytes=p[:16])), "index": index,
                "metadata_size": msize}
    if stype == CLOSE_REQ:                          # server.py:336-337
        return {"type": t, "key_stream_id": str(uuid.UUID(bytes=p[:16]))}
    (status,) = struct.unpack("!I", p[:4])
    if stype == OPEN_RES:                           # client.py:228-258
        if len(p) == 4:
            return {"type": t, "status": status, "qos": None, "key_stream_id": None}
        return {"type": t, "status": status, "qos": _parse_qos(p[4:4 + 28 + MIME]),
                "key_stream_id": str(uuid.UUID(bytes=p[4 + 28 + MIME:4 + 28 + MIME + 16]))}
    if stype == KEY_RES:                            # client.py:262-290
        if status == 0:
            index, chunk = struct.unpack("!II", p[4:12])
            key = p[12:12 + chunk]
            (msize,) = struct.unpack("!I", p[12 + chunk:16 + chunk])
            return {"type": t, "status": 0, "index": index, "key": key.hex(),
                    "metadata": p[16 + chunk:16 + chunk + msize].decode()}
        if status == 8:
            return {"type": t, "status": 8, "metadata_size": struct.unpack("!I", p[4:8])[0]}
        return {"type": t, "status": status}
    return {"type": t, "status": status}
