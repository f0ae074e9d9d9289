"""MQTT telemetry over mutual TLS to a real Mosquitto, configured the way an
operator does it (telemetry.mqtt in the YAML config), and the config errors."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_telemetry import Broker, Subscriber, free_port, until
from test_telemetry import pytestmark as needs_mosquitto

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.model import MqttConfig, TlsConfig
from qkdgate.gateway.telemetry.mqtt import MqttOptions, Telemetry


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool = False, ip: str | None = None):
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
    return str(path)


@pytest.fixture
def pki(tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, None, ca_key, ca=True)
    files = {"ca": _write(tmp_path / "ca.pem", ca)}
    for name, ip in (("server", "127.0.0.1"), ("client", None)):
        k = ec.generate_private_key(ec.SECP256R1())
        files[name] = _write(tmp_path / f"{name}.pem", _cert(name, ca_key, ca.subject, k, ip=ip))
        files[name + "_key"] = _write(tmp_path / f"{name}.key", key=k)
    other = ec.generate_private_key(ec.SECP256R1())
    files["other_ca"] = _write(tmp_path / "other-ca.pem", _cert("other", other, None, other, ca=True))
    return files


@needs_mosquitto
async def test_mutual_tls_from_the_config_section(tmp_path, pki):
    b = Broker(tmp_path, extra=(f"allow_anonymous true\ncafile {pki['ca']}\n"
                                f"certfile {pki['server']}\nkeyfile {pki['server_key']}\n"
                                "require_certificate true\ntls_version tlsv1.2")).start()
    try:
        cfg = MqttConfig(enabled=True, host="127.0.0.1", port=b.port,
                         tls=TlsConfig(cert=pki["client"], key=pki["client_key"], ca=pki["ca"]))
        good = Telemetry(MqttOptions.from_config(cfg, backoff_initial=0.05, backoff_max=0.2),
                         "gw-a")
        # A broker whose certificate does not chain to our CA is refused.
        wrong = MqttConfig(enabled=True, host="127.0.0.1", port=b.port,
                           tls=TlsConfig(cert=pki["client"], key=pki["client_key"],
                                         ca=pki["other_ca"]))
        bad = Telemetry(MqttOptions.from_config(wrong, backoff_initial=0.05, backoff_max=0.2),
                        "gw-b")
        tasks = [asyncio.create_task(t.run()) for t in (good, bad)]
        sub_tls = ssl.create_default_context(cafile=pki["ca"])
        sub_tls.load_cert_chain(pki["client"], pki["client_key"])
        async with Subscriber(b.port, tls_context=sub_tls) as sub:
            good.publish({"event": "qkd_alarm", "source": "kme-a", "qber": 0.2})
            got = await sub.wait_for("/events/qkd_alarm")
            assert got[0]["gateway"] == "gw-a"
        assert good.stats.connects >= 1
        assert await until(lambda: bad.stats.failures >= 1)
        assert bad.stats.connects == 0
        for t in (good, bad):
            await t.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 3)
    finally:
        b.stop()


def test_password_file_is_read_once_and_never_shown(tmp_path):
    pw = tmp_path / "pw"
    pw.write_bytes(b"hunter2-long-password\n")
    pw.chmod(0o600)   # a private file (issue 17 finding 8c)
    o = MqttOptions.from_config(MqttConfig(username="gw-a", password_file=str(pw)))
    assert o.password.reveal() == b"hunter2-long-password"
    assert "hunter2" not in repr(o) and "hunter2" not in str(o)


def test_config_errors_name_the_setting(tmp_path, pki):
    with pytest.raises(ConfigError, match=r"telemetry\.mqtt\.password_file"):
        MqttOptions.from_config(MqttConfig(password_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match=r"telemetry\.mqtt\.tls"):
        MqttOptions.from_config(MqttConfig(tls=TlsConfig(ca=str(tmp_path / "nope.pem"))))
    with pytest.raises(ConfigError, match=r"telemetry\.mqtt\.tls"):   # key does not match cert
        MqttOptions.from_config(MqttConfig(tls=TlsConfig(cert=pki["client"],
                                                         key=pki["server_key"])))
    bad = tmp_path / "binary"
    bad.write_bytes(b"\xff\xfe\x00")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="not UTF-8"):
        MqttOptions.from_config(MqttConfig(password_file=str(bad)))
    assert MqttOptions.from_config(MqttConfig(host="[2001:db8::1]")).host == "2001:db8::1"
    with pytest.raises(ConfigError, match="MQTT topic"):
        Telemetry(MqttOptions(port=free_port()), "gw/+")
