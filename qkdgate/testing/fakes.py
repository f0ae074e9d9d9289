"""In-memory recording fakes of the key-source and tunnel interfaces.

Theory of operation: protocol and daemon tests run two gateways in one
process without a KME or a kernel. :class:`FakeQkdLink` plays a pair of KMEs
joined by a QKD link: the master's :meth:`RecordingKeySource.get_new_keys`
takes keys from the shared pool, the slave's :meth:`get_keys_by_id` gets
each of them exactly once (ETSI GS QKD 014 keys are removed once delivered
to each side). The tunnel fakes keep SAs and policies in dicts and enforce
the kernel rules the real backends meet (EEXIST, ESRCH, EBUSY for deleting
an active MACsec SA), and record every call in ``ops`` so tests can assert
the exact order of a make-before-break switch.
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from qkdgate.errors import (
    KeyNotFound,
    KeySourceAuthError,
    KeyUnavailable,
    LocalProtocolError,
    TunnelError,
)
from qkdgate.interfaces import (
    AllocateSpi,
    Direction,
    InstallSa,
    IPAddress,
    IpsecOp,
    KeySourceStatus,
    MacsecLinkSpec,
    MacsecSaSpec,
    MacsecSaState,
    MacsecSecyState,
    PolicySpec,
    QkdKey,
    RemoveSa,
    SaCounters,
    SaId,
    SaSpec,
    SaState,
)
from qkdgate.keymix.secret import SecretBytes

# --------------------------------------------------------------------------
# key source
# --------------------------------------------------------------------------

class FakeQkdLink:
    """Two SAEs' KMEs sharing one pool of key material.

    ``rng(n)`` draws key bytes (inject a seeded one for replayable tests);
    set ``down = True`` to make every call fail with KeyUnavailable, or
    ``capacity`` to bound the pool.
    """

    def __init__(self, master_sae: str, slave_sae: str, *, capacity: int = 1_000_000,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.master_sae, self.slave_sae = master_sae, slave_sae
        self.capacity = capacity
        self.rng = rng
        self.down = False
        self.qber = 0.01
        self.issued: dict[str, tuple[bytes, set[str]]] = {}  # key_id -> (key, SAEs still to read)
        self.delivered = 0

    def source(self, sae_id: str) -> RecordingKeySource:
        if sae_id not in (self.master_sae, self.slave_sae):
            raise LocalProtocolError(f"SAE {sae_id!r} is not on this link")
        return RecordingKeySource(self, sae_id)


@dataclass
class RecordingKeySource:
    link: FakeQkdLink
    sae_id: str
    calls: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    closed: bool = False

    async def get_new_keys(self, peer_sae_id: str, number: int = 1, size_bits: int = 256,
                           additional_slave_sae_ids: Sequence[str] = ()) -> list[QkdKey]:
        self.calls.append(("get_new_keys", (peer_sae_id, number, size_bits)))
        link = self._usable()
        if peer_sae_id != link.slave_sae or self.sae_id != link.master_sae:
            raise KeySourceAuthError(f"{self.sae_id} may not request keys for {peer_sae_id}")
        if size_bits % 8:
            raise LocalProtocolError("size shall be a multiple of 8")
        if number > link.capacity:
            raise KeyUnavailable("key pool exhausted")
        link.capacity -= number
        keys = []
        for _ in range(number):
            kid = str(uuid.UUID(bytes=link.rng(16), version=4))
            material = link.rng(size_bits // 8)
            link.issued[kid] = (material, {link.slave_sae})
            keys.append(QkdKey(kid, SecretBytes(material)))
        return keys

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]:
        self.calls.append(("get_keys_by_id", (master_sae_id, tuple(key_ids))))
        link = self._usable()
        out = []
        for kid in key_ids:
            entry = link.issued.get(kid)
            if entry is None:
                raise KeyNotFound("one or more keys specified are not found on KME")
            material, readers = entry
            if self.sae_id not in readers:
                raise KeySourceAuthError(f"{self.sae_id} was not named as slave for {kid}")
        for kid in key_ids:
            material, readers = link.issued[kid]
            readers.discard(self.sae_id)
            if not readers:
                del link.issued[kid]
            link.delivered += 1
            out.append(QkdKey(kid, SecretBytes(material)))
        return out

    async def status(self, peer_sae_id: str) -> KeySourceStatus:
        self.calls.append(("status", (peer_sae_id,)))
        link = self.link
        return KeySourceStatus(
            source_kme_id="FAKE-KME-" + self.sae_id, target_kme_id="FAKE-KME-" + peer_sae_id,
            master_sae_id=link.master_sae, slave_sae_id=link.slave_sae, key_size=256,
            stored_key_count=min(link.capacity, 100000), max_key_count=100000,
            max_key_per_request=128, max_key_size=1024, min_key_size=64,
            link_up=not link.down, qber=link.qber,
            alarms=("link down",) if link.down else ())

    async def close(self) -> None:
        self.closed = True

    def _usable(self) -> FakeQkdLink:
        if self.closed:
            raise LocalProtocolError("key source used after close()")
        if self.link.down:
            raise KeyUnavailable("QKD link down")
        return self.link


# --------------------------------------------------------------------------
# IPsec
# --------------------------------------------------------------------------

def _sa_key(sa_id: SaId) -> tuple[object, ...]:
    return (sa_id.dst, sa_id.spi, sa_id.proto, sa_id.mark, sa_id.if_id)


def _policy_key(p: PolicySpec) -> tuple[object, ...]:
    return (p.selector, p.direction, p.mark, p.if_id)


@dataclass
class InstalledSa:
    sa_id: SaId
    spec: SaSpec
    direction: str          # "in" or "out"
    add_time: float


class RecordingIpsecBackend:
    """An in-memory XFRM. ``now`` gives the add time recorded on each SA."""

    def __init__(self, now: Callable[[], float] = lambda: 0.0) -> None:
        self.now = now
        self.sas: dict[tuple[object, ...], InstalledSa] = {}
        self.policies: dict[tuple[object, ...], PolicySpec] = {}
        self.bypassed: list[int] = []
        self.ops: list[tuple[str, object]] = []
        self.batches: list[int] = []
        self.spi_batches: list[int] = []
        self._next_spi = 0xC0000100
        self.larval_reqids: dict[int, int] = {}    # SPI reserved -> the reqid it carries

    def allocate_spi(self, src: IPAddress, dst: IPAddress, proto: int = socket.IPPROTO_ESP,
                     low: int = 0xC0000000, high: int = 0xCFFFFFFF, reqid: int = 0) -> int:
        while True:
            spi = max(self._next_spi, low)      # counts up within the asked range
            self._next_spi = spi + 1
            if spi > high:
                raise TunnelError("allocate_spi", errno.ENOENT, "SPI range exhausted")
            if spi >= low and not any(k[0] == dst and k[1] == spi for k in self.sas):
                self.ops.append(("allocate_spi", spi))
                self.larval_reqids[spi] = reqid
                return spi

    def allocate_spis(self, requests: Sequence[AllocateSpi]) -> list[int | TunnelError]:
        """The batched path: each as :meth:`allocate_spi` (so a subclass
        injecting faults there fails it here too); ``spi_batches`` records
        the size of each batch."""
        self.spi_batches.append(len(requests))
        out: list[int | TunnelError] = []
        for r in requests:
            try:
                out.append(self.allocate_spi(r.src, r.dst, r.proto, r.low, r.high, r.reqid))
            except TunnelError as exc:
                out.append(exc)
        return out

    def _install(self, op: str, direction: str, sa_id: SaId, spec: SaSpec) -> None:
        key = _sa_key(sa_id)
        if key in self.sas:
            raise TunnelError(op, errno.EEXIST, f"SPI {sa_id.spi:#x}")
        if spec.aead == "rfc4106(gcm(aes))" and len(spec.key) != 36:
            raise TunnelError(op, errno.EINVAL, "rfc4106(gcm(aes)) needs a 36-byte key")
        self.sas[key] = InstalledSa(sa_id, spec, direction, self.now())
        self.ops.append((op, sa_id))

    def install_inbound(self, sa_id: SaId, spec: SaSpec) -> None:
        self._install("install_inbound", "in", sa_id, spec)

    def install_outbound(self, sa_id: SaId, spec: SaSpec) -> None:
        self._install("install_outbound", "out", sa_id, spec)

    def switch_outbound(self, policy: PolicySpec) -> None:
        key = _policy_key(policy)
        if key not in self.policies:
            raise TunnelError("switch_outbound", errno.ENOENT, "no such policy")
        self.policies[key] = policy
        self.ops.append(("switch_outbound", policy.template.reqid if policy.template else None))

    def query_sa(self, sa_id: SaId) -> SaState:
        sa = self.sas.get(_sa_key(sa_id))
        if sa is None:
            raise TunnelError("query_sa", errno.ESRCH, f"SPI {sa_id.spi:#x}")
        return SaState(sa_id=sa.sa_id, reqid=sa.spec.reqid, aead=sa.spec.aead,
                       key_bits=len(sa.spec.key) * 8, icv_bits=sa.spec.icv_bits,
                       add_time=int(sa.add_time), replay_window=sa.spec.replay_window)

    def read_counters(self, sa_ids: Sequence[SaId]) -> list[SaCounters | TunnelError]:
        out: list[SaCounters | TunnelError] = []
        for sa_id in sa_ids:
            try:
                st = self.query_sa(sa_id)
            except TunnelError as exc:
                out.append(exc)
                continue
            out.append(SaCounters(sa_id.spi, st.bytes, st.packets, st.integrity_failed,
                                  st.replay_errors))
        return out

    def remove_sa(self, sa_id: SaId) -> None:
        if self.sas.pop(_sa_key(sa_id), None) is None:
            raise TunnelError("remove_sa", errno.ESRCH, f"SPI {sa_id.spi:#x}")
        self.ops.append(("remove_sa", sa_id))

    def list_sas(self, reqid_min: int = 0, reqid_max: int = 0xFFFFFFFF) -> list[SaState]:
        return [self.query_sa(sa.sa_id) for sa in self.sas.values()
                if reqid_min <= sa.spec.reqid <= reqid_max]

    def install_policy(self, policy: PolicySpec) -> None:
        key = _policy_key(policy)
        if key in self.policies:
            raise TunnelError("install_policy", errno.EEXIST)
        self.policies[key] = policy
        self.ops.append(("install_policy", policy.direction))

    def update_policy(self, policy: PolicySpec) -> None:
        key = _policy_key(policy)
        if key not in self.policies:
            raise TunnelError("update_policy", errno.ENOENT, "no such policy")
        self.policies[key] = policy
        self.ops.append(("update_policy", policy.action))

    def remove_policy(self, policy: PolicySpec) -> None:
        if self.policies.pop(_policy_key(policy), None) is None:
            raise TunnelError("remove_policy", errno.ENOENT)
        self.ops.append(("remove_policy", policy.direction))

    def list_policies(self) -> list[PolicySpec]:
        return list(self.policies.values())

    def apply(self, ops: Sequence[IpsecOp]) -> list[TunnelError | None]:
        """The batched path: each op as its single call would do it (so a
        subclass injecting faults there fails it here too), in order, a
        failure not stopping the rest (netlink_rcv_skb acks every message
        of a batch); ``batches`` records the size of each batch."""
        self.batches.append(len(ops))
        results: list[TunnelError | None] = []
        for op in ops:
            try:
                if isinstance(op, InstallSa):
                    (self.install_inbound if op.inbound else self.install_outbound)(
                        op.sa_id, op.spec)
                elif isinstance(op, RemoveSa):
                    self.remove_sa(op.sa_id)
                elif op.policy.direction is Direction.OUT and op.policy.template is not None:
                    self.switch_outbound(op.policy)
                else:
                    self.update_policy(op.policy)
                results.append(None)
            except TunnelError as exc:
                results.append(exc)
        return results

    def bypass_socket(self, sock: socket.socket) -> None:
        self.bypassed.append(sock.fileno())
        self.ops.append(("bypass_socket", sock.fileno()))

    def key_of(self, sa_id: SaId) -> SecretBytes:
        """Test helper: the key installed for an SA."""
        return self.sas[_sa_key(sa_id)].spec.key


# --------------------------------------------------------------------------
# MACsec
# --------------------------------------------------------------------------

@dataclass
class _FakeLink:
    spec: MacsecLinkSpec
    sci: int
    up: bool = True
    encoding_an: int = 0
    tx: dict[int, MacsecSaSpec] = field(default_factory=dict)
    rx: dict[int, dict[int, MacsecSaSpec]] = field(default_factory=dict)


class RecordingMacsecBackend:
    def __init__(self) -> None:
        self.links: dict[str, _FakeLink] = {}
        self.ops: list[tuple[str, object]] = []
        self._ifindex = 100

    def _link(self, op: str, name: str) -> _FakeLink:
        link = self.links.get(name)
        if link is None:
            raise TunnelError(op, errno.ENODEV, name)
        return link

    def create_link(self, spec: MacsecLinkSpec) -> int:
        if spec.name in self.links:
            raise TunnelError("create_link", errno.EEXIST, spec.name)
        self._ifindex += 1
        sci = (0x02_00_00_00_00_00 + self._ifindex) << 16 | spec.port
        self.links[spec.name] = _FakeLink(spec, sci)
        self.ops.append(("create_link", spec.name))
        return self._ifindex

    def destroy_link(self, name: str) -> None:
        self._link("destroy_link", name)
        del self.links[name]
        self.ops.append(("destroy_link", name))

    def link_sci(self, name: str) -> int:
        return self._link("link_sci", name).sci

    def secy_state(self, name: str) -> MacsecSecyState:
        spec = self._link("secy_state", name).spec
        return MacsecSecyState(cipher=spec.cipher, icv_len=spec.icv_len, protect=True,
                               encrypt=spec.encrypt, validate_strict=spec.validate_strict,
                               replay_protect=spec.replay_protect,
                               replay_window=spec.replay_window)

    def add_rx_sc(self, link: str, sci: int) -> None:
        lk = self._link("add_rx_sc", link)
        if sci in lk.rx:
            raise TunnelError("add_rx_sc", errno.EEXIST)
        lk.rx[sci] = {}
        self.ops.append(("add_rx_sc", sci))

    def remove_rx_sc(self, link: str, sci: int) -> None:
        lk = self._link("remove_rx_sc", link)
        if lk.rx.pop(sci, None) is None:
            raise TunnelError("remove_rx_sc", errno.ENODEV)
        self.ops.append(("remove_rx_sc", sci))

    def add_rx_sa(self, link: str, sci: int, sa: MacsecSaSpec) -> None:
        lk = self._link("add_rx_sa", link)
        if sci not in lk.rx:
            raise TunnelError("add_rx_sa", errno.ENODEV, "no such RX SC")
        if sa.an in lk.rx[sci]:
            raise TunnelError("add_rx_sa", errno.EBUSY, f"AN {sa.an} in use")
        lk.rx[sci][sa.an] = sa
        self.ops.append(("add_rx_sa", sa.an))

    def add_tx_sa(self, link: str, sa: MacsecSaSpec) -> None:
        lk = self._link("add_tx_sa", link)
        if sa.an in lk.tx:
            raise TunnelError("add_tx_sa", errno.EBUSY, f"AN {sa.an} in use")
        lk.tx[sa.an] = sa
        self.ops.append(("add_tx_sa", sa.an))

    def set_encoding_sa(self, link: str, an: int) -> None:
        lk = self._link("set_encoding_sa", link)
        if an not in lk.tx:
            raise TunnelError("set_encoding_sa", errno.ENODEV, f"no TX SA on AN {an}")
        lk.encoding_an = an
        self.ops.append(("set_encoding_sa", an))

    def set_rx_sa_active(self, link: str, sci: int, an: int, active: bool) -> None:
        lk = self._link("set_rx_sa_active", link)
        lk.rx[sci][an] = replace(lk.rx[sci][an], active=active)
        self.ops.append(("set_rx_sa_active", (an, active)))

    def set_tx_sa_active(self, link: str, an: int, active: bool) -> None:
        lk = self._link("set_tx_sa_active", link)
        if an not in lk.tx:
            raise TunnelError("set_tx_sa_active", errno.ENODEV)
        lk.tx[an] = replace(lk.tx[an], active=active)
        self.ops.append(("set_tx_sa_active", (an, active)))

    def remove_rx_sa(self, link: str, sci: int, an: int) -> None:
        lk = self._link("remove_rx_sa", link)
        sa = lk.rx.get(sci, {}).get(an)
        if sa is None:
            raise TunnelError("remove_rx_sa", errno.ENODEV)
        if sa.active:
            raise TunnelError("remove_rx_sa", errno.EBUSY, "SA is active")
        del lk.rx[sci][an]
        self.ops.append(("remove_rx_sa", an))

    def remove_tx_sa(self, link: str, an: int) -> None:
        lk = self._link("remove_tx_sa", link)
        sa = lk.tx.get(an)
        if sa is None:
            raise TunnelError("remove_tx_sa", errno.ENODEV)
        if sa.active:
            raise TunnelError("remove_tx_sa", errno.EBUSY, "SA is active")
        del lk.tx[an]
        self.ops.append(("remove_tx_sa", an))

    def query_tx_sa(self, link: str, an: int) -> MacsecSaState:
        lk = self._link("query_tx_sa", link)
        sa = lk.tx.get(an)
        if sa is None:
            raise TunnelError("query_tx_sa", errno.ENODEV)
        return MacsecSaState(an=an, active=sa.active, next_pn=sa.pn)

    def set_link_up(self, name: str, up: bool) -> None:
        self._link("set_link_up", name).up = up
        self.ops.append(("set_link_up", (name, up)))
