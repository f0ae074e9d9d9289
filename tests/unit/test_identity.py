"""Hybrid identities: both signatures required, file format, pinning, keygen."""

from __future__ import annotations

import json
import os
import random
import stat

import pytest

from qkdgate.errors import AuthenticationFailed, ConfigError
from qkdgate.gateway.cli import main as cli
from qkdgate.gateway.config.identity_files import load_local_identity, save_local_identity
from qkdgate.gateway.protocol.identity import (
    LocalIdentity,
    PeerIdentity,
    get_profile,
    select_identity,
)


def seeded(seed: int):
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


@pytest.fixture(scope="module")
def ident() -> LocalIdentity:
    return LocalIdentity.generate(name="gw-a", rng=seeded(1))


def test_sign_verify_and_sizes(ident):
    sig = ident.sign(b"transcript", b"RESP")
    assert len(sig) == 64 + 3309
    ident.public.verify(b"transcript", sig, b"RESP")


def test_context_separates_purposes(ident):
    sig = ident.sign(b"transcript", b"RESP")
    with pytest.raises(AuthenticationFailed):
        ident.public.verify(b"transcript", sig, b"CONFIRM")
    with pytest.raises(AuthenticationFailed):
        ident.public.verify(b"transcripT", sig, b"RESP")


@pytest.mark.parametrize("half", ["ed25519", "mldsa"])
def test_both_signatures_required(ident, half):
    """A valid signature of one algorithm with garbage for the other fails:
    an attacker must break both schemes."""
    sig = bytearray(ident.sign(b"m", b"x"))
    if half == "ed25519":
        sig[5] ^= 1
    else:
        sig[64 + 100] ^= 1
    with pytest.raises(AuthenticationFailed):
        ident.public.verify(b"m", bytes(sig), b"x")
    # and splicing halves from a different signer fails too
    other = LocalIdentity.generate(rng=seeded(2))
    osig = other.sign(b"m", b"x")
    good = ident.sign(b"m", b"x")
    with pytest.raises(AuthenticationFailed):
        ident.public.verify(b"m", good[:64] + osig[64:], b"x")
    with pytest.raises(AuthenticationFailed):
        ident.public.verify(b"m", good[:-1], b"x")


def test_deterministic_from_rng():
    a = LocalIdentity.generate(rng=seeded(7))
    b = LocalIdentity.generate(rng=seeded(7))
    assert a.public.to_string() == b.public.to_string()
    assert a.key_id == b.key_id


def test_public_string_roundtrip_and_errors(ident):
    text = ident.public.to_string()
    assert text.startswith("qkdgate-id1:mldsa65-ed25519:")
    back = PeerIdentity.from_string(text)
    assert back == ident.public and back.key_id == ident.key_id
    for bad in ["", "ssh-ed25519 AAAA", "qkdgate-id1:nope:AAAA",
                "qkdgate-id1:mldsa65-ed25519:AAAA", text[:-4], text + "AAAA",
                "qkdgate-id1:mldsa65-ed25519:!!!!"]:
        with pytest.raises(ConfigError):
            PeerIdentity.from_string(bad)


def test_cnsa2_profile():
    ident = LocalIdentity.generate("cnsa2", rng=seeded(3))
    assert ident.profile.name == "mldsa87-ed25519"
    sig = ident.sign(b"m", b"c")
    assert len(sig) == 64 + 4627
    PeerIdentity.from_string(ident.public.to_string()).verify(b"m", sig, b"c")
    with pytest.raises(ConfigError):
        get_profile("rsa")


def test_select_identity_for_rollover(ident):
    other = LocalIdentity.generate(rng=seeded(4))
    pins = [other.public, ident.public]
    assert select_identity(pins, ident.key_id) is ident.public
    with pytest.raises(AuthenticationFailed):
        select_identity(pins, b"\0" * 8)


def test_file_roundtrip_mode_and_refusals(tmp_path, ident):
    path = tmp_path / "id.json"
    save_local_identity(ident, str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = load_local_identity(str(path))
    assert loaded.public == ident.public and loaded.name == "gw-a"
    with pytest.raises(ConfigError, match="exists"):
        save_local_identity(ident, str(path))
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="group or others"):
        load_local_identity(str(path))
    os.chmod(path, 0o600)
    doc = json.loads(path.read_text())
    other_pub = LocalIdentity.generate(rng=seeded(5)).public.to_string()
    for mutate, msg in [(lambda d: d.update(version=2), "version"),
                        (lambda d: d.update(extra=1), "unknown"),
                        (lambda d: d.update(mldsa_seed="AAAA"), "32 bytes"),
                        (lambda d: d.update(public=other_pub), "does not match")]:
        d = dict(doc)
        mutate(d)
        with pytest.raises(ConfigError, match=msg):
            LocalIdentity.from_json(json.dumps(d))
    with pytest.raises(ConfigError):
        LocalIdentity.from_json("not json")


def test_secrets_do_not_print(ident):
    seed_b64 = json.loads(ident.to_json())["ed25519_seed"]
    assert seed_b64 not in repr(ident) and seed_b64 not in repr(ident.public)


def test_keygen_command(tmp_path, capsys):
    priv, pub = tmp_path / "gw.id", tmp_path / "gw.pub"
    assert cli.main(["keygen", "-o", str(priv), "--pub", str(pub), "--json",
                     "--profile", "cnsa2", "--name", "gw-b"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert pub.read_text().strip() == info["public"]
    loaded = load_local_identity(str(priv))
    assert loaded.public.to_string() == info["public"]
    assert info["profile"] == "mldsa87-ed25519" and info["key_id"] == loaded.key_id.hex()
    # refuses to overwrite without --force, with an operator error (exit 2)
    assert cli.main(["keygen", "-o", str(priv)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["keygen", "-o", str(priv), "--force"]) == 0
    assert "qkdgate-id1:mldsa65-ed25519:" in capsys.readouterr().out
    assert cli.main(["keygen", "-o", str(tmp_path / "x"), "--profile", "rsa"]) == 2


def test_keygen_show_and_refusals(tmp_path, capsys):
    priv = tmp_path / "gw.id"
    assert cli.main(["keygen", "-o", str(priv), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert cli.main(["keygen", "--show", str(priv), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["public"] == made["public"] and shown["key_id"] == made["key_id"]
    assert cli.main(["keygen"]) == 2                      # neither -o nor --show
    assert "-o FILE" in capsys.readouterr().err
    # never follows a symlink planted where the private key goes
    target = tmp_path / "elsewhere"
    link = tmp_path / "link.id"
    link.symlink_to(target)
    assert cli.main(["keygen", "-o", str(link), "--force"]) == 2
    assert not target.exists()
    assert cli.main(["keygen", "--show", str(link)]) == 2


def test_private_files_must_be_regular_and_ours(tmp_path):
    # The identity and PSK readers share one check (qkdgate/private_file.py).
    from qkdgate.errors import ConfigError
    from qkdgate.gateway.daemon.build import read_secret_file

    fifo = tmp_path / "psk"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="PSK file is not a regular file"):
        read_secret_file(str(fifo), "PSK file")
    psk = tmp_path / "psk2"
    psk.write_text("00" * 32)
    os.chmod(psk, 0o640)
    with pytest.raises(ConfigError, match="readable by group or others"):
        read_secret_file(str(psk), "PSK file")
    os.chmod(psk, 0o600)
    assert len(read_secret_file(str(psk), "PSK file")) == 32
    bad = tmp_path / "id.json"
    bad.write_bytes(b"\xff\xfe")
    os.chmod(bad, 0o600)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_local_identity(str(bad))
