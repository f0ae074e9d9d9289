"""Desync after restart, and the cheap checks that guard expensive work."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from protocol_harness import Gateway, assert_keys_match, identity, make_pair, seeded
from test_network import group

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.config import SessionConfig
from qkdgate.gateway.protocol.fragment import HEADER, fragment
from qkdgate.gateway.protocol.session import PeerSession


def restart(p, gw: Gateway, seed: int, floor: int = 0, *, epoch: int | None = None,
            peer_floor: int = 0, start: bool = True) -> None:
    """Replace a gateway's session by a fresh one: all protocol state lost
    except what the daemon's journal keeps (generation floor, the local epoch
    counter, the highest epoch authenticated from the peer)."""
    old = gw.session
    cfg = dataclasses.replace(old.config, generation_floor=floor, initiate_on_start=start)
    gw.session = PeerSession(cfg, identity=old.identity, peer_identities=old.peer_identities,
                             rng=seeded(seed), now=p.now, allocate_spi=old._allocate_spi,
                             epoch=old.epoch + 1 if epoch is None else epoch,
                             peer_epoch_floor=peer_floor)
    gw.events.clear()


@pytest.mark.parametrize("who", ["initiator", "responder"])
@pytest.mark.parametrize("floor", [0, 1])
def test_restart_reconverges_and_generations_never_repeat(who, floor):
    p = make_pair(rekey_interval=3600.0)
    p.roundtrip_until_done()
    gw = p.a if who == "initiator" else p.b
    restart(p, gw, seed=99, floor=floor)
    p.roundtrip_until_done()
    other = p.other(gw)
    assert len(other.of(E.PeerRestarted)) == 1
    gen = gw.session.generation
    assert gen == other.session.generation == 2      # never reuses generation 1
    assert_keys_match(p, gen)


def test_restart_while_peer_is_mid_exchange():
    p = make_pair(rekey_interval=3600.0)
    p.roundtrip_until_done()
    p.b.session.initiate_rekey(p.now, "operator")
    p.b.pump(p.now)
    p.b.session.datagrams_to_send(p.now)        # B's INIT is lost ...
    restart(p, p.a, seed=77)                     # ... and A restarts
    p.roundtrip_until_done()
    p.advance(p.now + 60)
    assert p.a.session.generation == p.b.session.generation >= 2
    assert_keys_match(p, p.a.session.generation)


def test_old_epoch_replay_after_restart_is_refused():
    p = make_pair(rekey_interval=3600.0)
    p.roundtrip_until_done()
    old_log = list(p.log)
    restart(p, p.a, seed=55)
    p.roundtrip_until_done()
    before = dict(p.b.session.stats)
    for src, d in old_log:                       # A's messages from its dead epoch
        if src == "gw-a":
            p.b.session.receive_datagram(d, p.now)
    assert p.b.session.stats["stale"] > before.get("stale", 0)
    assert p.b.session.stats["kem_encaps"] == before["kem_encaps"]
    assert p.b.session.stats["verify_ed25519"] == before["verify_ed25519"]


def _flood_init(sender_identity, receiver_name: str, n: int, epoch0: int = 1000,
                kem_pk: bytes | None = None):
    """Well-formed INITs with a valid mac1 (no PSK: the names are public)."""
    from qkdgate.keymix.kem import get_kem
    if kem_pk is None:
        _, kem_pk = get_kem("ML-KEM-768").generate_keypair()
    out = []
    for i in range(n):
        values = {"generation_min": 1, "nonce": bytes([i % 256]) * 32, "kem_id": 1,
                  "kem_public": kem_pk, "x25519_public": b"\x09" + bytes(31),
                  "qkd_mode": m.QkdMode.NONE, "qkd_reason": 0, "qkd_flags": 0,
                  "key_ids": (), "spis": (("t1", "ipsec", 0x1000 + i), ("m1", "macsec", 0)),
                  "signer_id": sender_identity.key_id}
        prefix = m.encode_core(m.MsgType.INIT, epoch0 + i, 0, 1, values, stop="ed25519_sig")
        values["ed25519_sig"] = sender_identity.sign_ed25519(prefix, b"INIT")
        core = prefix + m.encode_fields(m.MsgType.INIT, values, "ed25519_sig")
        out.extend(fragment(m.seal(core, m.mac1_key(receiver_name, None)), i))
    return out


def test_init_flood_from_unpinned_sender_costs_no_expensive_crypto():
    p = make_pair(qkd=None, start="none", rate_burst=4, rate_per_second=1.0)
    mallory = identity("mallory")
    for d in _flood_init(mallory, "gw-b", 50):
        p.b.session.receive_datagram(d, p.now)
    st = p.b.session.stats
    assert st["kem_encaps"] == st["sign_hybrid"] == st["verify_hybrid"] == 0
    assert st["verify_ed25519"] == 0            # signer id not pinned: not even Ed25519
    assert st["rate_limited"] == 46 and st["cookie_sent"] == 46
    assert st["violation_auth"] == 4
    assert not p.b.of(E.SessionEstablished)
    # violation events are rate limited too, counters are exact
    assert len(p.b.of(E.ProtocolViolation)) <= 2
    p.b.pump(p.now)
    # the genuine peer still gets through: its INIT is answered with a cookie,
    # it echoes it, and the cookie path has its own budget
    p.a.session.initiate_rekey(p.now, "operator")
    p.roundtrip_until_done()
    assert p.a.session.stats["cookie_received"] == 1
    assert_keys_match(p, 1)


def test_forged_ed25519_under_a_pinned_key_id_stops_at_the_cheap_check():
    p = make_pair(qkd=None, start="none", rate_burst=100)
    mallory = identity("mallory")
    real_a = identity("gw-a")
    fake = dataclasses.make_dataclass("Fake", ["key_id", "sign_ed25519"])(
        real_a.key_id, mallory.sign_ed25519)
    for d in _flood_init(fake, "gw-b", 20):
        p.b.session.receive_datagram(d, p.now)
    st = p.b.session.stats
    assert st["verify_ed25519"] == 20 and st["violation_auth"] == 20
    assert st["kem_encaps"] == st["sign_hybrid"] == st["verify_hybrid"] == 0


def test_with_psk_a_flood_without_it_stops_at_mac1():
    p = make_pair(qkd=None, start="none", psk_a=b"p" * 32, psk_b=b"p" * 32)
    for d in _flood_init(identity("gw-a"), "gw-b", 20):   # even with A's real key
        p.b.session.receive_datagram(d, p.now)
    st = p.b.session.stats
    assert st["violation_mac1"] == 20
    assert st["verify_ed25519"] == st["kem_encaps"] == 0


def test_config_validation():
    from qkdgate.errors import ConfigError
    base = dict(local_name="a", peer_name="b")
    for bad in [dict(peer_name="a"), dict(kem="Kyber512"), dict(qkd_role="boss"),
                dict(qkd_role="master"), dict(rekey_interval=0.1), dict(rate_burst=0),
                dict(psk=__import__("qkdgate.keymix.secret", fromlist=["x"]).SecretBytes(b"x")),
                dict(rekey_jitter=0.7)]:
        with pytest.raises(ConfigError):
            SessionConfig(**{**base, **bad}).validate()
    SessionConfig(**base).validate()


def test_signed_init_with_invalid_kem_key_is_dropped_and_leaves_no_state():
    """Even from the pinned peer: an ML-KEM key failing the FIPS 203 modulus
    check is a violation, costs no KME key and leaves no half exchange."""
    p = make_pair(start="none")
    for d in _flood_init(identity("gw-a"), "gw-b", 1, kem_pk=b"\xff" * 1184):
        p.b.session.receive_datagram(d, p.now)
    p.b.pump(p.now)
    st = p.b.session.stats
    assert st["violation_malformed"] == 1 and st["verify_ed25519"] == 1
    assert not p.b.of(E.NeedQkdKeys)
    assert p.b.session._res is None and p.b.session.snapshot(p.now)["exchange"] is None
    p.a.session.initiate_rekey(p.now, "operator")     # and the real peer still works
    p.roundtrip_until_done()
    assert_keys_match(p, p.a.session.generation)


def test_replayed_init_is_not_amplified_into_resps():
    p = make_pair(start="none")
    p.a.session.initiate_rekey(p.now, "operator")
    p.a.pump(p.now)
    init = p.a.session.datagrams_to_send(p.now)
    for d in init:
        p.b.session.receive_datagram(d, p.now)
    p.b.pump(p.now)
    first = p.b.session.datagrams_to_send(p.now)
    assert first
    for _ in range(50):                          # replayed at the same instant
        for d in init:
            p.b.session.receive_datagram(d, p.now)
    assert p.b.session.datagrams_to_send(p.now) == []
    assert p.b.session.stats["duplicate"] == 50
    p.now += 1.0                                 # a genuine retransmission later
    for d in init:
        p.b.session.receive_datagram(d, p.now)
    assert len(p.b.session.datagrams_to_send(p.now)) == len(first)


# ---------------------------------------------------------------- issue 17 finding 3
# Epochs are persisted counters (the daemon's journal): a restart only ever
# raises a gateway's epoch, and the highest epoch authenticated from the peer
# comes back as ``peer_epoch_floor``. Replays recorded before a restart must
# cost nothing and disturb nothing.


def _inits(log, src: str) -> list[list[bytes]]:
    """The INITs ``src`` sent, each as its list of datagrams."""
    return [ds for t, ds in group([d for s, d in log if s == src]) if t == m.MsgType.INIT]


def _work(st) -> dict[str, int]:
    return {k: st[k] for k in ("kem_encaps", "sign_hybrid", "verify_ed25519", "verify_hybrid")}


def _feed(gw: Gateway, datagrams: list[bytes], now: float) -> None:
    for d in datagrams:
        gw.session.receive_datagram(d, now)


def _both_restarted(p, rekeys_before: int = 1):
    """A runs ``rekeys_before`` exchanges (recorded), restarts with a higher
    epoch and re-keys with B (B authenticates A's new epoch); then B restarts
    with A's new epoch as its floor, as the journal would give it, and starts
    its own exchange. Returns A's INITs recorded from its old epoch."""
    for _ in range(rekeys_before):
        p.a.session.initiate_rekey(p.now, "operator")
        p.roundtrip_until_done()
    old = _inits(p.log, "gw-a")
    restart(p, p.a, seed=55, epoch=p.a.session.epoch + 1,
            peer_floor=p.b.session.epoch, start=False)
    p.a.session.initiate_rekey(p.now, "operator")
    p.roundtrip_until_done()
    assert p.b.of(E.PeerEpochAuthenticated)[-1].epoch == p.a.session.epoch
    restart(p, p.b, seed=66, epoch=p.b.session.epoch + 1, peer_floor=p.a.session.epoch)
    return old


@pytest.mark.parametrize("step", ["init-sent", "confirm-sent"])
def test_init_from_an_epoch_below_the_floor_costs_nothing_and_disturbs_nothing(step):
    """B (QKD master, so a processed INIT would also cost a KME key) restarted;
    one of A's INITs from before A's own last restart is replayed from a
    spoofed address while B's own exchange runs."""
    p = make_pair(qkd="b-master", rekey_interval=3600.0)
    old = _both_restarted(p)
    b = p.b
    b.session.handle_timer(p.now)          # B's start exchange
    b.pump(p.now)
    if step == "confirm-sent":            # RESP authenticated, CONFIRM out
        _feed(p.a, b.session.datagrams_to_send(p.now), p.now)
        p.a.pump(p.now)
        _feed(b, p.a.session.datagrams_to_send(p.now), p.now)
        b.pump(p.now)
    state = b.session._ini.state
    b.session.datagrams_to_send(p.now)
    before, qkd_before = _work(b.session.stats), len(b.of(E.NeedQkdKeys))
    for ds in old:
        _feed(b, ds, p.now)
    b.pump(p.now)
    assert _work(b.session.stats) == before            # not even Ed25519
    assert len(b.of(E.NeedQkdKeys)) == qkd_before      # no KME key spent
    assert b.session.stats["stale_epoch"] == len(old)
    assert b.session._ini is not None and b.session._ini.state == state
    assert not b.of(E.RekeyFailed)
    p.roundtrip_until_done()
    assert_keys_match(p, b.session.generation)


def test_unauthenticated_epoch_never_preempts_an_in_flight_responder_exchange():
    """B restarted (floor = A's epoch, A did not restart): an INIT of A's
    from before B's restart is replayed while A's genuine exchange with B is
    in flight. B has not authenticated A's epoch yet in this run, so the
    replay must not replace the genuine exchange."""
    p = make_pair(qkd=None, rekey_interval=3600.0)
    p.roundtrip_until_done()
    old = _inits(p.log, "gw-a")
    restart(p, p.b, seed=66, epoch=p.b.session.epoch + 1, peer_floor=p.a.session.epoch,
            start=False)
    a, b = p.a, p.b
    a.session.initiate_rekey(p.now, "operator")
    a.pump(p.now)
    _feed(b, a.session.datagrams_to_send(p.now), p.now)
    b.pump(p.now)
    assert b.session._res is not None
    res, before = b.session._res, _work(b.session.stats)
    for ds in old:
        _feed(b, ds, p.now)
    assert b.session._res is res                       # the genuine one stays
    assert b.session.stats["kem_encaps"] == before["kem_encaps"]
    p.roundtrip_until_done()
    assert a.session.generation == b.session.generation
    assert_keys_match(p, a.session.generation)
    assert not a.of(E.RekeyFailed) and not b.of(E.RekeyFailed)


def test_unauthenticated_epoch_never_wins_a_collision():
    """B restarted and is sending its own INIT; every INIT A sent before
    B's restart is replayed (at least one has the larger nonce). B keeps its
    exchange: a replay never wins."""
    p = make_pair(qkd=None, rekey_interval=3600.0)
    for _ in range(6):
        p.a.session.initiate_rekey(p.now, "operator")
        p.roundtrip_until_done()
    old = _inits(p.log, "gw-a")
    restart(p, p.b, seed=67, epoch=p.b.session.epoch + 1, peer_floor=p.a.session.epoch)
    b = p.b
    b.session.handle_timer(p.now)
    b.pump(p.now)
    ini = b.session._ini
    assert any(m.decode(b"".join(d[HEADER.size:] for d in ds))["nonce"] > ini.nonce_i for ds in old)
    for ds in old:
        _feed(b, ds, p.now)
    b.pump(p.now)
    assert b.session._ini is ini and b.session.stats["collision_lost"] == 0
    assert b.session.stats["kem_encaps"] == 0 and not b.of(E.RekeyFailed)
    p.roundtrip_until_done()
    assert_keys_match(p, b.session.generation)


def test_a_lost_collision_always_leaves_a_retry_armed():
    """A real collision (both authenticated) that we lose, then a partition:
    the winner's exchange dies at its timeout at our side too. Our own rekey
    must still be scheduled, not left unset until the peer completes one."""
    p = make_pair(qkd=None, rekey_interval=3600.0, exchange_timeout=10.0)
    p.roundtrip_until_done()
    for gw in (p.a, p.b):
        gw.session.initiate_rekey(p.now, "operator")
        gw.pump(p.now)
    cut = {"on": False}
    p.network = lambda src, ds: [] if cut["on"] else ds
    p.step()                                    # INITs cross: one side loses
    cut["on"] = True
    loser = p.a if p.a.session.stats["collision_lost"] else p.b
    assert loser.session.stats["collision_lost"] == 1
    p.advance(p.now + 10.5)                      # the winner's exchange times out at the loser
    assert loser.session._res is None
    # the loser's own rekey was retried (its timer fired once the exchange ended)
    assert loser.session._ini is not None and loser.session._ini.reason == "retry"
    cut["on"] = False
    p.roundtrip_until_done(timeout=120)


def test_peer_epoch_authenticated_is_reported_once_per_higher_epoch():
    p = make_pair(qkd=None, rekey_interval=3600.0)
    p.roundtrip_until_done()
    assert [e.epoch for e in p.b.of(E.PeerEpochAuthenticated)] == [p.a.session.epoch]
    p.a.session.initiate_rekey(p.now, "operator")
    p.roundtrip_until_done()
    assert len(p.b.of(E.PeerEpochAuthenticated)) == 1     # same epoch: not again
    # a restarted B whose floor already holds A's epoch reports nothing new
    restart(p, p.b, seed=66, epoch=p.b.session.epoch + 1, peer_floor=p.a.session.epoch)
    p.roundtrip_until_done()
    assert not p.b.of(E.PeerEpochAuthenticated) and not p.b.of(E.PeerRestarted)
    assert [e.epoch for e in p.a.of(E.PeerEpochAuthenticated)][-1] == p.b.session.epoch


@pytest.mark.parametrize("peer_nonce_higher", [True, False])
def test_a_restarted_gateway_wins_the_collision_with_an_init_to_its_old_epoch(peer_nonce_higher):
    """B's rekey INIT went to A's old incarnation (lost: A was down). A
    restarts, knows B's epoch only from its journal, so it defers B's INIT
    (10); its own INIT names B by that epoch (4.1). B sees that and loses
    the collision whatever the nonces: keyed at once, no timer. Before,
    when B's nonce was the larger, B dropped A's INIT, A dropped B's, and
    both waited out B's exchange timeout (30 s; issue 10, test_systemd)."""
    p = make_pair(qkd=None, rekey_interval=3600.0)
    p.roundtrip_until_done()
    b = p.b
    b.session.initiate_rekey(p.now, "operator")
    b.pump(p.now)
    b_init = b.session.datagrams_to_send(p.now)            # lost: A is down
    b_nonce, b_epoch = b.session._ini.nonce_i, b.session.epoch
    for seed in range(200, 300):                           # A's nonce on the chosen side
        restart(p, p.a, seed=seed, epoch=p.a.session.epoch + 1, peer_floor=b_epoch)
        p.a.session.handle_timer(p.now)
        p.a.pump(p.now)
        if (p.a.session._ini.nonce_i < b_nonce) == peer_nonce_higher:
            break
    else:
        pytest.fail("no seed gave A's nonce on the wanted side of B's")
    a_init = p.a.session.datagrams_to_send(p.now)
    init = m.decode(b"".join(d[HEADER.size:] for d in a_init))
    assert init.receiver_epoch == b_epoch                   # named by the journal's floor
    _feed(b, a_init, p.now)
    _feed(p.a, b_init, p.now)                               # B's INIT crosses it
    t0 = p.now
    p.roundtrip_until_done()
    assert p.now == t0                                      # no timer was needed
    assert b.session.stats["collision_lost"] == 1 and b.session.stats["collision_won"] == 0
    assert p.a.session.stats["init_unauthenticated_deferred"] >= 1
    assert not p.a.of(E.RekeyFailed)
    assert p.a.of(E.SessionEstablished)[-1].role == "initiator"
    assert_keys_match(p, p.a.session.generation)


@settings(max_examples=400, deadline=None)
@given(ea=st.integers(1, 4), eb=st.integers(1, 4), name_a=st.integers(0, 4),
       name_b=st.integers(0, 4), nonce_a=st.binary(min_size=32, max_size=32),
       nonce_b=st.binary(min_size=32, max_size=32))
def test_both_sides_of_a_collision_pick_the_same_winner(ea, eb, name_a, name_b,
                                                         nonce_a, nonce_b):
    """Whatever epochs each INIT names (current, old, floor, 0), A's verdict
    on B's INIT and B's on A's agree: exactly one exchange proceeds."""
    assume(nonce_a != nonce_b)

    def verdict(own_epoch, own_name, own_nonce, their_epoch, their_name, their_nonce):
        me = SimpleNamespace(epoch=own_epoch)
        ini = SimpleNamespace(peer_epoch=own_name, nonce_i=own_nonce)
        msg = _Init(their_epoch, their_name, their_nonce)
        return PeerSession._ours_wins(me, ini, msg)   # type: ignore[arg-type]

    a_wins = verdict(ea, name_a, nonce_a, eb, name_b, nonce_b)
    b_wins = verdict(eb, name_b, nonce_b, ea, name_a, nonce_a)
    assert a_wins != b_wins


class _Init:
    def __init__(self, sender_epoch: int, receiver_epoch: int, nonce: bytes) -> None:
        self.sender_epoch, self.receiver_epoch, self._nonce = sender_epoch, receiver_epoch, nonce

    def __getitem__(self, key: str) -> bytes:
        assert key == "nonce"
        return self._nonce
