"""docs/protocol.md is complete: an independent decoder written from it
(reference_decoder.py, stdlib only) agrees with the real codec on real
exchanges, and the document's formulas for mac1, TH, key ids and the
signature inputs verify real messages using only pyca primitives."""

from __future__ import annotations

import hashlib

import pytest
import reference_decoder as ref
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from protocol_harness import identity, make_pair

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import messages as m
from qkdgate.keymix.schedule import confirmation_tag

PSK = b"0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("profile,kem", [("default", "ML-KEM-768"), ("cnsa2", "ML-KEM-1024")])
def test_reference_decoder_and_formulas_match_real_messages(profile, kem):
    ida, idb = identity("gw-a", profile=profile), identity("gw-b", profile=profile)
    p = make_pair(kem=kem, id_a=ida, id_b=idb, psk_a=PSK, psk_b=PSK, qkd="b-master")
    p.roundtrip_until_done()
    by_src = {"gw-a": [], "gw-b": []}
    for src, d in p.log:
        by_src[src].append(d)
    msgs = {}
    for src, dgrams in by_src.items():
        receiver = "gw-b" if src == "gw-a" else "gw-a"
        for raw in ref.reassemble(dgrams):
            mine, theirs = ref.decode(raw), m.decode(raw)
            assert ref.mac1_ok(raw, receiver, PSK) and not ref.mac1_ok(raw, receiver)
            assert mine["core"] == theirs.core and mine["cookie"] == theirs.cookie
            for name, _ in ref.LAYOUT[mine["type"]]:
                assert mine[name] == theirs[name], name
            msgs[mine["type"]] = mine
    init, resp, confirm, done = msgs[1], msgs[2], msgs[3], msgs[4]
    assert resp["qkd_mode"] == 1 and len(resp["key_ids"]) == 1   # responder is master
    # key ids from the pinned strings
    assert init["signer_id"] == ref.key_id(ida.public.to_string())
    assert resp["signer_id"] == ref.key_id(idb.public.to_string())
    # INIT: Ed25519 over ctx || 0x00 || core up to the signature
    Ed25519PublicKey.from_public_bytes(ida.public.ed25519_public).verify(
        init["ed25519_sig"], b"qkdgate/1 INIT\x00" + init["core"][:init["offsets"]["ed25519_sig"]])
    # RESP: hybrid signature over TH || tag, both halves checked with pyca alone
    th = ref.transcript_hash(init, resp, "gw-a", "gw-b", PSK)
    ml_cls = mldsa.MLDSA65PublicKey if profile == "default" else mldsa.MLDSA87PublicKey
    sig = resp["signature"]
    Ed25519PublicKey.from_public_bytes(idb.public.ed25519_public).verify(
        sig[:64], b"qkdgate/1 RESP\x00" + th + resp["tag"])
    ml_cls.from_public_bytes(idb.public.mldsa_public).verify(sig[64:], th + resp["tag"],
                                                              b"qkdgate/1 RESP")
    # CONFIRM: over TH || CONFIRM core up to the signature
    signed = th + confirm["core"][:confirm["offsets"]["signature"]]
    ml_cls.from_public_bytes(ida.public.mldsa_public).verify(confirm["signature"][64:], signed,
                                                              b"qkdgate/1 CONFIRM")
    # the tags, from the session secret the daemon was handed
    session = p.a.of(E.InstallInbound)[0].session
    assert resp["tag"] == confirmation_tag(session, "responder", th)
    assert confirm["tag"] == confirmation_tag(session, "initiator", th)
    assert done["tag"] == confirmation_tag(
        session, "responder", hashlib.sha256(b"qkdgate/1 done\x00" + th).digest())
