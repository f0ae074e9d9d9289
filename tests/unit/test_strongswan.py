"""The strongSwan consumer against an in-memory pair of charons (the vici
semantics it relies on: PPKs by id, ppk_required, unique ids, terminate),
the swanctl.conf reader, and the vici message it builds."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from qkdgate.errors import ConfigError, TunnelError
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.fakes import RecordingIpsecBackend
from qkdgate.tunnels.consumer import ConsumerKey, Invalidation, ThreadedConsumer
from qkdgate.tunnels.events import KeyInputs
from qkdgate.tunnels.strongswan import StrongswanConsumer, StrongswanSpec, failsafe
from qkdgate.tunnels.strongswan_conf import parse
from qkdgate.tunnels.strongswan_vici import (
    ChildSaInfo,
    ConnSpec,
    IkeSaInfo,
    Ppk,
    ViciAuthFailed,
    ViciError,
)

SWANCTL = (Path(__file__).resolve().parent.parent / "fixtures" / "swanctl-operator.conf").read_text()


class FakeCharon:
    """One charon as seen over vici; ``peer`` is the other gateway's."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: dict[str, bytes] = {}
        self.conn_ppk: str | None = None
        self.sas: dict[int, IkeSaInfo] = {}
        self.next_id = 1
        self.peer: FakeCharon | None = None
        self.up = True
        self.armed = True            # swanctl --load-all installed the trap
        self.reuse = False           # charon.reuse_ikesa = yes (its default)
        self.calls: list[str] = []

    def _check(self) -> None:
        if not self.up:
            raise ViciError("connect", "/run/charon.vici", errno.ECONNREFUSED)

    def load_ppk(self, ppk: Ppk) -> None:
        self._check()
        self.calls.append(f"load-shared {ppk.ppk_id}")
        self.keys[ppk.ppk_id] = ppk.key.reveal()

    def unload_shared(self, key_id: str) -> None:
        self._check()
        self.calls.append(f"unload-shared {key_id}")
        if key_id not in self.keys:
            raise ViciError("unload-shared", "not found")
        del self.keys[key_id]

    def shared_ids(self) -> frozenset[str]:
        self._check()
        return frozenset(self.keys)

    def load_conn(self, conn: ConnSpec) -> None:
        self._check()
        msg = conn.message()[conn.name]
        assert msg["ppk_required"] == "yes"
        self.calls.append(f"load-conn {msg['ppk_id']}")
        self.conn_ppk = msg["ppk_id"]
        # charon installs a trap policy for each start_action = trap child
        self.armed = all(c["start_action"] == "trap" for c in msg["children"].values())

    def _add(self, initiator: bool) -> int:
        uid = self.next_id
        self.next_id += 1
        self.sas[uid] = IkeSaInfo("gw-gw", uid, "ESTABLISHED", initiator, "a", "b", 0,
                                  (ChildSaInfo("lan", uid, "INSTALLED", uid, uid + 100),))
        return uid

    def initiate(self, conn: str, child: str, timeout_ms: int) -> int:
        self._check()
        assert self.peer is not None
        self.calls.append("initiate")
        ppk = self.conn_ppk
        if ppk is None or ppk not in self.keys:
            raise ViciError("initiate", "establishing CHILD_SA 'lan' failed")
        # RFC 8784 with ppk_required: both must hold the same bytes under the
        # id, and a charon 5.9.8 responder takes only the PPK_ID its own
        # connection names ("received PPK_ID 'x', but require 'y'")
        if self.peer.conn_ppk != ppk or self.peer.keys.get(ppk) != self.keys[ppk]:
            raise ViciAuthFailed("initiate", "establishing CHILD_SA 'lan' failed")
        if self.reuse and self.sas:
            return max(self.sas)
        self.peer._add(False)
        return self._add(True)

    def terminate_ike(self, unique_id: int, timeout_ms: int) -> None:
        self._check()
        self.calls.append(f"terminate {unique_id}")
        if self.sas.pop(unique_id, None) is None:
            raise ViciError("terminate", "no matching SA")
        if self.peer is not None and self.peer.sas:   # the peer's side of it
            self.peer.sas.pop(min(self.peer.sas))

    def list_sas(self, conn: str | None = None) -> list[IkeSaInfo]:
        self._check()
        return list(self.sas.values())

    def close(self) -> None:
        pass


