import os
import socket

import pytest

from qkdgate.gateway.daemon.sdnotify import SdNotifier


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield path, s
    s.close()


def recv_fields(s):
    data = s.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.strip().split("\n"))


def test_disabled_without_notify_socket_is_a_no_op():
    n = SdNotifier({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False
    assert n.watchdog_interval is None


def test_ready_status_watchdog_stopping(listener):
    path, s = listener
    n = SdNotifier({"NOTIFY_SOCKET": path})
    assert n.ready("2 tunnels up")
    f = recv_fields(s)
    assert f["READY"] == "1" and f["STATUS"] == "2 tunnels up" and f["MAINPID"] == str(os.getpid())
    assert n.status("rekeying t1")
    assert recv_fields(s) == {"STATUS": "rekeying t1"}
    assert n.status("rekeying t1") is False  # unchanged status is not resent
    assert n.watchdog()
    assert recv_fields(s) == {"WATCHDOG": "1"}
    assert n.reloading()
    f = recv_fields(s)
    assert f["RELOADING"] == "1" and int(f["MONOTONIC_USEC"]) > 0
    assert n.stopping()
    assert recv_fields(s) == {"STOPPING": "1"}


def test_newline_in_status_cannot_forge_a_field(listener):
    path, s = listener
    n = SdNotifier({"NOTIFY_SOCKET": path})
    n.status("evil\nREADY=1")
    assert recv_fields(s) == {"STATUS": "evil READY=1"}


def test_abstract_socket_address():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"qkdgate-test-{os.getpid()}"
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        assert SdNotifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert recv_fields(s) == {"WATCHDOG": "1"}
    finally:
        s.close()


def test_unreachable_socket_does_not_raise(tmp_path, caplog):
    n = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert n.ready() is False
    assert n.watchdog() is False
    assert sum("sd_notify" in r.message for r in caplog.records) == 1  # warned once


@pytest.mark.parametrize("env,expected", [
    ({"WATCHDOG_USEC": "20000000"}, 10.0),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "junk"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_watchdog_interval_is_half_the_timeout(env, expected):
    assert SdNotifier(env).watchdog_interval == expected
