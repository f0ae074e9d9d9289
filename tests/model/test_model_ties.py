"""The ProVerif model (tests/model/) cannot drift from the code silently.

The model's constants carry ``@code``, ``@label`` and ``@context``
annotations naming the value in the code; its message letfuns name their
parameters as ``messages.SCHEMAS`` names the fields. These tests check each
annotation against the code, that every message type and QKD mode of the
code appears in the model, and that every message's fields are the model's
parameters in the code's order. They run without ProVerif (host stage);
tools/test-model.sh runs the model itself.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from qkdgate.gateway.protocol import identity
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.dos import CookieJar

HERE = Path(__file__).resolve().parent
SOURCES = {p.relative_to(HERE).as_posix(): p.read_text()
           for p in sorted(HERE.glob("*/*.pvl"))}
ALL = "\n".join(SOURCES.values())
CODE = re.compile(r"@code\s+([\w.]+)(\[[^\]]+\])?\s*=\s*(\"[^\"]*\"|\d+)")
LABEL = re.compile(r"@label\s+(\w+)\s*=\s*(\"[^\"]*\")")
CONTEXT = re.compile(r"@context\s+(\w+)\s*=\s*(\"[^\"]*\")")
LETFUN = re.compile(r"letfun\s+(\w+)\s*\((.*?)\)\s*=", re.S)
HEADER = ["sender_epoch", "receiver_epoch", "exchange_id"]


def _resolve(dotted: str, subscript: str | None) -> Any:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        if subscript:
            obj = obj[ast.literal_eval(subscript[1:-1])]
        return obj
    raise LookupError(dotted)


def _literal(text: str) -> Any:
    # "qkdgate/1 mac1\0": the model's comments write NUL as \0
    return ast.literal_eval(text) if text.startswith('"') else int(text)


CODE_ANNOTATIONS = [(d + (s or ""), d, s, v) for d, s, v in CODE.findall(ALL)]


def test_model_files_exist() -> None:
    assert {"crypto/kem.pvl", "crypto/dh.pvl", "crypto/sig.pvl", "crypto/qkd.pvl",
            "protocol/messages.pvl", "protocol/initiator.pvl",
            "protocol/responder.pvl"} <= set(SOURCES)
    assert len(CODE_ANNOTATIONS) >= 20


@pytest.mark.parametrize("name,dotted,subscript,value", CODE_ANNOTATIONS,
                         ids=[a[0] for a in CODE_ANNOTATIONS])
def test_code_constant(name: str, dotted: str, subscript: str | None, value: str) -> None:
    assert _resolve(dotted, subscript) == _literal(value)


def test_every_message_type_and_qkd_mode_is_modelled() -> None:
    annotated = {n for n, _, _, _ in CODE_ANNOTATIONS}
    for enum in (m.MsgType, m.QkdMode):
        for member in enum:
            assert f"{enum.__module__}.{enum.__name__}.{member.name}" in annotated, member


def _letfuns() -> dict[str, list[str]]:
    out = {}
    for name, params in LETFUN.findall(SOURCES["protocol/messages.pvl"]):
        out[name] = [p.split(":")[0].strip() for p in params.split(",") if p.strip()]
    return out


@pytest.mark.parametrize("mtype", list(m.MsgType), ids=lambda t: t.name)
def test_message_fields_match_schema(mtype: m.MsgType) -> None:
    funs = _letfuns()
    low = mtype.name.lower()
    if f"{low}_prefix" in funs:
        prefix, core = funs[f"{low}_prefix"], funs[f"{low}_core"]
        assert prefix[:3] == HEADER and core[0] == "prefix"
        fields = prefix[3:] + core[1:]
    else:
        core = funs[f"{low}_core"]
        assert core[:3] == HEADER
        fields = core[3:]
    assert fields == [name for name, _ in m.SCHEMAS[mtype]]


def _labels() -> dict[str, bytes]:
    return {k: _literal(v).encode() for k, v in LABEL.findall(ALL)}


def test_labels_are_the_codes() -> None:
    lab = _labels()
    assert set(lab) == {"mac1", "psk", "transcript", "done", "abort", "cookie"}
    # docs/protocol.md 5.1
    assert m.mac1_key("gw-b", b"k" * 16) == hashlib.sha256(
        lab["mac1"] + b"\x04gw-b" + b"k" * 16).digest()
    # 5.2
    init, prefix = b"I" * 40, b"R" * 50
    key = hashlib.sha256(lab["psk"] + b"p" * 16).digest()
    want = hmac.new(key, lab["transcript"] + b"\x01a\x01b" + len(init).to_bytes(4, "big")
                    + init + len(prefix).to_bytes(4, "big") + prefix, hashlib.sha256).digest()
    assert m.transcript_hash(b"p" * 16, "a", "b", init, prefix) == want
    handshake = _resolve("qkdgate.gateway.protocol.handshake", None)
    th = bytes(range(32))
    assert handshake.done_hash(th) == hashlib.sha256(lab["done"] + th).digest()  # 4.6
    assert handshake.abort_digest(init, prefix) == hashlib.sha256(                # 4.7
        lab["abort"] + hashlib.sha256(init).digest() + prefix).digest()
    jar = CookieJar(lambda n: b"s" * n, 0.0)                                     # 4.8
    assert jar.make(init, 0.0) == hmac.new(b"s" * 32, lab["cookie"] + hashlib.sha256(
        init).digest(), hashlib.sha256).digest()[:16]


def test_signature_contexts_are_the_codes() -> None:
    contexts = dict(CONTEXT.findall(ALL))
    assert set(contexts) == {"INIT", "RESP", "CONFIRM", "ABORT"}
    for c, text in contexts.items():
        assert identity._ctx(c.encode()) == _literal(text).encode()
