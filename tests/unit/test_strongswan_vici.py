"""The vici wrapper's parameter objects and the swanctl.conf reader
(tunnels/strongswan_vici.py, tunnels/strongswan_conf.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkdgate.errors import ConfigError
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.strongswan_conf import parse, read_connection
from qkdgate.tunnels.strongswan_vici import ConnSpec, Ppk

SWANCTL = (Path(__file__).resolve().parent.parent / "fixtures" / "swanctl-operator.conf").read_text()


def test_swanctl_reader_and_vici_message():
    body = parse(SWANCTL)["connections"]["gw-gw"]
    assert body["local"]["id"] == "gw a"
    msg = ConnSpec("gw-gw", body, "qkdgate-t-g7").message()["gw-gw"]
    assert msg["ppk_id"] == "qkdgate-t-g7" and msg["ppk_required"] == "yes"
    assert msg["proposals"] == ["aes256gcm16-prfsha384-x25519", "aes128gcm16-prfsha256-x25519"]
    assert msg["children"]["lan"]["local_ts"] == ["10.1.0.0/24"]
    assert parse(SWANCTL)["secrets"]["ike-1"]["secret"] == "not read # by qkdgate"


def test_swanctl_reader_errors_name_file_and_line(tmp_path):
    p = tmp_path / "swanctl.conf"
    p.write_text("connections {\n  a : b {\n  }\n}\n")
    with pytest.raises(ConfigError) as e:
        read_connection(str(p), "a")
    assert e.value.line == 2 and e.value.file == str(p)
    p.write_text("connections {\n  x {\n   secret-ish garbage\n  }\n}\n")
    with pytest.raises(ConfigError) as e:
        read_connection(str(p), "x")
    assert e.value.line == 3 and "garbage" not in str(e.value)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "gw.conf").write_text(SWANCTL)
    p.write_text("include conf.d/*.conf\n")
    assert read_connection(str(p), "gw-gw")["remote_addrs"] == "192.0.2.2"
    with pytest.raises(ConfigError):
        read_connection(str(p), "nope")


def test_ppk_refuses_short_keys_and_never_prints_its_key():
    with pytest.raises(ValueError):
        Ppk("qkdgate-t-g1", SecretBytes(b"short"))
    assert "abc" not in repr(Ppk("qkdgate-t-g1", SecretBytes(b"abc" * 11)))
