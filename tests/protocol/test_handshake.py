"""The exchange, step by step: what each side installs after each message."""

from __future__ import annotations

import pytest
from protocol_harness import assert_keys_match, identity, make_pair

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol.fragment import MAX_DATAGRAM, Reassembler
from qkdgate.gateway.protocol.messages import MsgType, decode


def messages_of(datagrams: list[bytes]) -> list:
    r = Reassembler()
    out = []
    for d in datagrams:
        raw = r.feed(d, 0.0)
        if raw is not None:
            out.append(decode(raw))
    return out


def test_handshake_establishes_matching_keys_with_provenance():
    p = make_pair()
    p.roundtrip_until_done()
    a_est, b_est = p.a.of(E.SessionEstablished)[0], p.b.of(E.SessionEstablished)[0]
    assert a_est.generation == b_est.generation == 1
    assert (a_est.role, b_est.role) == ("initiator", "responder")
    prov = a_est.provenance
    assert prov == b_est.provenance
    assert prov.kem_name == "ML-KEM-768" and prov.x25519 and len(prov.qkd_key_ids) == 1
    assert_keys_match(p, 1)
    assert p.a.current_out == p.b.current_out == 1
    # the QKD key was consumed on both sides, exactly once
    assert p.a.link.issued == {} and p.a.link.delivered == 1
    # every datagram fits the bound, and the big messages really were fragmented
    assert all(len(d) <= MAX_DATAGRAM for _, d in p.log)
    assert len(p.log) > 4


def test_step_by_step_make_before_break_order():
    """strongSwan-style: deliver one message at a time and assert which SAs
    each side holds. Nobody installs before authenticating the other, and
    each outbound switch follows the peer's inbound install."""
    p = make_pair()
    a, b = p.a, p.b
    a.session.handle_timer(p.now)
    a.pump(p.now)                                   # NeedQkdKeys answered -> INIT
    init = a.session.datagrams_to_send(p.now)
    assert [m.type for m in messages_of(init)] == [MsgType.INIT]
    for d in init:
        b.session.receive_datagram(d, p.now)
    b.pump(p.now)                                   # slave fetch -> RESP
    assert b.inbound == {} and b.outbound == {}     # R installs nothing before CONFIRM
    resp = b.session.datagrams_to_send(p.now)
    assert [m.type for m in messages_of(resp)] == [MsgType.RESP]
    for d in resp:
        a.session.receive_datagram(d, p.now)
    a.pump(p.now)
    assert list(a.inbound) == [1] and a.outbound == {}   # I: inbound only
    confirm = a.session.datagrams_to_send(p.now)
    assert [m.type for m in messages_of(confirm)] == [MsgType.CONFIRM]
    for d in confirm:
        b.session.receive_datagram(d, p.now)
    b.pump(p.now)
    assert list(b.inbound) == [1] and list(b.outbound) == [1]   # a's inbound exists
    done = b.session.datagrams_to_send(p.now)
    assert [m.type for m in messages_of(done)] == [MsgType.DONE]
    assert a.outbound == {}                          # not before DONE
    for d in done:
        a.session.receive_datagram(d, p.now)
    a.pump(p.now)
    assert list(a.outbound) == [1]
    assert_keys_match(p, 1)
    order = [(n, type(e).__name__) for n, e in p.trace
             if isinstance(e, (E.InstallInbound, E.InstallOutbound))]
    assert order == [("gw-a", "InstallInbound"), ("gw-b", "InstallInbound"),
                     ("gw-b", "InstallOutbound"), ("gw-a", "InstallOutbound")]
    assert a.session.get_timer() is not None    # the next rekey is scheduled


@pytest.mark.parametrize("qkd", [None, "a-master", "b-master"])
def test_qkd_roles(qkd):
    p = make_pair(qkd=qkd)
    p.roundtrip_until_done()
    prov = p.a.of(E.SessionEstablished)[0].provenance
    assert prov.qkd == (qkd is not None)
    assert_keys_match(p, 1)
    if qkd == "b-master":   # the responder fetched new keys, the initiator by ID
        assert p.b.link.delivered == 1 and p.b.link.issued == {}


def test_cnsa2_profile_ml_kem_1024_ml_dsa_87():
    ida, idb = identity("gw-a", profile="cnsa2"), identity("gw-b", profile="cnsa2")
    p = make_pair(kem="ML-KEM-1024", id_a=ida, id_b=idb)
    p.roundtrip_until_done()
    assert p.a.of(E.SessionEstablished)[0].provenance.kem_name == "ML-KEM-1024"
    assert_keys_match(p, 1)