def _spec(tid: str = "sw-b") -> StrongswanSpec:
    body = parse(SWANCTL)["connections"]["gw-gw"]
    return StrongswanSpec(tid, "gw-gw", "lan", body, vici_socket="/run/x.vici")


def _pair(sleep=lambda _s: None
          ) -> tuple[FakeCharon, FakeCharon, StrongswanConsumer, StrongswanConsumer]:
    a, b = FakeCharon("a"), FakeCharon("b")
    a.peer, b.peer = b, a
    ca = StrongswanConsumer(_spec(), connect=lambda _p: a, xfrm=RecordingIpsecBackend,
                            sleep=sleep)
    cb = StrongswanConsumer(_spec(), connect=lambda _p: b, xfrm=RecordingIpsecBackend,
                            sleep=sleep)
    return a, b, ca, cb


def _key(g: int, role: str, byte: int | None = None) -> ConsumerKey:
    return ConsumerKey("sw-b", "strongswan", g, SecretBytes(bytes([byte or g]) * 32),
                       KeyInputs("ML-KEM-768", True, ("k1",)), role, float(g))


def _rotate(ca: StrongswanConsumer, cb: StrongswanConsumer, g: int) -> None:
    # the exchange order: both prepare, responder installs, initiator installs
    ca.prepare(_key(g, "initiator"))
    cb.prepare(_key(g, "responder"))
    cb.install(_key(g, "responder"))
    rep = ca.install(_key(g, "initiator"))
    assert rep.verified and rep.key_name == f"qkdgate-sw-b-g{g}"
    if g > 1:
        ca.retire(g - 1)
        cb.retire(g - 1)


def test_rotations_keep_one_ike_sa_named_by_its_ppk_and_one_ppk_loaded():
    a, b, ca, cb = _pair()
    ca.setup(0.0)
    cb.setup(0.0)
    for g in range(1, 6):
        _rotate(ca, cb, g)
        assert set(a.keys) == set(b.keys) == {f"qkdgate-sw-b-g{g}"}
        assert len(a.sas) == len(b.sas) == 1
        (sa,) = ca.describe()["ike_sas"]          # type: ignore[misc]
        assert sa["ppk_id"] == f"qkdgate-sw-b-g{g}" and sa["initiator"]
        (sb,) = cb.describe()["ike_sas"]          # type: ignore[misc]
        assert sb["ppk_id"] == f"qkdgate-sw-b-g{g}"    # by the unique-id marks
    # make before break: the new IKE_SA is up before the old one is terminated
    i = a.calls.index("initiate", a.calls.index("load-conn qkdgate-sw-b-g3"))
    assert a.calls[i + 1].startswith("terminate")
    assert ca.describe()["ppk_id"] == "qkdgate-sw-b-g5"


def test_mismatched_ppk_fails_install_and_restores_the_previous_id():
    a, b, ca, cb = _pair()
    _rotate(ca, cb, 1)
    cb.prepare(_key(2, "responder", byte=0x55))
    ca.prepare(_key(2, "initiator"))
    cb.install(_key(2, "responder", byte=0x55))
    with pytest.raises(TunnelError):
        ca.install(_key(2, "initiator"))
    assert a.conn_ppk == "qkdgate-sw-b-g1"            # never half-changed
    assert [s.unique_id for s in a.sas.values()] == [1]  # the old IKE_SA runs on
    assert ca.describe()["ppk_id"] == "qkdgate-sw-b-g1"


