"""Key schedule: per-SA keys for ESP and MACsec, key confirmation."""

import hashlib

import pytest
from test_keymix_combiner import exchange

from qkdgate.errors import AuthenticationFailed, LocalProtocolError
from qkdgate.interfaces import MacsecCipher, MacsecSaSpec, SaSpec
from qkdgate.keymix import schedule
from qkdgate.keymix.combiner import HybridInputs, combine
from qkdgate.keymix.schedule import confirmation_tag, esp_key, macsec_keys, verify_confirmation
from qkdgate.keymix.secret import SecretBytes

XPN, GCM = MacsecCipher.GCM_AES_XPN_256, MacsecCipher.GCM_AES_256
TH = hashlib.sha384(b"final transcript").digest()


@pytest.fixture(scope="module")
def pair():
    return exchange()


def test_200_tunnels_get_400_distinct_keys_equal_on_both_ends(pair):
    i, r = pair
    keys = set()
    for t in range(200):
        for d, spi in (("i2r", 0xC0000000 + 2 * t), ("r2i", 0xC0000001 + 2 * t)):
            ki = esp_key(i, f"tunnel-{t}", d, spi, 5)
            assert ki == esp_key(r, f"tunnel-{t}", d, spi, 5)
            keys.add(ki.reveal())
    assert len(keys) == 400 and all(len(k) == 36 for k in keys)


@pytest.mark.parametrize("args", [
    ("t2", "i2r", 0xC0000100, 1), ("t1", "r2i", 0xC0000100, 1),
    ("t1", "i2r", 0xC0000101, 1), ("t1", "i2r", 0xC0000100, 2),
], ids=["tunnel", "direction", "spi", "generation"])
def test_every_esp_context_field_changes_the_key(pair, args):
    assert esp_key(pair[0], "t1", "i2r", 0xC0000100, 1) != esp_key(pair[0], *args)


def test_esp_key_fits_the_sa_spec(pair):
    spec = SaSpec(key=esp_key(pair[0], "t1", "i2r", 0xC0000100, 1), reqid=1)
    assert len(spec.key) == 36 and spec.aead == "rfc4106(gcm(aes))"


def test_keys_of_another_exchange_are_unrelated(pair):
    other, _ = exchange()
    assert esp_key(pair[0], "t", "i2r", 0x1000, 1) != esp_key(other, "t", "i2r", 0x1000, 1)


def test_macsec_xpn_keys(pair):
    i, r = pair
    k = macsec_keys(i, "lan0", "i2r", 0x0200000000010001, 0, 1, XPN)
    assert k == macsec_keys(r, "lan0", "i2r", 0x0200000000010001, 0, 1, XPN)
    assert len(k.sak) == 32 and len(k.salt) == 12 and len(k.keyid) == 16 and k.ssci == 1
    assert macsec_keys(i, "lan0", "r2i", 0x0200000000020001, 0, 1, XPN).ssci == 2
    MacsecSaSpec(an=0, key=k.sak, keyid=k.keyid, ssci=k.ssci, salt=k.salt)  # accepted as is


def test_macsec_gcm_keys_have_no_salt_and_differ_from_xpn(pair):
    g = macsec_keys(pair[0], "lan0", "i2r", 1, 0, 1, GCM)
    x = macsec_keys(pair[0], "lan0", "i2r", 1, 0, 1, XPN)
    assert g.salt is None and g.ssci is None and len(g.sak) == 32
    assert g.sak != x.sak and g.keyid != x.keyid


def test_macsec_keyids_unique_per_sa_and_not_the_key(pair):
    s = pair[0]
    sas = [(t, d, sci, an, gen) for t in ("a", "b") for d in ("i2r", "r2i")
           for sci in (1, 2) for an in range(4) for gen in (1, 2)]
    keys = [macsec_keys(s, *sa, XPN) for sa in sas]
    assert len({k.keyid for k in keys}) == len(sas)
    assert len({k.sak.reveal() for k in keys}) == len(sas)
    assert all(k.keyid not in k.sak.reveal() and k.keyid not in k.salt.reveal() for k in keys)