def test_psk_both_sides():
    p = make_pair(psk_a=b"k" * 32, psk_b=b"k" * 32)
    p.roundtrip_until_done()
    assert_keys_match(p, 1)


def test_suite_mismatch_is_refused_with_a_reason():
    p = make_pair(qkd=None)
    import dataclasses
    cfg = dataclasses.replace(p.b.session.config, x25519=False)
    p.b.session.config = cfg
    p.advance(p.now + 5)
    fails = p.b.of(E.RekeyFailed)
    assert fails and "suite differs" in fails[0].reason
    a_fail = p.a.of(E.RekeyFailed)
    assert a_fail and "SUITE_MISMATCH" in a_fail[0].reason
    assert p.a.inbound == {} and p.b.inbound == {}


def test_tunnel_set_mismatch_refused():
    p = make_pair(qkd=None)
    p.b.session._kinds = {"t1": "ipsec"}
    p.advance(p.now + 5)
    assert "tunnel set differs" in p.b.of(E.RekeyFailed)[0].reason
    assert p.a.of(E.RekeyFailed) and not p.a.of(E.SessionEstablished)


def test_session_events_never_print_secrets():
    p = make_pair()
    p.roundtrip_until_done()
    secret = p.a.of(E.InstallInbound)[0].session.secret.reveal()
    for _, ev in p.trace:
        text = repr(ev)
        assert secret.hex() not in text and repr(secret) not in text


def test_snapshot_reports_state_without_secrets():
    import json
    p = make_pair()
    p.roundtrip_until_done()
    snap = p.a.session.snapshot(p.now + 3)
    json.dumps(snap)
    assert snap["generation"] == 1 and snap["established_age"] == 3
    assert snap["inputs"]["kem"] == "ML-KEM-768" and len(snap["inputs"]["qkd_key_ids"]) == 1
    assert snap["exchange"] is None and snap["next_rekey_in"] > 0
    assert snap["peer_epoch"] == f"{p.b.session.epoch:016x}"
    secret = p.a.of(E.InstallInbound)[0].session.secret.reveal().hex()
    assert secret not in json.dumps(snap)


def test_reconfigure_rolls_pins_and_rejects_bad_reloads():
    import dataclasses

    from qkdgate.errors import ConfigError
    new_a = identity("gw-a", 1)
    p = make_pair()
    p.roundtrip_until_done()
    sb = p.b.session
    # bad reloads change nothing
    with pytest.raises(ConfigError):
        sb.reconfigure(dataclasses.replace(sb.config, peer_name="gw-x"), sb.peer_identities, p.now)
    with pytest.raises(ConfigError):
        sb.reconfigure(dataclasses.replace(sb.config, kem="nope"), sb.peer_identities, p.now)
    assert sb.generation == 1
    # step 1 of a rollover: B pins A's old and new identity
    sb.reconfigure(sb.config, [identity("gw-a").public, new_a.public], p.now)
    # A restarts with its new identity; B's protocol state survived the reload
    from test_restart_dos import restart
    p.a.session.identity = new_a
    restart(p, p.a, seed=5, floor=1)
    p.roundtrip_until_done()
    assert p.a.session.generation == p.b.session.generation == 2
    assert_keys_match(p, 2)
    # shorter rekey interval takes effect on the running generation
    sb.reconfigure(dataclasses.replace(sb.config, rekey_interval=5.0),
                   [new_a.public], p.now)
    p.roundtrip_until_done(timeout=10)
    assert p.b.session.generation == 3


def test_deterministic_at_the_event_level():
    """Same seeds, same scenario: the same events in the same order, with the
    same generations, SPIs, key_IDs and timings (only pyca's own randomness in
    ML-KEM / ML-DSA / X25519 differs, so secrets and signatures do)."""
    from test_network import drop_first

    from qkdgate.gateway.protocol.messages import MsgType

    def run():
        p = make_pair(seed=42, start="both", rekey_interval=30.0)
        p.network = drop_first(MsgType.RESP)
        p.roundtrip_until_done()
        p.roundtrip_until_done()
        out = []
        for name, ev in p.trace:
            fields = {k: getattr(ev, k) for k in ev.__dataclass_fields__ if k != "session"}
            out.append((name, type(ev).__name__, repr(fields)))
        return out, p.now, [len(d) for _, d in p.log]
    first, second = run(), run()
    assert first == second
    assert len(first[0]) > 10