def test_reauth_before_the_responders_load_conn_is_retried_until_charon_has_it():
    """The lab race of 2026-12-06: the responder's install was still queued
    on its worker when the initiator's IKE_AUTH arrived; its charon refused
    (AUTHENTICATION_FAILED) and the initiator failed the tunnel closed. Now
    the initiator pauses and tries again; the responder catches up meanwhile."""
    pauses: list[float] = []
    a, b, ca, cb = _pair(sleep=lambda s: (pauses.append(s),
                                          len(pauses) == 2 and cb.install(_key(2, "responder"))))
    _rotate(ca, cb, 1)
    ca.prepare(_key(2, "initiator"))
    cb.prepare(_key(2, "responder"))
    # the initiator installs first: the responder's connection still names g1
    rep = ca.install(_key(2, "initiator"))
    assert rep.verified and pauses == [0.25, 0.5]
    assert a.calls.count("initiate") == 1 + 3
    assert len(a.sas) == 1 and ca.describe()["ppk_id"] == "qkdgate-sw-b-g2"


def test_reauth_refused_throughout_the_retries_fails_the_install_unchanged():
    pauses: list[float] = []
    a, b, ca, cb = _pair(sleep=pauses.append)
    _rotate(ca, cb, 1)
    ca.prepare(_key(2, "initiator"))
    cb.prepare(_key(2, "responder"))
    with pytest.raises(ViciAuthFailed):
        ca.install(_key(2, "initiator"))
    assert pauses == [0.25, 0.5, 1.0, 2.0]
    assert a.conn_ppk == "qkdgate-sw-b-g1"           # back to the previous id
    assert [s.unique_id for s in a.sas.values()] == [1]


def test_a_queued_later_install_ends_the_retries_without_failing_the_install():
    # the peer refuses g2 because it has moved on; our install of g3 waits
    # behind this one (tests/unit/test_strongswan_worker.py has both workers)
    pauses: list[float] = []
    a, b, ca, cb = _pair(sleep=pauses.append)
    _rotate(ca, cb, 1)
    ca.superseded = lambda g: g == 2 and len(pauses) >= 1
    ca.prepare(_key(2, "initiator"))
    rep = ca.install(_key(2, "initiator"))             # refused once, then superseded
    assert a.calls.count("initiate") == 1 + 1 and pauses == [0.25]
    assert "not re-authenticated" in rep.detail and rep.key_name == "qkdgate-sw-b-g2"
    assert a.conn_ppk == "qkdgate-sw-b-g2"             # what the next install starts from
    assert [s.unique_id for s in a.sas.values()] == [1]   # the old IKE_SA runs on


def test_superseded_before_the_first_attempt_after_a_block_stays_disarmed():
    a, b, ca, cb = _pair()
    ca.setup(0.0)
    cb.setup(0.0)
    ca.superseded = lambda g: g == 1
    ca.prepare(_key(1, "initiator"))
    cb.prepare(_key(1, "responder"))
    cb.install(_key(1, "responder"))
    ca.install(_key(1, "initiator"))
    assert "initiate" not in a.calls                   # no re-authentication started
    assert not a.armed                                 # no trap without a CHILD_SA
    ca.superseded = lambda g: False
    _rotate(ca, cb, 2)                                 # the later generation goes through
    assert a.armed and len(a.sas) == 1


def test_a_local_initiate_failure_is_not_retried():
    pauses: list[float] = []
    a, b, ca, cb = _pair(sleep=pauses.append)
    _rotate(ca, cb, 1)
    a.conn_ppk = None
    a.load_conn = lambda conn: None                  # charon kept no ppk_id
    with pytest.raises(ViciError) as e:
        ca.install(_key(2, "initiator"))
    assert not isinstance(e.value, ViciAuthFailed) and pauses == []


def test_invalidate_unloads_every_ppk_and_block_terminates():
    a, b, ca, cb = _pair()
    a.keys["someone-else"] = b"x" * 32
    _rotate(ca, cb, 1)
    ca.prepare(_key(2, "initiator"))
    rep = ca.invalidate(Invalidation("sw-b", "policy", False))
    assert rep.verified and not rep.blocked and set(a.keys) == {"someone-else"}
    assert a.sas                                       # not blocked: the IKE_SA runs on
    rep = ca.invalidate(Invalidation("sw-b", "policy", True))
    assert rep.blocked and not a.sas and ca.describe()["ppk_id"] is None
    # idempotent, and a dead charon holds no PPK: not an error
    a.up = False
    assert ca.invalidate(Invalidation("sw-b", "daemon exit", True)).blocked


