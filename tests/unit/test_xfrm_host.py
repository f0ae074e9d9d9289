"""XfrmBackend against the host kernel, in throw-away network namespaces.

The host kernel may lack ESP (SA installs then fail with a specific
TunnelError), but it accepts XFRM policies and SPI allocation, which is
enough to check policy install/switch/remove, errno propagation, the
fail-closed drop of traffic with no SA, per-socket bypass and failsafe's
IPsec sweep. Data-plane tests run in the lab VM (tests/kernel)."""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import subprocess
import uuid

import pytest

from qkdgate.errors import TunnelError
from qkdgate.interfaces import (
    Direction,
    InstallSa,
    Mark,
    Mode,
    PolicyAction,
    PolicySpec,
    RemoveSa,
    SaId,
    SaSpec,
    Selector,
    Template,
    UpdatePolicy,
)
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.netlink import (
    BATCH_MESSAGES,
    NetlinkChannel,
    in_netns,
    open_socket_in_netns,
)
from qkdgate.tunnels.xfrm import NETLINK_XFRM, XfrmBackend

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="needs root and iproute2 for network namespaces")
A, B = ipaddress.ip_address("10.77.0.1"), ipaddress.ip_address("10.77.0.2")
NET_A, NET_B = ipaddress.ip_network("10.77.0.1/32"), ipaddress.ip_network("10.77.0.2/32")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def pair():
    """Two namespaces joined by a veth pair, A=10.77.0.1, B=10.77.0.2."""
    tag = uuid.uuid4().hex[:6]
    na, nb = f"qkx-a-{tag}", f"qkx-b-{tag}"
    sh("ip", "netns", "add", na)
    sh("ip", "netns", "add", nb)
    try:
        sh("ip", "-n", na, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", nb)
        for ns, dev, addr in ((na, "v0", A), (nb, "v1", B)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield na, nb
    finally:
        sh("ip", "netns", "del", na)
        sh("ip", "netns", "del", nb)


def test_policy_install_switch_list_remove(pair):
    be = XfrmBackend(pair[0], registry=None)
    sel = Selector(NET_A, NET_B)
    out = PolicySpec(sel, Direction.OUT, template=Template(A, B, reqid=0x10001, mode=Mode.TRANSPORT),
                     mark=Mark(9))
    be.install_policy(out)
    with pytest.raises(TunnelError) as ei:
        be.install_policy(out)
    assert ei.value.errno == errno.EEXIST and ei.value.op == "install_policy"
    be.switch_outbound(PolicySpec(sel, Direction.OUT,
                                  template=Template(A, B, reqid=0x10002, mode=Mode.TRANSPORT),
                                  mark=Mark(9)))
    (got,) = be.list_policies()
    assert got.template.reqid == 0x10002 and got.mark == Mark(9)
    assert got.template.mode is Mode.TRANSPORT and not got.template.optional
    be.remove_policy(out)
    assert be.list_policies() == []
    with pytest.raises(TunnelError) as ei:
        be.remove_policy(out)
    assert ei.value.errno == errno.ENOENT


def test_allocate_spi_reserves_distinct_spis_in_range(pair):
    be = XfrmBackend(pair[0], registry=None)
    spis = {be.allocate_spi(B, A, low=0xC0000000, high=0xC00000FF) for _ in range(5)}
    assert len(spis) == 5 and all(0xC0000000 <= s <= 0xC00000FF for s in spis)
    larval = {st.sa_id.spi for st in be.list_sas()}
    assert spis <= larval


def test_sa_install_errors_carry_errno_and_operation(pair):
    be = XfrmBackend(pair[0], registry=None)
    spec = SaSpec(key=SecretBytes(bytes(36)), reqid=1, aead="rfc4106(no-such-cipher)")
    with pytest.raises(TunnelError) as ei:
        be.install_outbound(SaId(A, B, 0x5000), spec)
    assert ei.value.op == "install_outbound" and ei.value.errno in (errno.ENOSYS, errno.ENOENT)
    assert "000000" not in str(ei.value)  # no key bytes in the message


def _udp_delivered(na: str, nb: str, bypass: XfrmBackend | None) -> bool:
    rx = open_socket_in_netns(socket.AF_INET, socket.SOCK_DGRAM, nb)
    tx = open_socket_in_netns(socket.AF_INET, socket.SOCK_DGRAM, na)
    try:
        rx.bind((str(B), 0))
        rx.settimeout(0.5)
        if bypass is not None:
            bypass.bypass_socket(tx)
        try:
            tx.sendto(b"probe", (str(B), rx.getsockname()[1]))
        except OSError:
            return False
        try:
            return rx.recv(100) == b"probe"
        except TimeoutError:
            return False
    finally:
        rx.close()
        tx.close()


def test_required_template_without_sa_drops_and_bypass_socket_passes(pair):
    na, nb = pair
    be = XfrmBackend(na, registry=None)
    assert _udp_delivered(na, nb, None)          # clear path works before any policy
    be.install_policy(PolicySpec(Selector(NET_A, NET_B), Direction.OUT,
                                 template=Template(A, B, reqid=0x10001, mode=Mode.TRANSPORT)))
    assert not _udp_delivered(na, nb, None)      # fail closed: no SA, no packet
    assert _udp_delivered(na, nb, be)            # the control channel still gets through


def test_block_policy_drops(pair):
    na, nb = pair
    be = XfrmBackend(na, registry=None)
    be.install_policy(PolicySpec(Selector(NET_A, NET_B), Direction.OUT, action=PolicyAction.BLOCK))
    assert not _udp_delivered(na, nb, None)


def test_bulk_remove_reports_each_result(pair):
    be = XfrmBackend(pair[0], registry=None)
    spis = [be.allocate_spi(B, A) for _ in range(300)]       # larval states
    ids = [SaId(B, A, s) for s in spis] + [SaId(B, A, 0x777)]  # the last does not exist
    results = be.remove_sas(ids)
    assert results[:-1] == [None] * 300
    assert results[-1].errno == errno.ESRCH and results[-1].op == "remove_sa"
    assert be.list_sas() == []


class _CountingSocket(socket.socket):
    """A netlink socket counting its sends (one batch = one send)."""

    sends = 0

    def send(self, data, flags=0):
        type(self).sends += 1
        return super().send(data, flags)


def test_apply_pipelines_the_batch_and_reports_each_op_in_order(pair):
    """Issue 19: many operations per send, one NLM_F_ACK per message,
    results matched by sequence number; a failed op (an SA the kernel
    cannot key, a delete of nothing) does not stop the ops after it."""
    with in_netns(pair[0]):
        sock = _CountingSocket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    be = XfrmBackend(pair[0], channel=NetlinkChannel(NETLINK_XFRM, sock=sock), registry=None)
    sels = [Selector(ipaddress.ip_network(f"10.8.{i}.0/24"), NET_B) for i in range(100)]
    spec = SaSpec(key=SecretBytes(bytes(36)), reqid=5, aead="rfc4106(no-such-cipher)")
    ops = [UpdatePolicy(PolicySpec(sel, Direction.OUT, action=PolicyAction.BLOCK))
           for sel in sels[:50]]
    ops += [InstallSa(SaId(A, B, 0x5000), spec, inbound=False), RemoveSa(SaId(B, A, 0x777))]
    ops += [UpdatePolicy(PolicySpec(sel, Direction.OUT, action=PolicyAction.BLOCK))
            for sel in sels[50:]]
    _CountingSocket.sends = 0
    results = be.apply(ops)
    assert _CountingSocket.sends == -(-len(ops) // BATCH_MESSAGES)     # 102 ops: 2 sends
    assert results[:50] == [None] * 50 and results[52:] == [None] * 50
    assert results[50].op == "install_outbound" and results[50].errno in (errno.ENOSYS,
                                                                          errno.ENOENT)
    assert results[51].op == "remove_sa" and results[51].errno == errno.ESRCH
    assert {p.selector for p in be.list_policies()} == set(sels)
    removed = be.apply([RemoveSa(SaId(B, A, s)) for s in
                        [be.allocate_spi(B, A) for _ in range(3)]])
    assert removed == [None] * 3 and be.list_sas() == []
