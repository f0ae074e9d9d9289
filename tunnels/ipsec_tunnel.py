"""IPsec (XFRM) tunnels for the tunnel manager.

Theory of operation: one :class:`IpsecDriver` (the kernel half of an IPsec
:class:`~qkdgate.tunnels.tunnel.Tunnel`) owns a reqid range
``[reqid_base, reqid_base + reqid_span)``. ``reqid_base`` is the *inbound*
reqid every generation's inbound SA carries, so the ``in``/``fwd`` policy
templates match old and new inbound SAs during an overlap. Each generation's
outbound SA gets the next free reqid of the rest of the range; switching
traffic to it is one XFRM_MSG_UPDPOLICY of each ``out`` policy (its template
names the new reqid). That range is also how a restarted daemon recognises
its own SAs (:meth:`IpsecDriver.setup` reports them for adoption: they keep forwarding
until a new generation replaces them or their kernel lifetime ends).

Policies per (local net, remote net) pair: ``out`` (BLOCK until the first
generation), ``in`` and, in tunnel mode, ``fwd`` (ALLOW with a required ESP
template: cleartext that matches the selectors is dropped). RFC 4301 4.4.1.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from qkdgate.errors import LocalProtocolError, TunnelError
from qkdgate.interfaces import (
    AllocateSpi,
    Direction,
    InstallSa,
    IPAddress,
    IPNetwork,
    IpsecBackend,
    IpsecOp,
    Lifetime,
    Mark,
    Mode,
    PolicyAction,
    PolicySpec,
    RemoveSa,
    SaCounters,
    SaId,
    SaSpec,
    SaState,
    Selector,
    Template,
    UdpEncap,
    UpdatePolicy,
)
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.driver import (
    CounterReading,
    KernelSnapshot,
    KeySchedule,
    NewSa,
    SaRecord,
    SetupReport,
)
from qkdgate.tunnels.events import TunnelEventSink
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import Tunnel, TunnelPolicy

log = logging.getLogger("qkdgate.tunnels")


SPI_RANGE: Final = (0xC0000000, 0xCFFFFFFF)   # 2^28 SPIs, strongSwan's default range


def spi_range_for_node(node: int | None) -> tuple[int, int]:
    """The inbound SPI range of HA node 1 or 2 (or of a gateway without HA).

    The two nodes of a pair reserve SPIs in their own kernels, yet the peer
    installs both nodes' outbound SAs under one destination, the VIP. Equal
    SPIs from the two nodes would collide there: the peer's kernel refuses the
    second (EEXIST) and the new node's first exchange after a failover fails.
    Disjoint halves rule that out (docs/operations.md, "High availability")."""
    low, high = SPI_RANGE
    if node is None:
        return SPI_RANGE
    if node not in (1, 2):
        raise ValueError(f"HA node {node!r} is not 1 or 2")
    half = (high - low + 1) // 2
    return (low, low + half - 1) if node == 1 else (low + half, high)


@dataclass(frozen=True, slots=True)
class IpsecTunnelSpec:
    tunnel_id: str
    local: IPAddress
    remote: IPAddress
    local_nets: tuple[IPNetwork, ...]
    remote_nets: tuple[IPNetwork, ...]
    reqid_base: int
    reqid_span: int = 64
    mode: Mode = Mode.TUNNEL
    mark: Mark | None = None
    if_id: int | None = None
    encap: UdpEncap | None = None
    replay_window: int = 1024
    priority: int = 1000
    aead: str = "rfc4106(gcm(aes))"
    esn: bool = True
    # Inbound SPIs are reserved from here (XFRM_MSG_ALLOCSPI min/max); the
    # two nodes of an HA pair get disjoint halves (spi_range_for_node).
    spi_range: tuple[int, int] = SPI_RANGE

    def __post_init__(self) -> None:
        if self.reqid_base < 1 or self.reqid_span < 3 \
                or self.reqid_base + self.reqid_span > 0xFFFFFFFF:
            raise ValueError("reqid range must be within 1..2^32-1 and hold at least 3 reqids")
        low, high = self.spi_range
        # RFC 4303 2.1: SPI 0 is reserved, 1-255 are reserved by IANA
        if not 256 <= low <= high <= 0xFFFFFFFF:
            raise ValueError(f"SPI range {low:#x}..{high:#x} not within 0x100..0xffffffff")
        if not self.local_nets or not self.remote_nets:
            raise ValueError("a tunnel needs local and remote traffic selectors")

    def selectors(self) -> list[tuple[Selector, Selector]]:
        """(outbound, inbound) selector for every local x remote net pair of the same family."""
        pairs: list[tuple[Selector, Selector]] = []
        for ln in self.local_nets:
            for rn in self.remote_nets:
                if ln.version == rn.version:
                    pairs.append((Selector(ln, rn), Selector(rn, ln)))
        return pairs


def ipsec_tunnel(spec: IpsecTunnelSpec, backend: IpsecBackend, *, policy: TunnelPolicy,
                 lifetimes: Lifetimes, schedule: KeySchedule | None = None,
                 emit: TunnelEventSink | None = None) -> Tunnel:
    """An IPsec :class:`Tunnel`: the generation manager over an :class:`IpsecDriver`."""
    return Tunnel(IpsecDriver(spec, backend), policy=policy, lifetimes=lifetimes,
                  schedule=schedule, emit=emit)


class IpsecDriver:
    """XFRM policies and SAs of one tunnel (kernel operations only)."""

    kind = "ipsec"
    sas_outlive_daemon = True     # every SA carries a kernel hard lifetime

    def __init__(self, spec: IpsecTunnelSpec, backend: IpsecBackend) -> None:
        self.spec = spec
        self.backend = backend
        self._next_out_reqid = spec.reqid_base + 1
        self._out_policies: list[PolicySpec] = []

    @property
    def tunnel_id(self) -> str:
        return self.spec.tunnel_id

    # ---- policies ---------------------------------------------------------
    def _policy(self, sel: Selector, direction: Direction, template: Template | None,
                action: PolicyAction = PolicyAction.ALLOW) -> PolicySpec:
        s = self.spec
        return PolicySpec(selector=sel, direction=direction, action=action, template=template,
                          priority=s.priority, mark=s.mark, if_id=s.if_id)

    def _in_template(self) -> Template:
        s = self.spec
        return Template(src=s.remote, dst=s.local, reqid=s.reqid_base, mode=s.mode)

    def _owned(self, reqid: int) -> bool:
        return self.spec.reqid_base <= reqid < self.spec.reqid_base + self.spec.reqid_span

    def _weaker_out(self, have: PolicySpec, our_out_reqids: set[int]) -> str | None:
        """Why an existing ``out`` policy is weaker than ours, or None when
        it may be adopted: a BLOCK, or a required template naming our
        endpoints and a reqid of ours that an SA in the kernel carries
        (issue 17 finding 1; RFC 4301 4.4.1: the SPD decides PROTECT,
        BYPASS or DISCARD, and a BYPASS here would send in clear)."""
        if have.action is PolicyAction.BLOCK:
            return None
        tmpl = have.template
        if tmpl is None:
            return "ALLOW without a template (bypass: cleartext)"
        if tmpl.optional:
            return f"template reqid {tmpl.reqid} is optional (cleartext without an SA)"
        if not self._owned(tmpl.reqid):
            return f"template reqid {tmpl.reqid} is outside our range"
        if tmpl.reqid not in our_out_reqids:
            return f"template reqid {tmpl.reqid} has no SA in the kernel"
        s = self.spec
        if (tmpl.src, tmpl.dst, tmpl.mode, tmpl.proto) != (s.local, s.remote, s.mode,
                                                            socket.IPPROTO_ESP):
            return "template names other endpoints, mode or protocol"
        return None

    def setup(self, now: float) -> SetupReport:
        """Install the fail-closed policies; report SAs a previous run left.

        An existing policy is kept only if it is at least as strict as ours
        (:meth:`_weaker_out`; ``in``/``fwd`` must equal ours); otherwise it
        is replaced in place by XFRM_MSG_UPDPOLICY, so there is never a
        moment without a policy, and the replacement is reported."""
        return self.setup_from(self.snapshot(), now)

    def setup_from(self, snapshot: KernelSnapshot, now: float) -> SetupReport:
        existing = snapshot.policies
        found = [st for r in range(self.spec.reqid_base, self.spec.reqid_base
                                   + self.spec.reqid_span)
                 for st in snapshot.sas_by_reqid.get(r, ())]
        our_out_reqids = {st.reqid for st in found if st.reqid != self.spec.reqid_base}
        replaced: list[tuple[str, str]] = []
        self._out_policies = []
        for out_sel, in_sel in self.spec.selectors():
            blocked = self._policy(out_sel, Direction.OUT, None, PolicyAction.BLOCK)
            have = existing.get((out_sel, Direction.OUT, self.spec.mark, self.spec.if_id))
            if have is None:
                self.backend.install_policy(blocked)
                self._out_policies.append(blocked)
            elif (why := self._weaker_out(have, our_out_reqids)) is not None:
                self.backend.update_policy(blocked)     # block first, in place
                self._out_policies.append(blocked)
                replaced.append((f"out policy {out_sel.src} -> {out_sel.dst}", why))
            else:
                self._out_policies.append(have)  # keeps forwarding via adopted SAs
            wanted = [(in_sel, Direction.IN)]
            if self.spec.mode is Mode.TUNNEL:
                wanted.append((in_sel, Direction.FWD))
            for sel, d in wanted:
                want = self._policy(sel, d, self._in_template())
                have = existing.get((sel, d, self.spec.mark, self.spec.if_id))
                if have is None:
                    self.backend.install_policy(want)
                elif (have.action, have.template) != (want.action, want.template):
                    # e.g. the reqid changed in the config, or a weaker leftover:
                    # XFRM_MSG_UPDPOLICY re-asserts ours in place
                    self.backend.update_policy(want)
                    replaced.append((f"{d.name.lower()} policy {sel.src} -> {sel.dst}",
                                     f"{have.action.name} with template {have.template}"
                                     " differs from ours"))
        return self._adoptable(found, now, tuple(replaced))

    def _adoptable(self, found: list[SaState], now: float,
                   replaced: tuple[tuple[str, str], ...]) -> SetupReport:
        """SAs in our reqid range from a previous run, for generation 0."""
        records = tuple(
            SaRecord("in" if st.reqid == self.spec.reqid_base else "out", st.sa_id.spi,
                     st.reqid, now, st.sa_id) for st in found)
        out_reqids = {p.template.reqid for p in self._out_policies if p.template}
        sending = next((r.reqid for r in records
                        if r.direction == "out" and r.reqid in out_reqids), None)
        if sending is not None:
            nxt = sending + 1
            self._next_out_reqid = nxt if self._owned(nxt) else self.spec.reqid_base + 1
            # the SA the policy sends under is the adopted generation's outbound
            records = tuple(sorted(records, key=lambda r: r.reqid != sending))
        return SetupReport(adopted=records, sending_reqid=sending, replaced=replaced)

    # ---- SAs ----------------------------------------------------------------
    def allocate_spi(self, inbound_in_use: frozenset[int]) -> int:
        # the reserved (larval) SA carries our inbound reqid: if the exchange
        # dies with us, failsafe's reqid sweep removes it too
        low, high = self.spec.spi_range
        return self.backend.allocate_spi(self.spec.remote, self.spec.local, low=low, high=high,
                                         reqid=self.spec.reqid_base)

    def _sa_spec(self, key: SecretBytes, reqid: int, out_sel: Selector, sa: NewSa) -> SaSpec:
        s = self.spec
        lifetime = kernel_lifetime(sa.lifetimes, sa.now, sa.hard_at)
        selector = out_sel if s.mode is Mode.TRANSPORT else None
        return SaSpec(key=key, reqid=reqid, mode=s.mode, selector=selector, aead=s.aead,
                      replay_window=s.replay_window, esn=s.esn, lifetime=lifetime,
                      encap=s.encap)

    def add_inbound(self, sa: NewSa) -> SaRecord:
        rec, op = self.inbound_op(sa)
        self.backend.install_inbound(op.sa_id, op.spec)
        return rec

    def _take_out_reqid(self, used: frozenset[int]) -> int:
        s = self.spec
        for _ in range(s.reqid_span):
            reqid = self._next_out_reqid
            self._next_out_reqid += 1
            if self._next_out_reqid >= s.reqid_base + s.reqid_span:
                self._next_out_reqid = s.reqid_base + 1
            if reqid not in used:
                return reqid
        raise TunnelError("allocate_reqid", errno.ENOSPC, f"reqid range of {s.tunnel_id} in use")

    def add_outbound(self, sa: NewSa, reqids_in_use: frozenset[int]) -> SaRecord:
        rec, op = self.outbound_op(sa, reqids_in_use)
        self.backend.install_outbound(op.sa_id, op.spec)
        return rec

    def switch_to(self, outbound: SaRecord) -> None:
        s = self.spec
        tmpl = Template(src=s.local, dst=s.remote, reqid=outbound.reqid, mode=s.mode)
        done: list[PolicySpec] = []
        try:
            for i, pol in enumerate(self._out_policies):
                new = replace(pol, action=PolicyAction.ALLOW, template=tmpl,
                              priority=s.priority)
                self.backend.switch_outbound(new)   # XFRM_MSG_UPDPOLICY: atomic per policy
                done.append(pol)
                self._out_policies[i] = new
        except TunnelError:
            for i, old in enumerate(done):           # point back whatever already moved
                try:
                    self.backend.switch_outbound(old)
                    self._out_policies[i] = old
                except TunnelError:
                    pass
            raise

    def block_outbound(self) -> None:
        for i, pol in enumerate(self._out_policies):
            blocked = replace(pol, action=PolicyAction.BLOCK, template=None)
            self.backend.update_policy(blocked)   # XFRM_MSG_UPDPOLICY: in place
            self._out_policies[i] = blocked

    def remove_sa(self, rec: SaRecord) -> None:
        self.backend.remove_sa(_sa_id(rec))

    def neutralize(self, rec: SaRecord) -> tuple[str, bool]:
        # XFRM has no "inactive" SA: the kernel hard lifetime bounds it, and
        # blocking the out policies keeps anything from being sent under it.
        return f"{rec.direction} SA {rec.spi:#010x} cannot be deactivated", False

    def poll(self, records: list[SaRecord]) -> CounterReading:
        return self.counters_from(records, self.read_counters(records))

    def read_counters(self, records: Sequence[SaRecord]) -> list[SaCounters | TunnelError]:
        return self.backend.read_counters([_sa_id(rec) for rec in records])

    def counters_from(self, records: Sequence[SaRecord],
                      states: Sequence[SaCounters | TunnelError]) -> CounterReading:
        totals = {"bytes_out": 0, "bytes_in": 0, "packets_out": 0, "packets_in": 0}
        observed: list[tuple[str, SaCounters]] = []
        for rec, st in zip(records, states, strict=True):
            if isinstance(st, TunnelError):
                if st.errno == errno.ESRCH:
                    continue
                raise st
            totals[f"bytes_{rec.direction}"] += st.bytes
            totals[f"packets_{rec.direction}"] += st.packets
            observed.append((rec.direction, st))
        return CounterReading(counters=totals, observed=tuple(observed))

    def describe(self) -> dict[str, object]:
        return {}

    def teardown(self) -> bool:
        """Remove our policies (the SAs went with their generations)."""
        return self.teardown_from(self.snapshot())

    def teardown_from(self, snapshot: KernelSnapshot) -> bool:
        first: TunnelError | None = None
        s = self.spec
        for sel in {sel for pair in s.selectors() for sel in pair}:
            for d in Direction:
                pol = snapshot.policies.get((sel, d, s.mark, s.if_id))
                if pol is None:
                    continue
                try:
                    self.backend.remove_policy(pol)
                except TunnelError as exc:
                    first = first or exc
        if first is not None:
            raise first
        return True

    # ---- the batched form (BatchOps) ------------------------------------------
    @property
    def batch(self) -> IpsecDriver:
        return self

    @property
    def group(self) -> object:
        return self.backend

    def apply(self, ops: Sequence[IpsecOp]) -> list[TunnelError | None]:
        return self.backend.apply(ops)

    def spi_request(self) -> AllocateSpi:
        # as allocate_spi: the larval SA carries our inbound reqid
        low, high = self.spec.spi_range
        return AllocateSpi(self.spec.remote, self.spec.local, reqid=self.spec.reqid_base,
                           low=low, high=high)

    def allocate_spis(self, requests: Sequence[AllocateSpi]) -> list[int | TunnelError]:
        return self.backend.allocate_spis(requests)

    def snapshot(self) -> KernelSnapshot:
        """One policy dump and one SA dump, indexed (see KernelSnapshot)."""
        by_reqid: dict[int, list[SaState]] = {}
        for st in self.backend.list_sas():
            by_reqid.setdefault(st.reqid, []).append(st)
        return KernelSnapshot(
            policies={(p.selector, p.direction, p.mark, p.if_id): p
                      for p in self.backend.list_policies()},
            sas_by_reqid=by_reqid)

    def inbound_op(self, sa: NewSa) -> tuple[SaRecord, InstallSa]:
        s = self.spec
        sa_id = SaId(src=s.remote, dst=s.local, spi=sa.spi, mark=s.mark, if_id=s.if_id)
        key = sa.schedule.esp_key(sa.session, s.tunnel_id, sa.direction, sa.spi, sa.generation)
        spec = self._sa_spec(key, s.reqid_base, s.selectors()[0][1], sa)
        return SaRecord("in", sa.spi, s.reqid_base, sa.now, sa_id), InstallSa(sa_id, spec, True)

    def outbound_op(self, sa: NewSa, reqids_in_use: frozenset[int]
                    ) -> tuple[SaRecord, InstallSa]:
        s = self.spec
        reqid = self._take_out_reqid(reqids_in_use)
        sa_id = SaId(src=s.local, dst=s.remote, spi=sa.spi, mark=s.mark, if_id=s.if_id)
        key = sa.schedule.esp_key(sa.session, s.tunnel_id, sa.direction, sa.spi, sa.generation)
        spec = self._sa_spec(key, reqid, s.selectors()[0][0], sa)
        return SaRecord("out", sa.spi, reqid, sa.now, sa_id), InstallSa(sa_id, spec, False)

    def _switched(self, outbound: SaRecord) -> list[PolicySpec]:
        s = self.spec
        tmpl = Template(src=s.local, dst=s.remote, reqid=outbound.reqid, mode=s.mode)
        return [replace(pol, action=PolicyAction.ALLOW, template=tmpl, priority=s.priority)
                for pol in self._out_policies]

    def switch_ops(self, outbound: SaRecord) -> list[IpsecOp]:
        # XFRM_MSG_UPDPOLICY: atomic per policy
        return [UpdatePolicy(p) for p in self._switched(outbound)]

    def switch_done(self, outbound: SaRecord, results: Sequence[TunnelError | None]
                    ) -> TunnelError | None:
        failed = next((r for r in results if r is not None), None)
        if failed is None:
            self._out_policies = self._switched(outbound)
            return None
        for old, res in zip(self._out_policies, results, strict=True):
            if res is None:           # this one moved: point it back
                # if that fails too, the policy names an SA the tunnel then
                # removes: its traffic drops (fail closed), never goes clear
                with contextlib.suppress(TunnelError):
                    self.backend.switch_outbound(old)
        return failed

    def remove_op(self, rec: SaRecord) -> IpsecOp:
        return RemoveSa(_sa_id(rec))


def kernel_lifetime(lt: Lifetimes, now: float, hard_at: float | None) -> Lifetime:
    """The kernel's lifetimes for an SA of a generation installed at ``now``
    whose hard deadline is ``hard_at`` (RFC 4301 4.4.2.1: soft, then hard).

    The kernel enforces the hard one even if this daemon is dead or stopped,
    but it counts whole seconds from the SA's own ``curlft.add_time``
    (net/xfrm/xfrm_state.c ``xfrm_timer_handler``; its timer runs in whole
    seconds from the install). An SA installed after its generation began
    (the outbound one waits for the peer's confirmation) would outlive the
    generation if given the full lifetime. So the kernel gets the time the
    generation has left, less ``hard_margin`` (the kernel's clock starts at
    the real install, which comes a netlink round trip after ``now``),
    rounded *down*, never above the generation's lifetime and never 0 (XFRM
    reads 0 as "no limit"): the kernel ends the SA by the deadline on its
    own.

    No soft *time* lifetime in the kernel (0): the tunnels' own timers ask
    for the rekey and nobody listens for the kernel's soft EXPIRE, and a
    kernel soft lifetime makes the hard one movable. xfrm_timer_handler,
    finding the hard lifetime passed while it had last armed itself for the
    soft one (``XFRM_SOFT_EXPIRE``, "setting a new date could trigger
    this"), does not expire the SA but moves ``add_time`` so that it lives
    ``hard - saved_tmo`` seconds more. A timer run late (a starved machine)
    or a wall clock stepped forward then kept an SA 12 s into a 12 s
    lifetime for 5 s more (docs/faults.md). Soft byte limits stay: the
    kernel checks those per packet, not in that timer."""
    deadline = now + lt.hard_seconds if hard_at is None else hard_at
    left = min(deadline - now, lt.hard_seconds) - lt.hard_margin
    return Lifetime(soft_bytes=lt.soft_bytes, hard_bytes=lt.hard_bytes,
                    soft_add_seconds=0, hard_add_seconds=max(1, math.floor(left)))


def _sa_id(rec: SaRecord) -> SaId:
    if not isinstance(rec.handle, SaId):
        raise LocalProtocolError(f"IPsec SA record without an SaId: {rec.describe()}")
    return rec.handle