def test_confirmation_tags(pair):
    i, r = pair
    ti, tr = confirmation_tag(i, "initiator", TH), confirmation_tag(i, "responder", TH)
    assert len(ti) == 32 and ti != tr                    # no reflection
    verify_confirmation(r, "initiator", TH, ti)          # the responder checks the initiator
    verify_confirmation(i, "responder", TH, confirmation_tag(r, "responder", TH))
    assert confirmation_tag(i, "initiator", hashlib.sha384(b"x").digest()) != ti
    bad = bytes([ti[0] ^ 1]) + ti[1:]
    for wrong in (bad, ti[:31], tr, b""):
        with pytest.raises(AuthenticationFailed, match="initiator"):
            verify_confirmation(r, "initiator", TH, wrong)
    other, _ = exchange()
    with pytest.raises(AuthenticationFailed):
        verify_confirmation(other, "initiator", TH, ti)


def test_downgraded_session_fails_confirmation():
    # Same ML-KEM and X25519 secrets; one side dropped the QKD leg.
    k, x = SecretBytes(b"K" * 32), SecretBytes(b"X" * 32)
    ids = ("5f2a3c1e-8e4b-4d2a-9a0b-2b8f4c6d7e01",)
    full = combine(HybridInputs("ML-KEM-768", k, x, SecretBytes(b"Q" * 32), ids, TH))
    bare = combine(HybridInputs("ML-KEM-768", k, x, None, (), TH))
    with pytest.raises(AuthenticationFailed):
        verify_confirmation(full, "initiator", TH, confirmation_tag(bare, "initiator", TH))


@pytest.mark.parametrize("call", [
    lambda s: esp_key(s, "", "i2r", 0x1000, 1),
    lambda s: esp_key(s, "x" * 256, "i2r", 0x1000, 1),
    lambda s: esp_key(s, "t", "in", 0x1000, 1),
    lambda s: esp_key(s, "t", "i2r", 0xFF, 1),
    lambda s: esp_key(s, "t", "i2r", 2**32, 1),
    lambda s: esp_key(s, "t", "i2r", 0x1000, -1),
    lambda s: esp_key(s, "t", "i2r", 0x1000, 2**64),
    lambda s: esp_key("not a session", "t", "i2r", 0x1000, 1),
    lambda s: macsec_keys(s, "t", "i2r", 1, 4, 1, XPN),
    lambda s: macsec_keys(s, "t", "i2r", -1, 0, 1, XPN),
    lambda s: macsec_keys(s, "t", "i2r", 2**64, 0, 1, XPN),
    lambda s: macsec_keys(s, "t", "i2r", 1, 0, 1, "gcm-aes-256"),
    lambda s: confirmation_tag(s, "peer", TH),
    lambda s: confirmation_tag(s, "initiator", b""),
])
def test_misuse_is_a_local_error(pair, call):
    with pytest.raises(LocalProtocolError):
        call(pair[0])


def test_direction_and_role_names():
    assert schedule.DIRECTIONS == ("i2r", "r2i") and schedule.ROLES == ("initiator", "responder")


def test_consumer_keys_equal_on_both_ends_and_independent_per_consumer(pair):
    """Issue 21 item 1: each consumer derives under its own label, so the
    WireGuard PSK and the strongSwan PPK of one tunnel and generation are
    unrelated to each other and to the ESP key."""
    i, r = pair
    wg = schedule.consumer_key(i, "wireguard", "t1", 7)
    sw = schedule.consumer_key(i, "strongswan", "t1", 7)
    assert wg == schedule.consumer_key(r, "wireguard", "t1", 7)
    assert len(wg.reveal()) == len(sw.reveal()) == 32
    esp = esp_key(i, "t1", "i2r", 0x100, 7).reveal()
    assert len({wg.reveal(), sw.reveal(), esp[:32]}) == 3
    assert wg != schedule.consumer_key(i, "wireguard", "t1", 8)
    assert wg != schedule.consumer_key(i, "wireguard", "t2", 7)


@pytest.mark.parametrize("consumer", ["xfrm", "macsec", "WireGuard", ""])
def test_consumer_key_refuses_consumers_without_one(pair, consumer):
    with pytest.raises(LocalProtocolError):
        schedule.consumer_key(pair[0], consumer, "t1", 1)
