"""Key consumers (issue 21): a WireGuard tunnel is an ordinary Tunnel over a
ConsumerDriver; these tests drive two gateways' tunnels in the peer
protocol's order against an in-memory WireGuard kernel and assert what the
kernel holds after each step (strongSwan-style rekey tests)."""

from __future__ import annotations

import errno
import ipaddress
import struct

import pytest

from qkdgate.errors import TunnelError
from qkdgate.keymix import labels, schedule
from qkdgate.keymix.combiner import Provenance, SessionSecret
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels import wireguard_msg as w
from qkdgate.tunnels.consumer import ConsumerDriver, Invalidation, consumer_tunnel
from qkdgate.tunnels.events import ConsumerInvalidated, ConsumerKeyInstalled, TunnelBlocked
from qkdgate.tunnels.netlink import iter_nlas, nla, nla_nested, parse_nlas
from qkdgate.tunnels.state import TunnelRegistry
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import GenerationRefused, TunnelPolicy
from qkdgate.tunnels.wireguard import (
    WgPeerState,
    WireguardBackend,
    WireguardConsumer,
    WireguardSpec,
    key_b64,
)

LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=2)
PUB_A, PUB_B = bytes(range(32)), bytes(range(32, 64))    # the two gateways' WG keys
NETS_A = (ipaddress.ip_network("10.9.0.1/32"),)          # what B allows for A
NETS_B = (ipaddress.ip_network("10.9.0.2/32"), ipaddress.ip_network("fd00::2/128"))


class FakeWg:
    """One WireGuard device with one peer, as the kernel keeps it."""

    netns = None

    def __init__(self, peer: bytes, allowed) -> None:
        self.peer_key = peer
        self.psk = b"\x55" * 32                 # what the operator had
        self.allowed = tuple(allowed)
        self.endpoint = b"endpoint"
        self.keepalive = 25
        self.session = True                     # a running WireGuard session
        self.exists = True
        self.ignore_psk = False                 # a kernel that drops the PSK
        self.calls: list[str] = []

    def peer(self, interface, public_key):
        if not self.exists or public_key != self.peer_key:
            raise TunnelError("get_wireguard_peer", errno.ENOENT, "no peer")
        return WgPeerState(public_key, SecretBytes(self.psk), self.endpoint, self.keepalive,
                           self.allowed, None)

    def set_peer(self, interface, public_key, psk, allowed_ips):
        self.calls.append("set")
        self.peer(interface, public_key)
        if not self.ignore_psk:
            self.psk = psk.reveal()
        for net in allowed_ips or ():        # added, never replaced (like the kernel call)
            if net not in self.allowed:
                self.allowed += (net,)

    def block_peer(self, interface, public_key, psk):
        self.calls.append("block")
        self.peer(interface, public_key)
        self.psk, self.allowed, self.session = psk.reveal(), (), False


