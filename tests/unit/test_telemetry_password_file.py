"""The MQTT password file is a private file (issue 17 finding 8c): it is read
like identity and PSK files, so a symlink, a file other users can read, a
file owned by someone else, or a FIFO planted at the path (which a plain
open() would wait on for ever) is refused with a ConfigError naming
telemetry.mqtt.password_file, and the password never appears in the error."""

from __future__ import annotations

import os
import threading

import pytest

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.model import MqttConfig
from qkdgate.gateway.telemetry.mqtt import MqttOptions

SECRET = b"hunter2-long-password"


def _load(path) -> MqttOptions:
    return MqttOptions.from_config(MqttConfig(username="gw-a", password_file=str(path)))


@pytest.fixture
def pw(tmp_path):
    p = tmp_path / "pw"
    p.write_bytes(SECRET + b"\n")
    p.chmod(0o600)
    return p


def test_private_password_file_is_read(pw):
    assert _load(pw).password.reveal() == SECRET


def test_symlink_is_refused(pw, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(pw)
    with pytest.raises(ConfigError, match=r"telemetry\.mqtt\.password_file") as ei:
        _load(link)
    assert "cannot open MQTT password file" in str(ei.value)
    assert "hunter2" not in str(ei.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660], ids=lambda m: f"{m:04o}")
def test_file_readable_by_group_or_others_is_refused(pw, mode):
    pw.chmod(mode)
    with pytest.raises(ConfigError, match="readable by group or others") as ei:
        _load(pw)
    assert ei.value.path == "telemetry.mqtt.password_file"
    assert ei.value.found == f"mode {mode:04o}"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_file_owned_by_another_user_is_refused(pw):
    os.chown(pw, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by another user"):
        _load(pw)


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            _load(fifo)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  handed to the test thread
            outcome.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        # open() is blocked waiting for a writer: release it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("opening the password file blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError), outcome
    assert "not a regular file" in str(outcome[0])
    assert outcome[0].path == "telemetry.mqtt.password_file"


def test_password_longer_than_mqtt_allows_is_refused(pw):
    pw.write_bytes(b"x" * 65536 + b"\n")
    with pytest.raises(ConfigError, match="longer than 65535"):
        _load(pw)
    pw.write_bytes(b"x" * 65535 + b"\r\n")
    assert len(_load(pw).password.reveal()) == 65535
