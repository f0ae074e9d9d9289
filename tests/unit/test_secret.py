"""SecretBytes never prints, pickles or hashes, and is wiped; core dumps off."""

import copy
import json
import pickle
import subprocess
import sys

import pytest

from qkdgate.keymix.secret import SecretBytes

RAW = bytes(range(32))


def test_no_text_form_shows_the_bytes():
    s = SecretBytes(RAW)
    # every way to turn it into text, %-formatting included
    for text in (repr(s), str(s), f"{s}", f"{s!r}", f"{s:>80}", "%s" % s,  # noqa: UP031
                 str([s]), str({"k": s})):
        assert RAW.hex() not in text and "\\x01\\x02" not in text
        assert text.startswith("<SecretBytes len=32 fp=") or "<SecretBytes len=32" in text


def test_fingerprint_is_stable_within_a_process_and_salted():
    a, b = SecretBytes(RAW), SecretBytes(RAW)
    assert a.fingerprint() == b.fingerprint() != SecretBytes(RAW[::-1]).fingerprint()
    code = "from qkdgate.keymix.secret import SecretBytes; print(SecretBytes(bytes(range(32))).fingerprint())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() != a.fingerprint()   # per-process salt


@pytest.mark.parametrize("dump", [pickle.dumps, lambda s: pickle.dumps(s, protocol=0),
                                  lambda s: pickle.dumps([s])])
def test_not_picklable(dump):
    with pytest.raises(TypeError):
        dump(SecretBytes(RAW))


def test_no_implicit_bytes_or_hash_or_json():
    s = SecretBytes(RAW)
    with pytest.raises(TypeError):
        bytes(s)
    with pytest.raises(TypeError):
        hash(s)
    with pytest.raises(TypeError):
        json.dumps(s)
    assert s.reveal() == RAW and len(s) == 32


def test_equality_and_copies():
    s = SecretBytes(bytearray(RAW))
    assert s == SecretBytes(RAW) and s != SecretBytes(RAW[:-1])
    c, d = copy.copy(s), copy.deepcopy(s)
    s.wipe()
    assert c.reveal() == RAW and d.reveal() == RAW    # copies are independent


def test_wipe_zeroes_the_buffer_in_place():
    s = SecretBytes(RAW)
    buf = s._buf             # the private bytearray that holds the secret
    s.wipe()
    assert len(s) == 0 and s.reveal() == b""
    assert bytes(buf) == b""  # cleared after being zeroed
    with SecretBytes(RAW) as t:
        inner = t._buf
        view = memoryview(inner)  # a view pins the memory: clear() must fail, zeroing must not
        snapshot = view
    assert bytes(snapshot) == bytes(32)
    view.release()


def test_rejects_non_bytes():
    with pytest.raises(TypeError):
        SecretBytes("text")


def test_disable_core_dumps_in_a_child_process():
    code = """
import ctypes, resource
from qkdgate.keymix.secret import disable_core_dumps
st = disable_core_dumps()
libc = ctypes.CDLL(None)
print(st.ok, libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))
"""  # 3 = PR_GET_DUMPABLE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(None, 2) == ["True", "0", "(0, 0)\n"] or \
        out.stdout.strip() == "True 0 (0, 0)"
