"""keymix stays a pure core, and peer-byte parsers fail only with RemoteProtocolError."""

import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qkdgate.errors import RemoteProtocolError
from qkdgate.keymix.classical import x25519_keypair, x25519_shared
from qkdgate.keymix.kem import get_kem


def test_keymix_imports_no_io_frameworks():
    code = ("import sys, qkdgate.keymix.kem, qkdgate.keymix.classical, qkdgate.keymix.combiner, "
            "qkdgate.keymix.schedule, qkdgate.keymix.labels, qkdgate.keymix.secret, "
            "qkdgate.keymix.probe, qkdgate.keymix.keypool\n"
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
    assert len(names) == 11    # 8 of the tunnel key schedule (2 for consumers), 3 of the key service
    for label in names:
        assert f"`{label}`" in doc or f'"{label}"' in doc, label
    assert labels.root_label("ML-KEM-768", True, True) in doc


# ---- the protocol package is sans-IO too (issue 9 item 7)

_PROTOCOL = Path(__file__).parents[2] / "gateway" / "protocol"
# modules that do I/O, read the clock, or reach the layers above the core
_FORBIDDEN_MODULES = {
    "asyncio", "socket", "select", "selectors", "ssl", "threading", "subprocess", "time",
    "datetime", "pathlib", "shutil", "tempfile", "io", "urllib", "http", "aiohttp",
    "pyroute2", "ruamel", "yaml", "qkdgate.private_file", "qkdgate.gateway.daemon",
    "qkdgate.gateway.config", "qkdgate.tunnels", "qkdgate.adapters", "qkdgate.testing"}
_FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval"}
# os is allowed for exactly one thing: os.urandom as the production default of
# an injected rng (tests and the daemon pass their own)
_ALLOWED_OS = {"urandom"}


def _findings(source: str, name: str) -> list[str]:
    import ast
    out = []
    for node in ast.walk(ast.parse(source, name)):
        mods: list[str] = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for mod in mods:
            if any(mod == f or mod.startswith(f + ".") for f in _FORBIDDEN_MODULES):
                out.append(f"{name}:{node.lineno}: imports {mod}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _FORBIDDEN_CALLS:
            out.append(f"{name}:{node.lineno}: calls {node.func.id}()")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "os" and node.attr not in _ALLOWED_OS:
            out.append(f"{name}:{node.lineno}: uses os.{node.attr}")
    return out


def test_protocol_package_does_no_io():
    files = sorted(_PROTOCOL.glob("*.py"))
    assert len(files) >= 10
    found = [f for path in files for f in _findings(path.read_text(), path.name)]
    assert found == []


def test_purity_check_finds_each_kind():
    """The scanner is not vacuous: a synthetic module trips every rule."""
    bad = ("import socket\nfrom time import monotonic\nimport os\n"
           "from qkdgate.private_file import read_private_file\n"
           "def f():\n    open('x')\n    os.getpid()\n    return os.urandom(4)\n")
    found = _findings(bad, "bad.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "imports socket", "imports time", "imports time.monotonic",
        "imports qkdgate.private_file", "imports qkdgate.private_file.read_private_file",
        "calls open()", "uses os.getpid"]