def session(seed: bytes, qkd=("6f1c2a5e-0000-4000-8000-000000000001",)) -> SessionSecret:
    return SessionSecret(SecretBytes(seed * (labels.HASH_LEN // len(seed))),
                         Provenance("ML-KEM-768", True, qkd))


def gateway(peer: bytes, allowed, policy=TunnelPolicy.HYBRID_REQUIRED, registry=None):
    kernel, events = FakeWg(peer, allowed), []
    consumer = WireguardConsumer(WireguardSpec("wg-ab", "wg0", peer, tuple(allowed)), kernel,
                                 registry=registry, rng=lambda n: b"\xee" * n)
    tunnel = consumer_tunnel(consumer, policy=policy, lifetimes=LT, emit=events.append)
    return tunnel, kernel, events


@pytest.fixture
def pair():
    a, ka, ea = gateway(PUB_B, NETS_B)          # gateway A: its peer is B
    b, kb, eb = gateway(PUB_A, NETS_A)
    a.setup(0.0)
    b.setup(0.0)
    return a, ka, ea, b, kb, eb


def generation(a, b, ka, kb, g: int, s: SessionSecret, now: float) -> list[tuple[bytes, bytes]]:
    """One exchange in the protocol's order (A initiates); the two PSKs after each step."""
    seen = []
    a.install_inbound(g, s, "initiator", 0, now)
    seen.append((ka.psk, kb.psk))
    b.install_inbound(g, s, "responder", 0, now)
    seen.append((ka.psk, kb.psk))
    b.install_outbound(g, s, "responder", 0, now)
    seen.append((ka.psk, kb.psk))
    a.install_outbound(g, s, "initiator", 0, now)
    seen.append((ka.psk, kb.psk))
    return seen


def test_setup_fails_closed_random_psk_session_gone_no_allowed_ips(pair):
    a, ka, ea, *_ = pair
    assert ka.psk == b"\xee" * 32 and ka.allowed == () and not ka.session
    assert a.state == "blocked"
    assert ea[0] == ConsumerInvalidated("wg-ab", "wireguard", "start: no generation yet", True,
                                        ea[0].detail)


def test_generation_sets_one_psk_on_both_gateways_one_message_apart(pair):
    a, ka, ea, b, kb, eb = pair
    s = session(b"\x11\x22")
    want = schedule.consumer_key(s, "wireguard", "wg-ab", 1).reveal()
    steps = generation(a, b, ka, kb, 1, s, 1.0)
    rnd = b"\xee" * 32
    # inbound (make) changes nothing: WireGuard has one PSK slot; B switches
    # first (after CONFIRM), A one message later (after DONE)
    assert steps == [(rnd, rnd), (rnd, rnd), (rnd, want), (want, want)]
    assert ka.allowed == NETS_B and kb.allowed == NETS_A
    assert a.state == b.state == "up"
    inst = [e for e in ea if isinstance(e, ConsumerKeyInstalled)]
    assert [(e.generation, e.key_name, e.verified) for e in inst] == [(1, "qkdgate-wg-ab-g1",
                                                                        True)]
    assert inst[0].inputs.qkd_key_ids == ("6f1c2a5e-0000-4000-8000-000000000001",)
    assert want.hex() not in repr(ea) + repr(a.status(1.0))


def test_rotation_changes_the_psk_every_generation_and_retire_keeps_it(pair):
    a, ka, _ea, b, kb, _eb = pair
    psks = []
    for g in range(1, 6):
        generation(a, b, ka, kb, g, session(bytes([g, 7])), float(g))
        assert ka.psk == kb.psk
        psks.append(ka.psk)
        if g > 1:
            a.retire(g - 1, float(g) + 3)
            b.retire(g - 1, float(g) + 3)
            assert ka.psk == psks[-1] and ka.allowed == NETS_B   # retiring g-1 keeps g
    assert len(set(psks)) == 5
    assert a.status(9.0)["consumer"] == {
        "kind": "wireguard", "installed_generation": 5, "blocked": False, "interface": "wg0",
        "peer": key_b64(PUB_B), "preshared_key": "qkdgate-wg-ab-g5", "peer_blocked": False}


def test_hard_lifetime_without_new_generation_blocks_the_running_session(pair):
    a, ka, ea, b, kb, _ = pair
    generation(a, b, ka, kb, 1, session(b"\x01\x02"), 1.0)
    ka.session = True                                  # WireGuard handshook meanwhile
    ea.clear()
    a.handle_timer(1.0 + LT.hard_seconds)
    assert ka.psk == b"\xee" * 32 and ka.allowed == () and not ka.session
    assert a.state == "blocked"
    assert any(isinstance(e, TunnelBlocked) for e in ea)
    assert any(isinstance(e, ConsumerInvalidated) and e.blocked for e in ea)


def test_policy_refusal_installs_nothing(pair):
    a, ka, _ea, *_ = pair
    before = ka.psk
    with pytest.raises(GenerationRefused):
        a.install_inbound(1, session(b"\x03\x04", qkd=()), "initiator", 0, 1.0)
    assert ka.psk == before and ka.allowed == ()


def test_psk_that_does_not_read_back_fails_closed_and_raises(pair):
    a, ka, ea, b, kb, _eb = pair
    s = session(b"\x05\x06")
    a.install_inbound(1, s, "initiator", 0, 1.0)
    ka.ignore_psk = True
    ea.clear()
    with pytest.raises(TunnelError, match="read back differs"):
        a.install_outbound(1, s, "initiator", 0, 1.0)
    assert ka.calls[-1] == "block" and ka.allowed == () and not ka.session
    assert a.state == "blocked" and a.driver.blocked and a.driver.installed is None
    assert [e.reason for e in ea if isinstance(e, ConsumerInvalidated)] == [
        "install of generation 1 failed"]


def test_clean_exit_blocks_no_key_outlives_the_daemon(pair):
    a, ka, _ea, b, kb, _eb = pair
    generation(a, b, ka, kb, 1, session(b"\x07\x08"), 1.0)
    ka.session = True
    a.shutdown(teardown=False, now=2.0)
    assert ka.psk == b"\xee" * 32 and ka.allowed == () and not ka.session


def test_teardown_leaves_wireguard_as_without_qkdgate(pair):
    a, ka, *_ = pair
    a.shutdown(teardown=True, now=2.0)
    assert ka.psk == bytes(32) and ka.allowed == NETS_B and a.state == "down"


def test_setup_records_the_peer_for_failsafe_before_touching_it(tmp_path):
    reg = TunnelRegistry(str(tmp_path / "r.json"))
    t, _k, _e = gateway(PUB_B, NETS_B, registry=reg)
    t.setup(0.0)
    assert TunnelRegistry.load(str(tmp_path / "r.json"))[""]["consumers"] == [
        {"kind": "wireguard", "interface": "wg0", "peer": key_b64(PUB_B)}]


def test_missing_peer_is_a_setup_error_not_a_new_peer():
    t, k, _e = gateway(PUB_B, NETS_B)
    k.exists = False
    with pytest.raises(TunnelError) as info:
        t.setup(0.0)
    assert info.value.errno == errno.ENOENT


def test_driver_wire_value_is_zero_and_block_is_idempotent():
    _t, k, _e = gateway(PUB_B, NETS_B)
    d = _t.driver
    assert isinstance(d, ConsumerDriver) and d.allocate_spi(frozenset()) == 0
    d.setup(0.0)
    k.calls.clear()
    d.block_outbound()
    assert k.calls == []       # blocked since setup, nothing installed: nothing to do
    assert d.consumer.invalidate(Invalidation("wg-ab", "x", False)).blocked


# ---------------------------------------------------------------- netlink layout

class Recorder(WireguardBackend):
    """The backend with its socket replaced: records SET_DEVICE bodies and
    answers GET_DEVICE with one peer."""

    def __init__(self) -> None:   # no socket
        self.netns, self._family = None, 0x21
        self.sent: list[dict[int, bytes]] = []

    def peers(self, interface):
        return [WgPeerState(PUB_B, SecretBytes(bytes(32)), b"\x02\x00\x12\x34" + bytes(12), 25,
                            NETS_B, None)]

    def _set(self, op, interface, *peers):
        self.sent.append({"op": op, "peers": [parse_nlas(p[4:]) for p in peers]})


def test_set_peer_updates_only_an_existing_peer_and_adds_allowed_ips():
    """Never REPLACE_ALLOWEDIPS: the kernel empties them first, so a packet
    passing during the call would be dropped (0 loss across rotations)."""
    r = Recorder()
    r.set_peer("wg0", PUB_B, SecretBytes(b"\x42" * 32), NETS_B)
    (peer,) = r.sent[0]["peers"]
    assert peer[w.WGPEER_A_PUBLIC_KEY] == PUB_B and peer[w.WGPEER_A_PRESHARED_KEY] == b"\x42" * 32
    assert struct.unpack("=I", peer[w.WGPEER_A_FLAGS])[0] == w.WGPEER_F_UPDATE_ONLY
    ips = [parse_nlas(b) for _t, b in iter_nlas(peer[w.WGPEER_A_ALLOWEDIPS])]
    assert [(struct.unpack("=H", a[w.WGALLOWEDIP_A_FAMILY])[0], a[w.WGALLOWEDIP_A_CIDR_MASK])
            for a in ips] == [(2, b"\x20"), (10, b"\x80")]
    r.set_peer("wg0", PUB_B, SecretBytes(b"\x42" * 32), None)
    (peer,) = r.sent[1]["peers"]
    assert w.WGPEER_A_ALLOWEDIPS not in peer
    assert struct.unpack("=I", peer[w.WGPEER_A_FLAGS])[0] == w.WGPEER_F_UPDATE_ONLY


def test_block_removes_then_re_adds_the_peer_in_one_message():
    r = Recorder()
    r.block_peer("wg0", PUB_B, SecretBytes(b"\x99" * 32))
    remove, again = r.sent[0]["peers"]
    assert struct.unpack("=I", remove[w.WGPEER_A_FLAGS])[0] == w.WGPEER_F_REMOVE_ME
    assert again[w.WGPEER_A_PUBLIC_KEY] == PUB_B and again[w.WGPEER_A_PRESHARED_KEY] == b"\x99" * 32
    assert struct.unpack("=I", again[w.WGPEER_A_FLAGS])[0] == w.WGPEER_F_REPLACE_ALLOWEDIPS
    assert w.WGPEER_A_ALLOWEDIPS not in again                        # none: nothing passes
    assert again[w.WGPEER_A_ENDPOINT] == b"\x02\x00\x12\x34" + bytes(12)   # kept
    assert again[w.WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL] == struct.pack("=H", 25)


def test_dump_parsing_reads_psk_allowed_ips_and_handshake_time():
    from qkdgate.tunnels.wireguard import _nested_items, _peer_state
    ip = nla_nested(0, nla(w.WGALLOWEDIP_A_FAMILY, struct.pack("=H", 2)),
                    nla(w.WGALLOWEDIP_A_IPADDR, bytes([10, 9, 0, 2])),
                    nla(w.WGALLOWEDIP_A_CIDR_MASK, b"\x20"))
    peer = nla_nested(0, nla(w.WGPEER_A_PUBLIC_KEY, PUB_B),
                      nla(w.WGPEER_A_PRESHARED_KEY, b"\x07" * 32),
                      nla(w.WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", 1700000000, 5)),
                      nla(w.WGPEER_A_RX_BYTES, struct.pack("=Q", 99)),
                      nla_nested(w.WGPEER_A_ALLOWEDIPS, ip))
    (st,) = [_peer_state(p) for p in _nested_items(nla_nested(w.WGDEVICE_A_PEERS, peer)[4:])]
    assert st.public_key == PUB_B and st.preshared_key.reveal() == b"\x07" * 32
    assert st.allowed_ips == (ipaddress.ip_network("10.9.0.2/32"),)
    assert st.last_handshake == pytest.approx(1700000000) and st.rx_bytes == 99
    assert "\\x07" not in repr(st) and "0707" not in repr(st)


def test_constants_match_the_header():
    # include/uapi/linux/wireguard.h (Linux 6.1)
    assert (w.WG_CMD_GET_DEVICE, w.WG_CMD_SET_DEVICE) == (0, 1)
    assert (w.WGDEVICE_A_IFNAME, w.WGDEVICE_A_PEERS) == (2, 8)
    assert (w.WGPEER_A_PRESHARED_KEY, w.WGPEER_A_FLAGS, w.WGPEER_A_ALLOWEDIPS) == (2, 3, 9)
    assert (w.WGPEER_F_REMOVE_ME, w.WGPEER_F_REPLACE_ALLOWEDIPS, w.WGPEER_F_UPDATE_ONLY) == (1, 2, 4)
    assert (w.WGALLOWEDIP_A_FAMILY, w.WGALLOWEDIP_A_IPADDR, w.WGALLOWEDIP_A_CIDR_MASK) == (1, 2, 3)


def test_daemon_builder_makes_a_consumer_tunnel_named_by_the_config(tmp_path):
    """build.tunnels: type wireguard -> a Tunnel over a ConsumerDriver over
    the configured peer; the protocol learns the kind 'wireguard'."""
    from test_config import WG_KEY, _consumer_text, parse

    from qkdgate.gateway.config.model import TunnelType
    from qkdgate.gateway.daemon import build
    cfg = parse(_consumer_text(
        "    type: wireguard\n    wireguard:\n      interface: wg7\n"
        f"      peer_public_key: {WG_KEY}\n      allowed_ips: [10.9.0.2/32]\n"))
    made = []

    def fake(t, registry):
        made.append((build.wireguard_spec(t), registry))
        spec = build.wireguard_spec(t)
        return WireguardConsumer(spec, FakeWg(spec.peer_public_key, spec.allowed_ips))

    reg = TunnelRegistry(str(tmp_path / "r.json"))
    (tunnel,) = build.tunnels(cfg, None, None, lambda e: None, registry=reg,
                              consumers={TunnelType.WIREGUARD: fake})
    spec, registry = made[0]
    assert registry is reg and spec.interface == "wg7" and key_b64(spec.peer_public_key) == WG_KEY
    assert tunnel.kind == "wireguard" and isinstance(tunnel.driver, ConsumerDriver)
    sc = build.session_config(cfg, cfg.peers[0])
    assert [(t.tunnel_id, t.kind) for t in sc.tunnels] == [("dc1-dc2", "wireguard")]
    assert build.failsafe_registry(cfg, None, None, str(tmp_path / "x.json")) is not None


def test_failed_install_on_a_running_tunnel_invalidates_instead_of_keeping_the_old_key(pair):
    """Fail closed, report, rebuild: after generation 1 runs, generation 2's
    PSK does not read back; the peer must not stay on a key nobody confirmed,
    and a later block still reaches the kernel."""
    a, ka, ea, b, kb, _eb = pair
    generation(a, b, ka, kb, 1, session(b"\x09\x0a"), 1.0)
    s2 = session(b"\x0b\x0c")
    a.install_inbound(2, s2, "initiator", 0, 2.0)
    ka.ignore_psk = True
    with pytest.raises(TunnelError):
        a.install_outbound(2, s2, "initiator", 0, 2.0)
    assert ka.allowed == () and not ka.session and ka.psk == b"\xee" * 32
    assert a.status(2.0)["consumer"]["installed_generation"] is None
    ka.ignore_psk = False
    generation(a, b, ka, kb, 3, session(b"\x0d\x0e"), 3.0)      # the next generation rebuilds
    assert ka.psk == kb.psk and ka.allowed == NETS_B
