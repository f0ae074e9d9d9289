"""Tunnel manager: every :class:`~qkdgate.tunnels.tunnel.Tunnel` of the daemon.

Theory of operation: :class:`TunnelManager` holds the tunnels by id and
routes the protocol's per-peer events to them (SPI reservations, inbound
and outbound installs, retirement), batching the kernel requests of every
IPsec tunnel of a peer into one pipelined netlink batch per step (issue 19).
What one tunnel does with a generation -- fail closed first,
make-before-break, lifetimes, the key policy -- is in
:mod:`qkdgate.tunnels.tunnel`.

The module is sans-IO in the aioquic sense: the caller passes ``now``
(monotonic seconds) and calls :meth:`TunnelManager.handle_timer` at
:meth:`TunnelManager.get_timer`; only the injected backends touch the kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qkdgate.errors import LocalProtocolError, QkdgateError, TunnelError
from qkdgate.interfaces import AllocateSpi, IpsecOp
from qkdgate.tunnels.driver import (
    BatchOps,
    KernelSnapshot,
    SaRecord,
)
from qkdgate.tunnels.tunnel import (
    Generation,
    GenerationRefused,
    Tunnel,
)

if TYPE_CHECKING:
    from qkdgate.keymix.combiner import SessionSecret

log = logging.getLogger("qkdgate.tunnels")


# --------------------------------------------------------------------------
# all tunnels of the daemon
# --------------------------------------------------------------------------

def _batch_of(tunnel: Tunnel) -> BatchOps:
    batch = tunnel.driver.batch
    if batch is None:
        raise LocalProtocolError(f"tunnel {tunnel.tunnel_id} does not batch")
    return batch


@dataclass
class TunnelManager:
    """Holds every :class:`Tunnel`; routes protocol events to them by id."""

    tunnels: dict[str, Tunnel] = field(default_factory=dict)

    def add(self, tunnel: Tunnel) -> None:
        if tunnel.tunnel_id in self.tunnels:
            raise ValueError(f"duplicate tunnel id {tunnel.tunnel_id!r}")
        self.tunnels[tunnel.tunnel_id] = tunnel

    def get(self, tunnel_id: str) -> Tunnel:
        """The tunnel named ``tunnel_id``; an unknown id is our bug (the
        protocol names only configured tunnels): LocalProtocolError."""
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None:
            raise LocalProtocolError(f"unknown tunnel id {tunnel_id!r}")
        return tunnel

    def allocate_spis(self, tunnel_ids: Sequence[str]) -> dict[str, int]:
        """One inbound SPI per tunnel, for an exchange of a peer. Tunnels
        whose drivers batch (:class:`BatchOps`) reserve theirs in one
        pipelined batch per backend (issue 19: one round trip per tunnel
        before). The first failure raises; SPIs already reserved stay larval
        until the kernel drops them (net.core.xfrm_acq_expires), as an
        exchange that dies after its allocation leaves them."""
        out: dict[str, int] = {}
        pending: dict[int, tuple[BatchOps, list[tuple[str, AllocateSpi]]]] = {}
        for tid in tunnel_ids:
            tunnel = self.get(tid)
            batch = tunnel.driver.batch
            if batch is None:
                out[tid] = tunnel.allocate_spi()
            else:
                pending.setdefault(id(batch.group), (batch, []))[1].append(
                    (tid, batch.spi_request()))
        for batch, items in pending.values():
            for (tid, _req), res in zip(items, batch.allocate_spis([r for _t, r in items]),
                                        strict=True):
                if isinstance(res, TunnelError):
                    raise res
                out[tid] = res
        return {tid: out[tid] for tid in tunnel_ids}

    def install_inbound(self, generation: int, session: SessionSecret, role: str,
                        spis: Mapping[str, int], now: float) -> None:
        """Install one generation's inbound SAs on every tunnel of a peer.

        A tunnel whose policy refuses the generation is skipped (it keeps
        its current SAs to their hard lifetime), so a ``pqc-fallback``
        tunnel still rekeys beside a ``hybrid-required`` one when QKD is
        down. Raises if every tunnel refused. A kernel failure is
        all-or-nothing: what this call installed is removed and it re-raises.
        Tunnels whose drivers batch (:class:`BatchOps`) send their SAs in one
        pipelined batch per backend.
        """
        done: list[Tunnel] = []
        refused: list[GenerationRefused] = []
        failed: QkdgateError | None = None
        pending: dict[int, tuple[BatchOps, list[tuple[Tunnel, Generation, SaRecord,
                                                      IpsecOp, bool]]]] = {}
        try:
            for tid, spi in spis.items():
                tunnel = self.get(tid)
                batch = tunnel.driver.batch
                if batch is None:
                    try:
                        tunnel.install_inbound(generation, session, role, spi, now)
                    except GenerationRefused as exc:
                        refused.append(exc)
                        continue
                    done.append(tunnel)
                    continue
                try:
                    plan = tunnel.begin_inbound(generation, session, role, spi, now)
                    if plan is None:
                        done.append(tunnel)
                        continue
                    gen, sa, fallback = plan
                    record, op = batch.inbound_op(sa)
                except GenerationRefused as exc:
                    tunnel._fail("install_inbound", exc)
                    refused.append(exc)
                    continue
                except QkdgateError as exc:
                    tunnel._fail("install_inbound", exc)
                    raise
                pending.setdefault(id(batch.group), (batch, []))[1].append(
                    (tunnel, gen, record, op, fallback))
            for batch, items in pending.values():
                results = batch.apply([op for _t, _g, _r, op, _f in items])
                for (tunnel, gen, record, _op, fallback), err in zip(items, results,
                                                                      strict=True):
                    if err is None:
                        tunnel.inbound_installed(gen, record, session, fallback)
                        done.append(tunnel)
                    else:
                        tunnel._fail("install_inbound", err)
                        failed = failed or err
            if failed is not None:
                raise failed
        except QkdgateError:
            # what this call installed goes, and so do generations it only planned
            planned = [it[0] for _b, items in pending.values() for it in items]
            self.retire(list(dict.fromkeys(t.tunnel_id for t in done + planned)),
                        generation, now)
            raise
        if refused and not done:
            raise refused[0]
        log.debug("generation %d: inbound SAs on %d tunnel(s)", generation, len(done))

    def install_outbound(self, generation: int, session: SessionSecret, role: str,
                         spis: Mapping[str, int], now: float) -> None:
        """Switch every tunnel of a peer to ``generation``: each tunnel
        fails closed alone (the others still switch). Batching tunnels send
        their outbound SAs in one batch, then every policy switch to them in
        a second (a switch must never point at an SA that failed)."""
        errors: list[BaseException] = []
        switched = 0
        pending: dict[int, tuple[BatchOps, list[tuple[Tunnel, Generation, SaRecord,
                                                      IpsecOp, bool]]]] = {}
        for tid, spi in spis.items():
            tunnel = self.get(tid)
            batch = tunnel.driver.batch
            try:
                if batch is None:
                    tunnel.install_outbound(generation, session, role, spi, now)
                    switched += 1
                    continue
                try:
                    plan = tunnel.begin_outbound(generation, session, role, spi, now)
                    if plan is None:
                        switched += 1
                        continue
                    gen, sa, in_use, fallback = plan
                    record, op = batch.outbound_op(sa, in_use)
                except QkdgateError as exc:
                    tunnel._fail("install_outbound", exc)
                    raise
                pending.setdefault(id(batch.group), (batch, []))[1].append(
                    (tunnel, gen, record, op, fallback))
            except GenerationRefused as exc:   # policy: this tunnel stays on its old SAs
                errors.append(exc)
            except QkdgateError as exc:   # other tunnels still switch: each fails closed alone
                errors.insert(0, exc)
        for batch, items in pending.values():
            installed = []
            for item, err in zip(items, batch.apply([it[3] for it in items]), strict=True):
                tunnel, gen, record = item[0], item[1], item[2]
                if err is None:
                    gen.outbound = record
                    installed.append(item)
                else:
                    tunnel._fail("install_outbound", err)
                    errors.insert(0, err)
            # each tunnel's own driver knows its policies: ops and outcome are its
            drivers = [_batch_of(item[0]) for item in installed]
            per_tunnel = [d.switch_ops(item[2]) for d, item in zip(drivers, installed,
                                                                   strict=True)]
            flat = batch.apply([op for ops in per_tunnel for op in ops])
            at = 0
            unused: list[tuple[Tunnel, Generation, SaRecord]] = []
            for (tunnel, gen, record, _op, fallback), ops, drv in zip(
                    installed, per_tunnel, drivers, strict=True):
                results, at = flat[at:at + len(ops)], at + len(ops)
                previous = tunnel.active
                err = drv.switch_done(record, results)
                if err is None:
                    tunnel.outbound_switched(gen, session, fallback, now)
                    switched += 1
                    if previous is not None and previous is not gen \
                            and previous.outbound is not None:
                        unused.append((tunnel, previous, previous.outbound))
                else:
                    tunnel.switch_failed(gen, record)
                    tunnel._fail("install_outbound", err)
                    errors.insert(0, err)
            self._remove_unused_outbound(batch, unused)
        if errors and (switched == 0 or not isinstance(errors[0], GenerationRefused)):
            raise errors[0]

    @staticmethod
    def _remove_unused_outbound(batch: BatchOps,
                                unused: list[tuple[Tunnel, Generation, SaRecord]]) -> None:
        """The previous generation's outbound SAs, in one batch right after
        the switches: the out policies now name the new reqid, and the kernel
        finds an outbound SA only through its policy's template reqid
        (net/xfrm/xfrm_state.c ``xfrm_state_find``), so no packet can use
        them; keeping their keys for the grace would only prolong the keys'
        life (and kept a one-tunnel rekey 50 ms longer, issue 19). The
        previous inbound SAs stay for the grace (the peer's packets sent
        before its own switch). A removal that fails
        leaves the record in its generation: retiring it tries again."""
        if not unused:
            return
        ops = [_batch_of(tunnel).remove_op(rec) for tunnel, _gen, rec in unused]
        for (tunnel, gen, rec), err in zip(unused, batch.apply(ops), strict=True):
            if tunnel._removal_settled(err):
                gen.forget(rec)
                log.debug("tunnel %s: generation %d outbound SA %#x removed at the switch",
                          tunnel.tunnel_id, gen.number, rec.spi,
                          extra={"tunnel": tunnel.tunnel_id})

    def retire(self, tunnel_ids: list[str], generation: int, now: float) -> None:
        """RetireGeneration for many tunnels: batching tunnels remove their
        SAs in one batch per backend, then each settles its own records."""
        removed: dict[int, TunnelError | None] = {}
        pending: dict[int, tuple[BatchOps, list[tuple[SaRecord, IpsecOp]]]] = {}
        for tid in tunnel_ids:
            tunnel = self.get(tid)
            batch, gen = tunnel.driver.batch, tunnel.retirable(generation)
            if batch is not None and gen is not None:
                pending.setdefault(id(batch.group), (batch, []))[1].extend(
                    (rec, batch.remove_op(rec)) for rec in gen.records())
        for batch, items in pending.values():
            for (rec, _op), err in zip(items, batch.apply([op for _r, op in items]),
                                       strict=True):
                removed[id(rec)] = err
        for tid in tunnel_ids:
            self.get(tid).retire(generation, now, removed)

    def setup(self, now: float) -> None:
        """Set up every tunnel (:meth:`Tunnel.setup`), fail closed first.
        Tunnels sharing a batching backend read the kernel once between
        them (one policy dump, one SA dump, indexed): linear in N."""
        snapshots: dict[int, KernelSnapshot] = {}
        for tunnel in self.tunnels.values():
            batch = tunnel.driver.batch
            snap = None
            if batch is not None:
                snap = snapshots.get(id(batch.group))
                if snap is None:
                    snap = snapshots[id(batch.group)] = batch.snapshot()
            tunnel.setup(now, snap)
        log.info("%d tunnel(s) set up", len(self.tunnels))

    def shutdown(self, teardown: bool, now: float = 0.0) -> None:
        """:meth:`Tunnel.shutdown` for every tunnel (one kernel read per
        batching backend when tearing down); a failing tunnel does not stop
        the others."""
        snapshots: dict[int, KernelSnapshot] = {}
        for tunnel in self.tunnels.values():
            batch = tunnel.driver.batch
            snap = None
            try:
                if teardown and batch is not None:
                    snap = snapshots.get(id(batch.group))
                    if snap is None:
                        snap = snapshots[id(batch.group)] = batch.snapshot()
                tunnel.shutdown(teardown, now, snap)
            except QkdgateError as exc:
                log.error("tunnel %s: shutdown: %s", tunnel.tunnel_id, exc)

    def get_timer(self) -> float | None:
        times = [t for t in (x.get_timer() for x in self.tunnels.values()) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> dict[str, list[str]]:
        """Every tunnel's due SAs stop carrying traffic first, then each
        tunnel blocks or retires (issue 10: blocking due tunnels one after
        the other, each several round trips, kept a MACsec SA usable 92 ms
        past its hard lifetime under load)."""
        # Only tunnels with a deadline passed (TunnelTimers caches each
        # tunnel's next one): the loop wakes on every step of every peer's
        # exchange, and scanning all tunnels each time made a rekey of 100
        # peers x 10 tunnels quadratic (issue 19).
        due = [t for t in self.tunnels.values() if t.due(now)]
        for t in due:
            t.deactivate_expired(now)
        return {t.tunnel_id: r for t in due if (r := t.handle_timer(now))}

    def poll(self, now: float) -> dict[str, list[str]]:
        """Every tunnel's kernel counters (:meth:`Tunnel.poll`); returns the
        rekey reasons by tunnel. Tunnels sharing a batching backend read
        theirs together (:meth:`BatchOps.read_counters`, for XFRM one SA
        dump; issue 19: a request and a full decode per SA made the
        10-second poll of 1,000 tunnels a third of the daemons' CPU in the
        lab during a rekey)."""
        out: dict[str, list[str]] = {}
        pending: dict[int, tuple[BatchOps, list[tuple[Tunnel, list[SaRecord]]]]] = {}
        for t in self.tunnels.values():
            batch = t.driver.batch
            if batch is None:
                reasons = t.poll(now)
            elif records := t.active_records():
                pending.setdefault(id(batch.group), (batch, []))[1].append((t, records))
                continue
            else:
                continue
            if reasons:
                out[t.tunnel_id] = reasons
        for batch, items in pending.values():
            records = [rec for _t, recs in items for rec in recs]
            try:
                states = batch.read_counters(records)
            except TunnelError as exc:        # the whole batch: each tunnel reports it
                states = [exc] * len(records)
            at = 0
            for t, recs in items:
                reasons = t.poll_read(now, recs, states[at:at + len(recs)])
                at += len(recs)
                if reasons:
                    out[t.tunnel_id] = reasons
        return out

    def status(self, now: float) -> list[dict[str, object]]:
        return [t.status(now) for t in self.tunnels.values()]