def test_failsafe_unloads_and_terminates_through_vici(monkeypatch):
    a, b, ca, cb = _pair()
    _rotate(ca, cb, 1)
    monkeypatch.setattr("qkdgate.tunnels.strongswan.ViciClient", lambda _p: a)
    said: list[str] = []
    rec = {"kind": "strongswan", "tunnel_id": "sw-b", "connection": "gw-gw",
           "vici_socket": "/run/x.vici"}
    assert failsafe(None, [rec], False, lambda _ns, t: said.append(t)) == 0
    assert not a.keys and not a.sas, said
    a.up = False
    assert failsafe(None, [rec], False, lambda _ns, t: said.append(t)) == 0
    assert "not running" in said[-1]


def test_spec_requires_trap_children_and_ppk_refuses_short_keys():
    body = parse(SWANCTL)["connections"]["gw-gw"]
    body["children"]["lan"]["start_action"] = "start"
    with pytest.raises(ConfigError, match="start_action = trap"):
        StrongswanSpec("t", "gw-gw", "lan", body)


def test_spec_refuses_file_keys_swanctl_would_have_read():
    body = parse(SWANCTL)["connections"]["gw-gw"]
    body["local"]["certs"] = "gw-a.pem"
    with pytest.raises(ConfigError, match="certs"):
        StrongswanSpec("t", "gw-gw", "lan", body)


def test_reused_ike_sa_is_refused_not_taken_for_a_reauthentication():
    a, b, ca, cb = _pair()
    _rotate(ca, cb, 1)
    a.reuse = True
    with pytest.raises(TunnelError, match="reuse_ikesa"):
        _rotate(ca, cb, 2)
    assert a.conn_ppk == "qkdgate-sw-b-g1" and len(a.sas) == 1


def test_factory_reads_the_connection_from_swanctl_conf(tmp_path):
    from dataclasses import dataclass

    from qkdgate.tunnels.strongswan import strongswan_consumer

    @dataclass(frozen=True)
    class Section:
        connection: str = "gw-gw"
        vici_socket: str = "/run/x.vici"
        swanctl_conf: str = ""
        child: str | None = None

    @dataclass(frozen=True)
    class Tunnel:
        name: str
        strongswan: Section | None

    conf = tmp_path / "swanctl.conf"
    conf.write_text(SWANCTL)
    c = strongswan_consumer(Tunnel("sw-b", Section(swanctl_conf=str(conf))), None)
    # the daemon's consumer runs its vici calls on a worker thread
    assert isinstance(c, ThreadedConsumer) and isinstance(c.inner, StrongswanConsumer)
    assert (c.tunnel_id, c.kind, c.inner.spec.child) == ("sw-b", "strongswan", "lan")
    with pytest.raises(ConfigError, match="no connection 'nope'"):
        strongswan_consumer(Tunnel("sw-b", Section("nope", swanctl_conf=str(conf))), None)


# ---- the block policies beneath charon's (issue 21 follow-up, item 1)

def test_block_policies_hold_every_selector_pair_below_charons_priority():
    from qkdgate.interfaces import Direction, Mark, PolicyAction
    from qkdgate.tunnels.strongswan import BLOCK_PRIORITY

    spec = _spec()
    got = {(str(p.selector.src), str(p.selector.dst), p.direction, p.mark) for p in spec.block}
    want = {(s, d, di, mk) for s, d, di in (("10.1.0.0/24", "10.2.0.0/24", Direction.OUT),
                                            ("10.2.0.0/24", "10.1.0.0/24", Direction.IN),
                                            ("10.2.0.0/24", "10.1.0.0/24", Direction.FWD))
            for mk in (Mark(0, 1), Mark(1, 1))}
    assert got == want
    # charon's trap/CHILD_SA policies are at most 2 * 200000 (get_priority)
    assert all(p.action is PolicyAction.BLOCK and p.priority == BLOCK_PRIORITY > 400000
               for p in spec.block)
    body = parse(SWANCTL)["connections"]["gw-gw"]
    child = body["children"]["lan"]
    del child["local_ts"]                       # default: dynamic = local_addrs
    child["priority"] = "500000"                # the operator's own priority wins
    spec = StrongswanSpec("t", "gw-gw", "lan", body)
    assert {str(p.selector.src) for p in spec.block if p.direction is Direction.OUT} \
        == {"192.0.2.1/32"}
    assert {p.priority for p in spec.block} == {500001}
    child["local_ts"] = "10.1.0.1-10.1.0.9"
    with pytest.raises(ConfigError, match="not a subnet"):
        StrongswanSpec("t", "gw-gw", "lan", body)


