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


class _Session:
    """vici.Session.initiate as the package streams it: charon's control-log
    events, then the command's result (CommandException when it failed)."""

    def __init__(self, logs: list[dict[str, bytes]], ok: bool) -> None:
        self.logs, self.ok = logs, ok

    def initiate(self, _msg):
        from vici.exception import CommandException
        yield from self.logs
        if not self.ok:
            raise CommandException("establishing CHILD_SA 'lan' failed")


def _client(session: _Session):
    import vici.exception as ve

    from qkdgate.tunnels.strongswan_vici import ViciClient
    c = object.__new__(ViciClient)
    c._s = session
    c._exc = (ve.SessionException, ve.CommandException, ve.DeserializationException, OSError,
              ValueError)
    return c


@pytest.mark.parametrize(("msg", "refused"), [
    (b"received AUTHENTICATION_FAILED notify error", True),
    (b"PPK required but peer does not support PPK", False),
    (b"giving up after 5 retransmits", False),
])
def test_initiate_tells_a_peer_refusal_from_other_failures(msg, refused):
    pytest.importorskip("vici")
    from qkdgate.tunnels.strongswan_vici import ViciAuthFailed, ViciError
    logs = [{"group": b"IKE", "level": b"1", "ikesa-uniqueid": b"7", "msg": msg}]
    with pytest.raises(ViciError) as e:
        _client(_Session(logs, ok=False)).initiate("gw-gw", "lan", 1000)
    assert isinstance(e.value, ViciAuthFailed) is refused
    assert "establishing CHILD_SA" in str(e.value)
    ok = [{"ikesa-uniqueid": b"7", "msg": b"IKE_SA gw-gw[7] established"}]
    assert _client(_Session(ok, ok=True)).initiate("gw-gw", "lan", 1000) == 7
