#!/usr/bin/env python3
"""Generate tests/vectors/protocol-*.json, the qkdgate/1 transcript vectors.

Theory of operation: each case fixes every input of one exchange (names,
identity seeds, per-side rng seeds, PSK, QKD key and key_IDs, SPIs/ANs,
generation floors, the time) and runs it through two real PeerSessions
(tests/vectors/protocol_run.py, public driver API only). The file records
every datagram and message byte for byte, the decoded fields, the values
a reimplementation needs (transcript hash, mac1 keys, combiner inputs and
outputs, tags, ESP keys) and every signature with the exact message it
signs. ML-DSA signing is hedged (FIPS 204), so re-running this tool gives
new ML-DSA signatures (and so new RESP/CONFIRM bytes); everything else is
identical. ``--check`` therefore does not regenerate: it replays each file
(the same as tests/vectors/test_protocol_vectors.py) and says whether the
code still produces it byte for byte.

Usage: .venv/bin/python tools/make_protocol_vectors.py [--check] [CASE...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
sys.path.insert(0, str(VECTORS))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from protocol_run import decode_messages, run_exchange  # noqa: E402

from qkdgate.gateway.protocol import events as E  # noqa: E402
from qkdgate.gateway.protocol import messages as m  # noqa: E402
from qkdgate.keymix import schedule  # noqa: E402
from qkdgate.keymix.combiner import HybridInputs, fixed_info  # noqa: E402
from qkdgate.keymix.kem import get_kem  # noqa: E402
from qkdgate.keymix.secret import SecretBytes  # noqa: E402

H = bytes.fromhex


def det(case: str, what: str, n: int) -> bytes:
    """Inputs are SHA-256 of strings naming the case and the input."""
    out, i = b"", 0
    while len(out) < n:
        out += hashlib.sha256(f"qkdgate/1 protocol vectors/{case}/{what}/{i}".encode()).digest()
        i += 1
    return out[:n]


def det_uuid(case: str, i: int) -> str:
    return str(uuid.UUID(bytes=det(case, f"key_ID {i}", 16), version=4))


def side(case: str, role: str, name: str, profile: str, qkd_role: str | None,
         spis: dict[str, int], floor: int = 0, allow_pqc_only: bool | None = None,
         kme_error: str | None = None, epochs: tuple[int, int] = (1, 0)) -> dict:
    return {"name": name, "profile": profile,
            "ed25519_seed": det(case, f"{role} ed25519 seed", 32).hex(),
            "mldsa_seed": det(case, f"{role} ML-DSA seed", 32).hex(),
            "rng_seed": det(case, f"{role} rng seed", 32).hex(),
            "qkd_role": qkd_role, "sae_id": f"sae-{name}" if qkd_role else "",
            "epoch": epochs[0], "peer_epoch_floor": epochs[1],
            "allow_pqc_only": bool(allow_pqc_only), "kme_error": kme_error,
            "generation_floor": floor, "spis": spis}


def case_inputs(cid: str, *, kem: str, x25519: bool, psk: bool, qkd: str | None,
                profile: str, tunnels: list[tuple[str, str]], spis_i: dict, spis_r: dict,
                floors: tuple[int, int] = (0, 0), qkd_bits: int = 256,
                fallback: str | None = None, responder_allows_fallback: bool = True,
                epochs: tuple[int, int, int, int] = (1, 0, 1, 0)) -> dict:
    roles = {"initiator-master": ("master", "slave"), "responder-master": ("slave", "master"),
             None: (None, None)}[qkd]
    return {
        "kem": kem, "x25519": x25519,
        "psk": det(cid, "PSK", 32).hex() if psk else None,
        "now": 1000.0,
        "tunnels": [list(t) for t in tunnels],
        "kem_encaps_rng_seed": det(cid, "ML-KEM encapsulation rng seed", 32).hex(),
        "qkd": ({"key_ids": [det_uuid(cid, 0)], "key": det(cid, "QKD key", qkd_bits // 8).hex()}
                if qkd and not fallback else None),
        "initiator": side(cid, "initiator", "gw-alpha.example", profile, roles[0], spis_i,
                          floors[0], allow_pqc_only=bool(fallback), kme_error=fallback,
                          epochs=epochs[:2]),
        "responder": side(cid, "responder", "gw-bravo.example", profile, roles[1], spis_r,
                          floors[1],
                          allow_pqc_only=bool(fallback) and responder_allows_fallback,
                          epochs=epochs[2:]),
        "outcome": "established" if responder_allows_fallback else "aborted",
    }


CASES = {
    "protocol-qkd-master-initiator-x25519": (
        "ML-KEM-768 + X25519 + QKD; the initiator is the ETSI GS QKD 014 master "
        "(INIT carries the key_ID, qkd_mode KEYS; the responder fetches it by ID and "
        "answers USING); no PSK; one IPsec and one MACsec tunnel",
        case_inputs("protocol-qkd-master-initiator-x25519", kem="ML-KEM-768", x25519=True,
                    psk=False, qkd="initiator-master", profile="mldsa65-ed25519",
                    tunnels=[("site-a", "ipsec"), ("lan0", "macsec")],
                    spis_i={"site-a": 0xC1000101, "lan0": 0},
                    spis_r={"site-a": 0xC2000201, "lan0": 1})),
    "protocol-pqc-only-no-qkd": (
        "ML-KEM-768 + X25519, no QKD link configured on either side (qkd_mode NONE); "
        "no PSK; the responder's generation floor (7) is above the initiator's, so "
        "the RESP's generation is 8; two IPsec tunnels; both gateways restarted before "
        "(epochs 42 and 18; the responder last authenticated the initiator at epoch 41, "
        "so the INIT from 42 is above its floor)",
        case_inputs("protocol-pqc-only-no-qkd", kem="ML-KEM-768", x25519=True, psk=False,
                    qkd=None, profile="mldsa65-ed25519",
                    tunnels=[("site-b", "ipsec"), ("site-a", "ipsec")],
                    spis_i={"site-a": 0x00000100, "site-b": 0xFFFFFFFF},
                    spis_r={"site-a": 0x12345678, "site-b": 0x9ABCDEF0},
                    floors=(2, 7), epochs=(42, 17, 18, 41))),
    "protocol-psk-qkd-master-responder-cnsa": (
        "ML-KEM-1024 without X25519 + QKD (512-bit key); the responder is the master "
        "(INIT says EXPECT, RESP carries the key_ID); a 32-byte PSK (mac1 and TH keyed "
        "with it); identity profile mldsa87-ed25519 (CNSA 2.0); one IPsec tunnel",
        case_inputs("protocol-psk-qkd-master-responder-cnsa", kem="ML-KEM-1024",
                    x25519=False, psk=True, qkd="responder-master",
                    profile="mldsa87-ed25519", tunnels=[("core-1", "ipsec")],
                    spis_i={"core-1": 0xA0000001}, spis_r={"core-1": 0xB0000002},
                    qkd_bits=512, epochs=(3, 5, 6, 2))),
    "protocol-qkd-fallback-kme-timeout": (
        "ML-KEM-768 + X25519; QKD configured (initiator master) but the initiator's KME "
        "times out: both sides allow the PQC fallback, so INIT says ABSENT with reason 2 "
        "(KME timeout) and flag bit 0, RESP answers ABSENT with reason 5 (peer asked), and "
        "the generation is keyed without QKD; one MACsec tunnel only",
        case_inputs("protocol-qkd-fallback-kme-timeout", kem="ML-KEM-768", x25519=True,
                    psk=False, qkd="initiator-master", profile="mldsa65-ed25519",
                    tunnels=[("lan-0", "macsec")], spis_i={"lan-0": 3},
                    spis_r={"lan-0": 2}, fallback="timeout",
                    epochs=(2**40 + 1, 0, 2**63, 0))),
    "protocol-abort-policy-refuses-fallback": (
        "ML-KEM-768 + X25519; the initiator (QKD master) gets no key (KME unavailable) and "
        "asks for a PQC-only generation (INIT ABSENT reason 1), but the responder's policy "
        "requires QKD: it answers with an ABORT (code 3 POLICY, sender_role 2, generation 1) "
        "signed over H(\"qkdgate/1 abort\" || 0x00 || H(INIT core) || ABORT prefix); "
        "nothing is installed on either side",
        case_inputs("protocol-abort-policy-refuses-fallback", kem="ML-KEM-768", x25519=True,
                    psk=False, qkd="initiator-master", profile="mldsa65-ed25519",
                    tunnels=[("site-a", "ipsec")], spis_i={"site-a": 0x0000AB01},
                    spis_r={"site-a": 0x0000CD02}, fallback="unavailable",
                    responder_allows_fallback=False)),
    "protocol-consumer-kinds": (
        "ML-KEM-768 + X25519, no QKD; one tunnel of every key consumer (issue 21): IPsec "
        "(kind 1, SPI), MACsec (kind 2, AN), WireGuard (kind 3) and strongSwan (kind 4), "
        "whose value is 0; the kinds are inside the INIT and RESP cores, so the transcript "
        "hash binds them; intermediate.consumer_keys gives the WireGuard PSK and strongSwan "
        "PPK of the generation (docs/keymix.md 6.4)",
        case_inputs("protocol-consumer-kinds", kem="ML-KEM-768", x25519=True, psk=False,
                    qkd=None, profile="mldsa65-ed25519",
                    tunnels=[("site-a", "ipsec"), ("lan0", "macsec"), ("wg-b", "wireguard"),
                             ("sw-b", "strongswan")],
                    spis_i={"site-a": 0xC1000101, "lan0": 2, "wg-b": 0, "sw-b": 0},
                    spis_r={"site-a": 0xC2000201, "lan0": 3, "wg-b": 0, "sw-b": 0})),
}


def _signatures(run) -> list[dict]:
    return [{"signer": role, "context": ctx.decode(), "message": msg.hex(),
             "ed25519": sig[:64].hex(), "mldsa": sig[64:].hex()}
            for role in ("initiator", "responder") for ctx, msg, sig in run.identities[role].signed]


def _common(cid: str, description: str, inputs: dict, run, msgs: list[dict]) -> dict:
    psk = H(inputs["psk"]) if inputs["psk"] else None
    n_i, n_r = inputs["initiator"]["name"], inputs["responder"]["name"]
    return {
        "id": cid, "description": description, "inputs": inputs,
        "identities": {role: {"public": run.identities[role].public.to_string(),
                              "key_id": run.identities[role].key_id.hex()}
                       for role in ("initiator", "responder")},
        "messages": msgs,
        "intermediate": {
            "mac1_key_to_initiator": m.mac1_key(n_i, psk).hex(),
            "mac1_key_to_responder": m.mac1_key(n_r, psk).hex()},
        "signatures": _signatures(run),
        "events": {role: [type(e).__name__ for e in run.events[role]]
                   for role in ("initiator", "responder")},
        "rng_draws": {k: [[n, b.hex()] for n, b in v] for k, v in run.rng_draws.items()},
    }


def build_aborted(cid: str, description: str, inputs: dict) -> dict:
    """An exchange the responder refuses: INIT, then a signed ABORT (4.7)."""
    run = run_exchange(inputs)
    msgs = decode_messages(run.datagrams)
    if [x["type"] for x in msgs] != ["INIT", "ABORT"]:
        raise SystemExit(f"{cid}: expected INIT and ABORT, got {[x['type'] for x in msgs]}")
    init, abort = (m.decode(H(x["message"])) for x in msgs)
    vec = _common(cid, description, inputs, run, msgs)
    digest = hashlib.sha256(b"qkdgate/1 abort\0" + hashlib.sha256(init.core).digest()
                            + abort.prefix("signature")).digest()
    vec["intermediate"].update({
        "initiator_epoch": init.sender_epoch, "responder_epoch": abort.sender_epoch,
        "exchange_id": init.exchange_id, "init_core_hash": hashlib.sha256(init.core).hexdigest(),
        "abort_prefix_length": len(abort.prefix("signature")), "abort_digest": digest.hex()})
    return vec


def build(cid: str, description: str, inputs: dict) -> dict:
    if inputs.get("outcome") == "aborted":
        return build_aborted(cid, description, inputs)
    run = run_exchange(inputs)
    msgs = decode_messages(run.datagrams)
    by_type = {x["type"]: m.decode(H(x["message"])) for x in msgs}
    init, resp = by_type["INIT"], by_type["RESP"]
    psk = H(inputs["psk"]) if inputs["psk"] else None
    n_i, n_r = inputs["initiator"]["name"], inputs["responder"]["name"]
    th = m.transcript_hash(psk, n_i, n_r, init.core, resp.prefix("tag"))
    ev = next(e for e in run.events["initiator"] if isinstance(e, E.InstallInbound))
    sess, gen = ev.session, ev.generation
    # ML-KEM: the initiator's 64-byte draw is the seed d || z; the provider's
    # 32-byte draw is the encapsulation randomness m
    seed = next(b for n, b in run.rng_draws["initiator"] if n == 64)
    pyca = get_kem(inputs["kem"])
    sk, ek = pyca.keypair_from_seed(SecretBytes(seed))
    if ek != init["kem_public"]:
        raise SystemExit(f"{cid}: the INIT's ML-KEM key is not the one from the 64-byte draw")
    z_kem = pyca.decapsulate(sk, resp["kem_ciphertext"]).reveal()
    m_enc = [b for n, b in run.rng_draws["kem_encaps"] if n == 32]
    x = None
    if inputs["x25519"]:
        def scalar(role: str, public: bytes) -> bytes:
            return next(b for n, b in run.rng_draws[role] if n == 32 and X25519PrivateKey
                        .from_private_bytes(b).public_key().public_bytes_raw() == public)
        xi, xr = scalar("initiator", init["x25519_public"]), scalar("responder",
                                                                   resp["x25519_public"])
        z_x = X25519PrivateKey.from_private_bytes(xi).exchange(
            X25519PrivateKey.from_private_bytes(xr).public_key())
        x = {"initiator_private": xi.hex(), "responder_private": xr.hex(),
             "initiator_public": init["x25519_public"].hex(),
             "responder_public": resp["x25519_public"].hex(), "secret": z_x.hex()}
    key_ids = list(sess.provenance.qkd_key_ids)
    hybrid = HybridInputs(inputs["kem"], SecretBytes(z_kem),
                          SecretBytes(H(x["secret"])) if x else None,
                          SecretBytes(H(inputs["qkd"]["key"])) if inputs["qkd"] else None,
                          tuple(key_ids), th)
    done_th = hashlib.sha256(b"qkdgate/1 done\0" + th).digest()
    esp = []
    for tid, kind in inputs["tunnels"]:
        if kind != "ipsec":
            continue
        for direction, receiver in (("i2r", "responder"), ("r2i", "initiator")):
            spi = inputs[receiver]["spis"][tid]
            esp.append({"tunnel_id": tid, "direction": direction, "spi": spi,
                        "generation": gen,
                        "key": schedule.esp_key(sess, tid, direction, spi, gen).reveal().hex()})
    consumer_keys = [{"tunnel_id": tid, "consumer": kind, "generation": gen,
                      "key": schedule.consumer_key(sess, kind, tid, gen).reveal().hex()}
                     for tid, kind in inputs["tunnels"] if kind in m.CONSUMER_KINDS]
    signatures = []
    for role in ("initiator", "responder"):
        for ctx, msg, sig in run.identities[role].signed:
            signatures.append({"signer": role, "context": ctx.decode(), "message": msg.hex(),
                               "ed25519": sig[:64].hex(), "mldsa": sig[64:].hex()})
    idents = {role: {"public": run.identities[role].public.to_string(),
                     "key_id": run.identities[role].key_id.hex()}
              for role in ("initiator", "responder")}
    return {
        "id": cid, "description": description, "inputs": inputs,
        "identities": idents,
        "messages": msgs,
        "intermediate": {
            "initiator_epoch": init.sender_epoch, "responder_epoch": resp.sender_epoch,
            "exchange_id": init.exchange_id, "generation": gen,
            "mac1_key_to_initiator": m.mac1_key(n_i, psk).hex(),
            "mac1_key_to_responder": m.mac1_key(n_r, psk).hex(),
            "transcript_key": (hashlib.sha256(b"qkdgate/1 psk\0" + psk).digest()
                               if psk else bytes(32)).hex(),
            "resp_prefix_length": len(resp.prefix("tag")),
            "transcript_hash": th.hex(),
            "kem_seed": seed.hex(), "kem_encaps_m": m_enc[0].hex(),
            "kem_secret": z_kem.hex(),
            "x25519": x,
            "qkd_key": inputs["qkd"]["key"] if inputs["qkd"] else None,
            "combiner_key_ids": key_ids,
            "root_label": sess.root_label, "fixed_info": fixed_info(hybrid).hex(),
            "session_secret": sess.secret.reveal().hex(), "session_id": sess.session_id.hex(),
            "tag_responder": schedule.confirmation_tag(sess, "responder", th).hex(),
            "tag_initiator": schedule.confirmation_tag(sess, "initiator", th).hex(),
            "done_hash": done_th.hex(),
            "tag_done": schedule.confirmation_tag(sess, "responder", done_th).hex(),
            "esp": esp,
            **({"consumer_keys": consumer_keys} if consumer_keys else {}),
        },
        "signatures": signatures,
        "events": {role: [type(e).__name__ for e in run.events[role]]
                   for role in ("initiator", "responder")},
        "rng_draws": {k: [[n, b.hex()] for n, b in v] for k, v in run.rng_draws.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="replay the files, write nothing")
    ap.add_argument("cases", nargs="*", help="case ids (default: all)")
    args = ap.parse_args()
    names = args.cases or list(CASES)
    bad = 0
    for cid in names:
        path = VECTORS / f"{cid}.json"
        if args.check:
            from test_protocol_vectors import replay_mismatches
            problems = replay_mismatches(json.loads(path.read_text()))
            print(f"{cid}: {problems if problems else 'replays byte for byte'}")
            bad += bool(problems)
            continue
        desc, inputs = CASES[cid]
        vec = build(cid, desc, inputs)
        vec = {"description": "qkdgate/1 protocol transcript vector (docs/protocol.md "
                              "appendix A); generated by tools/make_protocol_vectors.py", **vec}
        path.write_text(json.dumps(vec, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)} ({len(vec['messages'])} messages, "
              f"{sum(len(x['datagrams']) for x in vec['messages'])} datagrams)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
