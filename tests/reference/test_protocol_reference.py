"""The independent references (protocol_ref.py from docs/protocol.md,
keymix_ref.py from docs/keymix.md; standard library only) agree with every
protocol transcript vector in tests/vectors/protocol-*.json.

What needs ML-KEM or ML-DSA (the KEM secret, the ML-DSA halves of the
signatures) is taken from the vector; everything else is recomputed from the
documents: reassembly, layouts, mac1, key ids, transcript hash, session
secret, tags, signed messages, generation rules and ESP keys.
"""

import importlib.util
import json
from pathlib import Path

import pytest


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _load("protocol_ref")
kref = _load("keymix_ref")
H = bytes.fromhex
FILES = sorted((Path(__file__).parents[1] / "vectors").glob("protocol-*.json"))
VECTORS = [json.loads(p.read_text()) for p in FILES]
DONE = [v for v in VECTORS if v["inputs"].get("outcome", "established") == "established"]
ABORTED = [v for v in VECTORS if v["inputs"].get("outcome") == "aborted"]


def _jsonish(v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [_jsonish(x) for x in v]
    return v


def _messages(vec):
    out = {}
    for x in vec["messages"]:
        mid, body = ref.reassemble([H(d) for d in x["datagrams"]])        # 3.1
        assert mid == x["message_id"]
        assert body == H(x["message"])
        msg = ref.parse_message(body)                                     # 4
        assert msg["type"] == x["type"]
        assert msg["header"] == x["header"]
        assert {k: _jsonish(v) for k, v in msg["fields"].items()} == x["fields"]
        assert len(msg["core"]) == x["core_length"]
        assert msg["cookie"].hex() == x["cookie"]
        out[x["type"]] = (x["sender"], msg)
    return out


def test_reference_reads_a_known_datagram_header():
    d = (b"QG\x02\x00" + (7).to_bytes(4, "big") + b"\x00\x00\x00\x01"
         + (3).to_bytes(4, "big") + b"abc")
    assert ref.reassemble([d]) == (7, b"abc")
    with pytest.raises(ValueError, match="datagram header"):
        ref.parse_datagram(d[:2] + b"\x01" + d[3:])     # datagram version 1 (u8 counts)


def test_reference_ed25519_rfc8032_test_1():
    # RFC 8032 7.1 TEST 1 (empty message)
    pk = H("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = H("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
            "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert ref.ed25519_verify(pk, b"", sig)
    assert not ref.ed25519_verify(pk, b"x", sig)


@pytest.mark.parametrize("vec", ABORTED, ids=[v["id"] for v in ABORTED])
def test_reference_agrees_with_aborted_vector(vec):
    i, x = vec["inputs"], vec["intermediate"]
    msgs = _messages(vec)
    assert list(msgs) == ["INIT", "ABORT"]
    (_, init), (sender, abort) = msgs["INIT"], msgs["ABORT"]
    psk = H(i["psk"]) if i["psk"] else None
    assert sender == "responder"
    assert abort["mac1"] == ref.mac1(ref.k_mac1(i["initiator"]["name"], psk), abort["core"])
    assert init["mac1"] == ref.mac1(ref.k_mac1(i["responder"]["name"], psk), init["core"])
    fi, fa = init["fields"], abort["fields"]
    # 4.7: R's epoch and I's, I's exchange id; the exchange's generation (6.1)
    assert (abort["header"]["sender_epoch"], abort["header"]["receiver_epoch"],
            abort["header"]["exchange_id"]) == (x["responder_epoch"], x["initiator_epoch"],
                                                init["header"]["exchange_id"])
    assert fa["generation"] == max(fi["generation_min"], i["responder"]["generation_floor"] + 1)
    assert fa["sender_role"] == 2
    assert fa["code"] == ref.ABORT_CODE["POLICY"]
    assert fi["qkd_mode"] == ref.QKD_MODE["ABSENT"]
    assert fi["qkd_reason"] == ref.QKD_REASON[i["initiator"]["kme_error"]]
    assert fi["qkd_flags"] == 1
    assert not i["responder"]["allow_pqc_only"]
    profile, ed, ml = ref.parse_identity(vec["identities"]["responder"]["public"])
    assert fa["signer_id"] == ref.key_id(profile, ed, ml)
    digest = ref.abort_digest(init["core"], ref.prefix(abort, "signature"))
    assert digest.hex() == x["abort_digest"]
    sig = vec["signatures"][0]
    assert (sig["context"], H(sig["message"])) == ("ABORT", digest)
    assert fa["signature"] == H(sig["ed25519"]) + H(sig["mldsa"])
    assert ref.ed25519_verify(ed, ref.ed25519_signed_bytes("ABORT", digest), H(sig["ed25519"]))


@pytest.mark.parametrize("vec", DONE, ids=[v["id"] for v in DONE])
def test_reference_agrees_with_vector(vec):
    i, x = vec["inputs"], vec["intermediate"]
    msgs = _messages(vec)
    assert list(msgs) == ["INIT", "RESP", "CONFIRM", "DONE"]
    psk = H(i["psk"]) if i["psk"] else None
    name = {"initiator": i["initiator"]["name"], "responder": i["responder"]["name"]}
    peer = {"initiator": "responder", "responder": "initiator"}

    # 5.1 mac1, keyed with the receiver's name and the PSK
    for sender, msg in msgs.values():
        key = ref.k_mac1(name[peer[sender]], psk)
        assert msg["mac1"] == ref.mac1(key, msg["core"], msg["cookie"])
    assert ref.k_mac1(name["responder"], psk).hex() == x["mac1_key_to_responder"]
    assert ref.k_mac1(name["initiator"], psk).hex() == x["mac1_key_to_initiator"]

    # 5.3 key ids of the pinned identities are the signer ids
    kid = {}
    for role in ("initiator", "responder"):
        profile, ed, ml = ref.parse_identity(vec["identities"][role]["public"])
        assert profile == i[role]["profile"]
        kid[role] = ref.key_id(profile, ed, ml)
        assert kid[role].hex() == vec["identities"][role]["key_id"]
    _, init = msgs["INIT"]
    _, resp = msgs["RESP"]
    _, confirm = msgs["CONFIRM"]
    _, done = msgs["DONE"]
    fi, fr, fc, fd = init["fields"], resp["fields"], confirm["fields"], done["fields"]
    assert fi["signer_id"] == fc["signer_id"] == kid["initiator"]
    assert fr["signer_id"] == kid["responder"]

    # 4.1 headers: epochs, exchange id
    ei, er, xid = (init["header"]["sender_epoch"], resp["header"]["sender_epoch"],
                   init["header"]["exchange_id"])
    assert (ei, er) == (i["initiator"]["epoch"], i["responder"]["epoch"])      # persisted
    assert ei >= i["responder"]["peer_epoch_floor"]     # 10: an INIT below the floor is dropped
    # 4.1: I names R by the epoch it authenticated in this run, else its journal's floor
    assert init["header"]["receiver_epoch"] == i["initiator"]["peer_epoch_floor"]
    assert xid == 1
    for m, (s, r) in ((resp, (er, ei)), (confirm, (ei, er)), (done, (er, ei))):
        assert (m["header"]["sender_epoch"], m["header"]["receiver_epoch"],
                m["header"]["exchange_id"]) == (s, r, xid)

    # 4.3/4.4 and 6.1: suite, generations, SPIs, QKD modes
    assert fi["kem_id"] == ref.KEM_IDS[i["kem"]]
    assert fi["generation_min"] == i["initiator"]["generation_floor"] + 1
    gen = max(fi["generation_min"], i["responder"]["generation_floor"] + 1)
    assert fr["generation"] == fc["generation"] == fd["generation"] == gen == x["generation"]
    kinds = dict(map(tuple, i["tunnels"]))
    for f, role in ((fi, "initiator"), (fr, "responder")):
        assert f["spis"] == [[t, kinds[t], i[role]["spis"][t]] for t in sorted(kinds)]  # A.3
    assert len(fi["x25519_public"]) == len(fr["x25519_public"]) == (32 if i["x25519"] else 0)
    qkd = i["qkd"]
    assert fi["qkd_flags"] == (1 if i["initiator"]["allow_pqc_only"] else 0)
    kme_error = i["initiator"].get("kme_error")
    if kme_error:      # 4.3 ABSENT with the KME's reason; R answers ABSENT, "peer asked"
        assert (fi["qkd_mode"], fi["qkd_reason"]) == (ref.QKD_MODE["ABSENT"],
                                                      ref.QKD_REASON[kme_error])
        assert (fr["qkd_mode"], fr["qkd_reason"]) == (ref.QKD_MODE["ABSENT"],
                                                      ref.QKD_REASON["peer"])
        assert fi["key_ids"] == fr["key_ids"] == []
        combiner_ids = []
    elif qkd is None:
        assert fi["qkd_mode"] == fr["qkd_mode"] == ref.QKD_MODE["NONE"]
        combiner_ids = []
    elif i["initiator"]["qkd_role"] == "master":
        assert (fi["qkd_mode"], fr["qkd_mode"]) == (ref.QKD_MODE["KEYS"], ref.QKD_MODE["USING"])
        assert fi["key_ids"] == qkd["key_ids"]
        assert fr["key_ids"] == []
        combiner_ids = fi["key_ids"]                                      # 5.2
    else:
        assert (fi["qkd_mode"], fr["qkd_mode"]) == (ref.QKD_MODE["EXPECT"], ref.QKD_MODE["KEYS"])
        assert fr["key_ids"] == qkd["key_ids"]
        assert fi["key_ids"] == []
        combiner_ids = fr["key_ids"]
    assert combiner_ids == x["combiner_key_ids"]

    # 5.2 transcript hash over the INIT core and the RESP prefix
    assert ref.k_th(psk).hex() == x["transcript_key"]
    resp_prefix = ref.prefix(resp, "tag")
    assert len(resp_prefix) == x["resp_prefix_length"]
    th = ref.transcript_hash(psk, name["initiator"], name["responder"], init["core"],
                             resp_prefix)
    assert th.hex() == x["transcript_hash"]

    # keymix.md 4 with the recorded ML-KEM secret; X25519 recomputed (RFC 7748)
    z_x = None
    if i["x25519"]:
        xs = x["x25519"]
        base = (9).to_bytes(32, "little")
        assert kref.x25519(H(xs["initiator_private"]), base) == fi["x25519_public"]
        assert kref.x25519(H(xs["responder_private"]), base) == fr["x25519_public"]
        z_x = kref.x25519(H(xs["initiator_private"]), fr["x25519_public"])
        assert z_x == kref.x25519(H(xs["responder_private"]), fi["x25519_public"])
        assert z_x.hex() == xs["secret"]
    z_qkd = H(qkd["key"]) if qkd else None
    args = (i["kem"], H(x["kem_secret"]), z_x, z_qkd, combiner_ids, th)
    root, s = kref.session_secret(*args)
    assert root == x["root_label"]
    assert kref.fixed_info(*args).hex() == x["fixed_info"]
    assert s.hex() == x["session_secret"]
    assert kref.session_id(s, root).hex() == x["session_id"]

    # 4.4-4.6 tags; keymix.md 6.3
    assert fr["tag"] == kref.confirmation(s, root, "responder", th)
    assert fc["tag"] == kref.confirmation(s, root, "initiator", th)
    assert ref.done_hash(th).hex() == x["done_hash"]
    assert fd["tag"] == kref.confirmation(s, root, "responder", ref.done_hash(th))

    # 5.4 what each signature covers; hybrid = Ed25519 (64) || ML-DSA
    sigs = {s_["context"]: s_ for s_ in vec["signatures"]}
    assert H(sigs["RESP"]["message"]) == th + fr["tag"]
    assert H(sigs["CONFIRM"]["message"]) == th + ref.prefix(confirm, "signature")
    for ctx, f in (("RESP", fr), ("CONFIRM", fc)):
        assert f["signature"] == H(sigs[ctx]["ed25519"]) + H(sigs[ctx]["mldsa"])
        assert len(H(sigs[ctx]["mldsa"])) == ref.MLDSA_SIG_SIZE[i["initiator"]["profile"]]
    # Ed25519 verification needs no PQC: check the INIT's and both hybrid halves
    ed = {r: ref.parse_identity(vec["identities"][r]["public"])[1]
          for r in ("initiator", "responder")}
    assert ref.ed25519_verify(ed["initiator"], ref.ed25519_signed_bytes(
        "INIT", ref.prefix(init, "ed25519_sig")), fi["ed25519_sig"])
    for ctx, signer in (("RESP", "responder"), ("CONFIRM", "initiator")):
        assert ref.ed25519_verify(ed[signer], ref.ed25519_signed_bytes(
            ctx, H(sigs[ctx]["message"])), H(sigs[ctx]["ed25519"]))
    assert not ref.ed25519_verify(ed["responder"], ref.ed25519_signed_bytes(
        "CONFIRM", H(sigs["RESP"]["message"])), H(sigs["RESP"]["ed25519"]))

    # section 6: i2r keyed with R's SPI, r2i with I's; keymix.md 5
    for e in x["esp"]:
        receiver = "responder" if e["direction"] == "i2r" else "initiator"
        assert e["spi"] == i[receiver]["spis"][e["tunnel_id"]]
        assert e["generation"] == gen
        assert kref.esp(s, root, e["tunnel_id"], e["direction"], e["spi"], gen).hex() == e["key"]
    assert len(x["esp"]) == 2 * sum(k == "ipsec" for _, k in i["tunnels"])
    # keymix.md 6.4: one key per consumer tunnel and generation, both directions
    consumers = x.get("consumer_keys", [])
    for e in consumers:
        assert e["generation"] == gen and i["initiator"]["spis"][e["tunnel_id"]] == 0
        assert kref.consumer(s, root, e["consumer"], e["tunnel_id"], gen).hex() == e["key"]
    assert len(consumers) == sum(k in ("wireguard", "strongswan") for _, k in i["tunnels"])


def test_reference_reads_sourced_key_ids_as_qkdgate_writes_them():
    """docs/protocol.md 9.1 (several QKD key sources): the stdlib reference,
    written from the document, reads the sourced key_IDs qkdgate encodes."""
    from qkdgate.gateway.protocol import messages as m
    ids = ("2d9c0b4e-5a37-4b5e-9a3e-3f1e4c2b7a10", "7f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2910")
    values = {"generation_min": 1, "nonce": bytes(32), "kem_id": 1, "kem_public": b"k",
              "x25519_public": b"", "qkd_mode": 1, "qkd_reason": 0, "qkd_flags": 0,
              "key_ids": ids, "key_sources": (0, 3), "spis": (), "signer_id": bytes(8),
              "ed25519_sig": bytes(64)}
    wire = m.seal(m.encode_core(m.MsgType.INIT, 1, 0, 1, values), bytes(32))
    assert ref.parse_message(wire)["fields"]["key_ids"] == [[0, ids[0]], [3, ids[1]]]
    values["key_sources"] = ()
    wire = m.seal(m.encode_core(m.MsgType.INIT, 1, 0, 1, values), bytes(32))
    assert ref.parse_message(wire)["fields"]["key_ids"] == list(ids)
