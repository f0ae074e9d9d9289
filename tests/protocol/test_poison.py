"""A bug poisons the session (h11 ``_connection.py`` style): secrets wiped,
``SessionFailed`` now and on every later call; peer garbage never does."""

from __future__ import annotations

import dataclasses

import pytest
from protocol_harness import make_pair

from qkdgate.errors import ConfigError, LocalProtocolError, SessionFailed
from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import handshake as H
from qkdgate.gateway.protocol.dos import TokenBucket
from qkdgate.gateway.protocol.exchange import (
    MESSAGE_STATES,
    TERMINAL,
    TRANSITIONS,
    Exchange,
    ExchangeState,
)


def _assert_poisoned(session, now: float) -> None:
    assert session.failed and session.snapshot(now)["failed"]
    for call in (lambda: session.receive_datagram(b"\x00" * 40, now),
                 lambda: session.handle_timer(now), session.get_timer,
                 lambda: session.datagrams_to_send(now), session.next_event,
                 lambda: session.initiate_rekey(now, "operator"),
                 lambda: session.installed(1, now),
                 lambda: session.reconfigure(session.config, session.peer_identities, now)):
        with pytest.raises(SessionFailed, match="failed earlier"):
            call()


def test_allocate_spi_returning_garbage_poisons_the_session():
    p = make_pair(qkd=None)
    p.a.session._allocate_spi = lambda tid: -5          # the driver's bug
    with pytest.raises(SessionFailed) as info:
        p.a.session.handle_timer(p.now)                  # the start rekey runs
    assert isinstance(info.value.__cause__, LocalProtocolError)
    assert "allocate_spi returned -5" in str(info.value.__cause__)
    assert p.a.session._ini is None and p.a.session._out == []   # nothing half-sent
    _assert_poisoned(p.a.session, p.now)


def test_exception_in_the_middle_of_an_exchange_wipes_secrets_and_poisons(monkeypatch):
    p = make_pair(qkd=None)
    p.a.auto_answer = False
    p.advance(p.now + 0.1)                   # A holds its InstallInbound unanswered
    ev = p.a.held[0]
    assert isinstance(ev, E.InstallInbound)
    ex = p.a.session._ini
    secret = ex.session

    def broken(*args):
        raise RuntimeError("bug in the tag code")
    monkeypatch.setattr(H, "tag", broken)
    with pytest.raises(SessionFailed) as info:
        p.a.session.installed(ev.request_id, p.now)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "bug in the tag code" not in str(info.value)  # foreign text is not quoted
    assert ex.state is ExchangeState.FAILED and ex.session is None
    assert secret.secret.reveal() == b""                  # wiped, not merely dropped
    _assert_poisoned(p.a.session, p.now)
    # the peer is unaffected: it simply never hears from A again
    p.b.session.handle_timer(p.now)


def test_peer_garbage_does_not_poison():
    p = make_pair(qkd=None)
    for junk in (b"", b"QG" + bytes(40), bytes(range(256)) * 4):
        p.b.session.receive_datagram(junk, p.now)
    assert not p.b.session.failed
    p.roundtrip_until_done()


def test_bad_reload_is_refused_without_poisoning():
    p = make_pair(qkd=None)
    p.roundtrip_until_done()
    bad = dataclasses.replace(p.a.session.config, kem="Kyber512")
    with pytest.raises(ConfigError):
        p.a.session.reconfigure(bad, p.a.session.peer_identities, p.now)
    assert not p.a.session.failed
    p.a.session.initiate_rekey(p.now, "operator")
    p.roundtrip_until_done()


def test_illegal_transition_is_a_bug():
    p = make_pair(qkd=None)
    ex = Exchange("initiator", 1, p.now, p.now + 30, "test", TokenBucket(1, 1, p.now))
    with pytest.raises(LocalProtocolError, match="illegal transition"):
        p.a.session._transition(ex, ExchangeState.R_RESP_SENT)
    with pytest.raises(LocalProtocolError, match="illegal transition"):
        p.a.session._transition(ex, ExchangeState.ESTABLISHED)


def test_transition_table_is_complete():
    live = [s for s in ExchangeState if s not in TERMINAL]
    for role in ("initiator", "responder"):
        reachable = {ExchangeState.NEW}
        for _ in range(len(ExchangeState)):
            for s in list(reachable):
                reachable |= TRANSITIONS.get((role, s), frozenset())
        assert ExchangeState.ESTABLISHED in reachable
        for s in reachable - TERMINAL:
            nxt = TRANSITIONS[(role, s)]
            assert {ExchangeState.FAILED, ExchangeState.DROPPED} <= nxt, (role, s)
    assert all(s in live for states in MESSAGE_STATES.values() for s in states)
    for terminal in TERMINAL:
        assert not any(k[1] is terminal for k in TRANSITIONS)


def test_allocate_spis_is_asked_once_per_exchange_for_every_tunnel():
    """With the batched callback (issue 19) each side asks once for all of
    its tunnels' SPIs, never tunnel by tunnel, and the keys still match."""
    from protocol_harness import assert_keys_match
    p = make_pair(qkd=None)
    calls = {"gw-a": [], "gw-b": []}
    for gw in (p.a, p.b):
        real = gw.session._allocate_spi
        gw.session._allocate_spi = lambda tid: pytest.fail("asked tunnel by tunnel")
        gw.session._allocate_spis = (lambda tids, real=real, name=gw.name:
                                     calls[name].append(list(tids)) or {t: real(t) for t in tids})
    p.roundtrip_until_done()
    kinds = list(p.a.session._kinds)
    assert calls == {"gw-a": [kinds], "gw-b": [kinds]}
    assert_keys_match(p, 1)


def test_allocate_spis_leaving_a_tunnel_out_poisons_the_session():
    p = make_pair(qkd=None)
    real = p.a.session._allocate_spi
    p.a.session._allocate_spis = lambda tids: {t: real(t) for t in list(tids)[1:]}
    with pytest.raises(SessionFailed) as info:
        p.a.session.handle_timer(p.now)
    assert "allocate_spis answered for" in str(info.value.__cause__)
    assert p.a.session._ini is None and p.a.session._out == []
    _assert_poisoned(p.a.session, p.now)
