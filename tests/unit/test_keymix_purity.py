"""keymix stays a pure core, and peer-byte parsers fail only with RemoteProtocolError."""

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from qkdgate.errors import RemoteProtocolError
from qkdgate.keymix.classical import x25519_keypair, x25519_shared
from qkdgate.keymix.kem import get_kem


def test_keymix_imports_no_io_frameworks():
    code = ("import sys, qkdgate.keymix.kem, qkdgate.keymix.classical, qkdgate.keymix.combiner, "
            "qkdgate.keymix.schedule, qkdgate.keymix.labels, qkdgate.keymix.secret, "
            "qkdgate.keymix.probe\n"
            "print(' '.join(m for m in ('asyncio', 'ruamel', 'ruamel.yaml', 'yaml', 'pyroute2', "
            "'aiohttp', 'aiomqtt', 'oqs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


_KEM = get_kem("ML-KEM-768")
_PRIV, _PUB = _KEM.generate_keypair()
_X, _ = x25519_keypair()


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=1300), st.binary(min_size=1184, max_size=1184)))
def test_encapsulate_any_bytes_works_or_is_remote_error(data):
    try:
        ct, ss = _KEM.encapsulate(data)
    except RemoteProtocolError:
        return
    assert len(ct) == 1088 and len(ss) == 32


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=1200), st.binary(min_size=1088, max_size=1088)))
def test_decapsulate_any_bytes_works_or_is_remote_error(data):
    try:
        ss = _KEM.decapsulate(_PRIV, data)
    except RemoteProtocolError:
        return
    assert len(data) == 1088 and len(ss) == 32   # implicit rejection, never an exception


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32)))
def test_x25519_any_bytes_works_or_is_remote_error(data):
    try:
        s = x25519_shared(_X, data)
    except RemoteProtocolError:
        return
    assert len(s) == 32 and s.reveal() != bytes(32)


def test_spec_lists_every_label_of_the_tree():
    from pathlib import Path

    from qkdgate.keymix import labels

    doc = (Path(__file__).parents[2] / "docs" / "keymix.md").read_text()
    names = [v for k, v in vars(labels).items() if k.startswith("LABEL_")]
    assert len(names) == 6
    for label in names:
        assert f"`{label}`" in doc or f'"{label}"' in doc, label
    assert labels.root_label("ML-KEM-768", True, True) in doc
