"""Fuzzing control socket requests: whatever bytes a (permitted) local client
sends, the server answers one JSON line, ``{"ok": true, ...}`` or an error
of a named type; it never raises and never reports ``internal`` (which means
a handler bug). The request goes through ``ControlServer._answer``, the
code behind every connection, fed from an in-memory StreamReader; the rekey
handler is the daemon's own request check bound to a stand-in daemon.
"""

from __future__ import annotations

import asyncio
import json
import types
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qkdgate.errors import ConfigError
from qkdgate.gateway.daemon.control import MAX_REQUEST, ControlServer
from qkdgate.gateway.daemon.daemon import Daemon

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
KINDS = {"bad_request", "ConfigError"}


class _StandIn:
    """What Daemon._ctl_rekey needs: the daemon's rekey() refusal."""

    def rekey(self, tunnel: str) -> dict[str, Any]:
        if tunnel != "t1":
            raise ConfigError(f"no tunnel named {tunnel!r} (configured: t1)")
        return {"tunnel": "t1", "peer": "gw-b", "generation": 3}


async def _status(req: Any) -> dict[str, Any]:
    return {"gateway": "gw-a", "tunnels": []}


SERVER = ControlServer("/nonexistent/control.sock", {
    "status": _status,
    "rekey": types.MethodType(Daemon._ctl_rekey, _StandIn()),
})


_LOOP = asyncio.new_event_loop()   # one loop for every example: asyncio.run() per example is slow


def answer(data: bytes) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        reader = asyncio.StreamReader(limit=MAX_REQUEST)
        reader.feed_data(data)
        reader.feed_eof()
        return await SERVER._answer(reader)
    got = _LOOP.run_until_complete(run())
    line = json.dumps(got, separators=(",", ":"))
    assert "\n" not in line
    assert json.loads(line) == got
    if got["ok"]:
        assert set(got) == {"ok", "result"}
    else:
        assert got["error"]["type"] in KINDS, got
        assert isinstance(got["error"]["message"], str)
    return got


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
    st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=15)
requests = st.fixed_dictionaries(
    {}, optional={"cmd": st.sampled_from(["status", "rekey", "reload", "Status", ""]) | values,
                  "tunnel": st.sampled_from(["t1", "t2", ""]) | values})


@SETTINGS
@given(st.binary(max_size=400))
@example(b"[" * 60000 + b"\n")                   # nesting deeper than the JSON decoder recurses
@example(b'{"cmd": "rekey", "tunnel": ' + b"[" * 50000 + b"\n")
@example(b"x" * (MAX_REQUEST + 10) + b"\n")       # over the line limit
@example(b"")                                     # EOF before any request
def test_raw_bytes_get_an_answer(data):
    answer(data)


@SETTINGS
@given(requests, st.sampled_from([b"\n", b"", b"\r\n", b" \n{}\n"]))
def test_json_requests_get_an_answer(req, tail):
    got = answer(json.dumps(req).encode() + tail)
    if got["ok"]:
        assert req.get("cmd") in ("status", "rekey")
        assert req["cmd"] == "status" or req.get("tunnel") == "t1"
