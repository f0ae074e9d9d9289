"""No secret reaches a log line, a repr or an exception text.

A full exchange runs with every logger at DEBUG; every produced object is
repr'd and str'd; every error the derivation can raise is provoked and its
text and traceback kept. Then each secret (KEM, X25519 and QKD inputs,
private keys, the session secret, every SA key, salt and SAK) is searched
for as raw bytes, hex (either case, and any 8-byte slice of it) and base64.
"""

import base64
import hashlib
import io
import logging
import traceback

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qkdgate.errors import QkdgateError
from qkdgate.interfaces import MacsecCipher, MacsecSaSpec, QkdKey, SaSpec
from qkdgate.keymix import probe, schedule
from qkdgate.keymix.classical import x25519_keypair, x25519_shared
from qkdgate.keymix.combiner import HybridInputs, combine
from qkdgate.keymix.kem import get_kem
from qkdgate.keymix.secret import SecretBytes

KEY_ID = "0b7d4c2e-1f3a-4b5c-8d9e-0a1b2c3d4e5f"


def forms(secret: bytes) -> list[bytes]:
    out = [secret, secret.hex().encode(), secret.hex().upper().encode(),
           base64.b64encode(secret), base64.urlsafe_b64encode(secret),
           base64.b64encode(secret).rstrip(b"="), repr(secret).encode()[2:-1]]
    h = secret.hex()
    out += [h[i:i + 16].encode() for i in range(0, len(h) - 15, 2)]  # any 8-byte slice
    return out


def test_full_derivation_leaks_no_secret(caplog):
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    secrets: list[bytes] = []
    objects: list[object] = []

    def capture_error(fn):
        try:
            fn()
        except QkdgateError as exc:
            texts.extend([str(exc), repr(exc), "".join(traceback.format_exception(exc))])
        else:
            pytest.fail("expected an error")

    for kem_name in ("ML-KEM-768", "ML-KEM-1024"):
        kem = get_kem(kem_name)
        priv, pub = kem.generate_keypair()
        secrets.append(kem.private_seed(priv).reveal())
        ct, ss_r = kem.encapsulate(pub)
        ss_i = kem.decapsulate(priv, ct)
        a, pa = x25519_keypair()
        b, pb = x25519_keypair()
        for k in (a, b):
            secrets.append(k.private_bytes_raw())
        xi = x25519_shared(a, pb)
        qkd = QkdKey(KEY_ID, SecretBytes(hashlib.sha256(kem_name.encode()).digest()))
        th = hashlib.sha384(b"transcript " + kem_name.encode()).digest()
        inputs = HybridInputs(kem_name, ss_i, xi, qkd.key, (qkd.key_id,), th)
        session = combine(inputs)
        secrets += [ss_i.reveal(), xi.reveal(), qkd.key.reveal(), session.secret.reveal()]
        objects += [priv, kem, qkd, inputs, session, session.provenance, ss_r, xi]
        for t in range(3):
            for d, spi in (("i2r", 0xC0000100 + t), ("r2i", 0xC0000200 + t)):
                key = schedule.esp_key(session, f"t{t}", d, spi, 1)
                secrets.append(key.reveal())
                objects.append(SaSpec(key=key, reqid=t + 1))
                for cipher in MacsecCipher:
                    mk = schedule.macsec_keys(session, f"t{t}", d, 7, t, 1, cipher)
                    secrets.append(mk.sak.reveal())
                    if mk.salt is not None:
                        secrets.append(mk.salt.reveal())
                    objects += [mk, MacsecSaSpec(an=t, key=mk.sak, keyid=mk.keyid,
                                                 ssci=mk.ssci, salt=mk.salt)]
        tag = schedule.confirmation_tag(session, "initiator", th)
        # every error the core can raise while handling this exchange
        # (capture_error calls each lambda at once, so B023 late binding cannot bite)
        capture_error(lambda: schedule.verify_confirmation(session, "initiator", th, tag[::-1]))  # noqa: B023
        capture_error(lambda: kem.decapsulate(priv, ct[:-1]))  # noqa: B023
        capture_error(lambda: kem.encapsulate(pub[:-1]))  # noqa: B023
        capture_error(lambda: x25519_shared(a, bytes(32)))  # noqa: B023
        capture_error(lambda: schedule.esp_key(session, "t", "sideways", 0x1000, 1))  # noqa: B023
        capture_error(lambda: combine(HybridInputs(kem_name, ss_i, xi, qkd.key, (), th)))  # noqa: B023
        capture_error(lambda: combine(HybridInputs(kem_name, ss_i, xi, SecretBytes(b"q"), (KEY_ID,), th)))  # noqa: B023

    out = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(out):
        probe.run(type("A", (), {"json": True})())
    texts.append(out.getvalue())
    for obj in objects:
        texts += [repr(obj), str(obj), f"{obj}"]
    for rec in caplog.records:
        texts += [rec.getMessage(), repr(rec.args), str(rec.__dict__)]
    assert any("combined session" in t for t in texts), "the combiner should log (safely)"

    haystack = "\n".join(texts)
    blobs = [haystack.encode("utf-8"), haystack.encode("latin-1", "replace"),
             haystack.encode("utf-8").lower()]
    assert len(secrets) > 50
    for secret in secrets:
        for form in forms(secret):
            for blob in blobs:
                assert form not in blob and form.lower() not in blob, "secret leaked"


def test_x25519_private_key_object_repr_has_no_key():
    k = X25519PrivateKey.generate()
    assert k.private_bytes_raw().hex() not in repr(k)