class _GuardedCharon(FakeCharon):
    """A charon whose load-conn first checks the SPD holds the block."""

    def __init__(self, name: str, spd: RecordingIpsecBackend, want: int) -> None:
        super().__init__(name)
        self.spd, self.want = spd, want
        self.unguarded = 0

    def load_conn(self, conn: ConnSpec) -> None:
        if len(self.spd.policies) < self.want:
            self.unguarded += 1
        super().load_conn(conn)


def test_block_policies_precede_every_load_conn_and_outlive_invalidate():
    spec = _spec()
    spds = [RecordingIpsecBackend(), RecordingIpsecBackend()]
    a, b = (_GuardedCharon(n, s, len(spec.block)) for n, s in zip("ab", spds, strict=True))
    a.peer, b.peer = b, a
    ca = StrongswanConsumer(spec, connect=lambda _p: a, xfrm=lambda: spds[0])
    cb = StrongswanConsumer(spec, connect=lambda _p: b, xfrm=lambda: spds[1])
    for c in (ca, cb):
        c.setup(0.0)
    assert all(len(s.policies) == len(spec.block) for s in spds)
    _rotate(ca, cb, 1)
    ca.invalidate(Invalidation("sw-b", "policy", True))
    spds[0].policies.clear()                    # someone flushed the SPD meanwhile
    _rotate(ca, cb, 2)                          # the first install after a block
    assert a.unguarded == b.unguarded == 0
    assert len(spds[0].policies) == len(spec.block)
    ca.invalidate(Invalidation("sw-b", "policy", True))
    assert len(spds[0].policies) == len(spec.block)     # blocked: the block stays
    ca.teardown()                               # the operator's explicit teardown
    assert not spds[0].policies


def test_block_disarms_the_trap_before_terminating_and_install_arms_it_again():
    # issue 21: a trap armed while blocked makes charon start an IKE_SA per
    # acquire that cannot authenticate; each leaves a half-open IKE_SA at the
    # peer, which at 5 ignores our next re-authentication
    a, b, ca, cb = _pair()
    for c in (ca, cb):
        c.setup(0.0)
    assert not a.armed and not b.armed and a.conn_ppk == "qkdgate-none"
    _rotate(ca, cb, 1)
    assert a.armed and not b.armed
    _rotate(ca, cb, 2)
    assert a.armed and b.armed
    del a.calls[:]
    ca.invalidate(Invalidation("sw-b", "policy", True))
    assert not a.armed and a.conn_ppk == "qkdgate-none"
    assert a.calls.index("load-conn qkdgate-none") < a.calls.index("terminate 2")
    # a failed first install after the block leaves the trap disarmed
    cb.prepare(_key(3, "responder", byte=0x55))
    cb.install(_key(3, "responder", byte=0x55))
    with pytest.raises(TunnelError):
        ca.install(_key(3, "initiator"))
    assert not a.armed and a.conn_ppk == "qkdgate-none"
    cb.invalidate(Invalidation("sw-b", "policy", True))
    del a.calls[:]
    _rotate(ca, cb, 4)
    # armed only once the re-authentication is up (no acquire beside it);
    # the responder with the next generation, over a running CHILD_SA
    assert a.armed and a.conn_ppk == "qkdgate-sw-b-g4" and not b.armed
    assert a.calls[:4] == ["load-shared qkdgate-sw-b-g4", "load-conn qkdgate-sw-b-g4",
                           "initiate", "load-conn qkdgate-sw-b-g4"], a.calls
    _rotate(ca, cb, 5)
    assert a.armed and b.armed
    # teardown hands the connection back trapped (charon's own fail closed)
    ca.invalidate(Invalidation("sw-b", "policy", True))
    ca.teardown()
    assert a.armed and not a.sas
