"""MACsec (IEEE 802.1AE) tunnels for the tunnel manager.

Theory of operation: one :class:`MacsecTunnel` drives one macsec netdevice
on a parent Ethernet port, with one RX secure channel for the peer's SCI.
A generation's "SPI" is an association number (AN, 0..3): the *receiver*
chooses it for the SA it will accept (rotating, never one still in use), and
the transmitter installs its TX SA on that AN. Hitless rotation follows
IEEE 802.1X-2020 12.x / 802.1AE-2018 10.7.x: RX SA first on both sides,
then the TX SA, then ``encoding_sa`` moves to the new AN (one netlink
update), and after a grace period the old SAs are deactivated and deleted
(the kernel refuses to delete an active SA).

Fail closed: the link validates strictly, so without an RX SA every frame
is dropped, and without an active encoding TX SA nothing is sent. MACsec has
no kernel lifetimes, so the hard lifetime is enforced only by this module,
and on exit the SAs are removed by default (unlike XFRM, where the kernel
expires SAs on its own). The packet number is a second soft limit
(IEEE 802.1AE-2018 10.6.2: a PN must never repeat under one SAK): at
``pn_threshold`` of its range (32 bits, or 64 for XPN) we ask for a rekey.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

from qkdgate.errors import TunnelError
from qkdgate.tunnels.events import SaStaleRemoved, TunnelEventSink
from qkdgate.tunnels.manager import (Generation, KeySchedule, Lifetimes, SaRecord, Tunnel,
                                            TunnelPolicy)
from qkdgate.interfaces import MacsecBackend, MacsecCipher, MacsecLinkSpec, MacsecSaSpec

log = logging.getLogger("qkdgate.tunnels")

@dataclass(frozen=True, slots=True)
class MacsecTunnelSpec:
    tunnel_id: str
    link: MacsecLinkSpec
    peer_sci: int
    pn_threshold: float = 0.75      # rekey at this fraction of the PN space

    def __post_init__(self) -> None:
        if not 0 < self.pn_threshold <= 1:
            raise ValueError("pn_threshold must be in (0, 1]")
        if not 0 < self.peer_sci < 1 << 64:
            raise ValueError("peer SCI must be a 64-bit value (MAC address << 16 | port)")


class MacsecTunnel(Tunnel):
    kind = "macsec"

    def __init__(self, spec: MacsecTunnelSpec, backend: MacsecBackend, *, policy: TunnelPolicy,
                 lifetimes: Lifetimes, schedule: KeySchedule | None = None,
                 emit: TunnelEventSink | None = None) -> None:
        super().__init__(spec.tunnel_id, policy=policy, lifetimes=lifetimes, schedule=schedule,
                         emit=emit)
        self.spec = spec
        self.backend = backend
        self.local_sci: int | None = None
        self._created = False
        self._last_an = 3            # the first AN handed out is 0

    @property
    def link(self) -> str:
        return self.spec.link.name

    def setup(self, now: float) -> None:
        existed = False
        try:
            self.backend.create_link(self.spec.link)
            self._created = True
        except TunnelError as exc:
            if exc.errno != errno.EEXIST:
                raise
            existed = True
        self.local_sci = self.backend.link_sci(self.link)
        try:
            self.backend.add_rx_sc(self.link, self.spec.peer_sci)
        except TunnelError as exc:
            if exc.errno != errno.EEXIST:
                raise
        if existed:
            # A previous run's link (it crashed: a clean exit removes them).
            # Its SAs carry keys whose age nobody knows any more, and MACsec
            # has no kernel lifetime to end them: remove, block, re-key.
            self._remove_stale()
        self.backend.set_link_up(self.link, True)
        self.state = "blocked"

    def _remove_stale(self) -> None:
        removed = 0
        for an in range(4):
            for remove, deactivate in (
                    (lambda: self.backend.remove_tx_sa(self.link, an),
                     lambda: self.backend.set_tx_sa_active(self.link, an, False)),
                    (lambda: self.backend.remove_rx_sa(self.link, self.spec.peer_sci, an),
                     lambda: self.backend.set_rx_sa_active(self.link, self.spec.peer_sci, an,
                                                           False))):
                try:
                    remove()
                except TunnelError as exc:
                    if exc.errno != errno.EBUSY:
                        continue          # ENODEV: nothing on this AN
                    deactivate()          # the kernel refuses to delete an active SA
                    remove()
                removed += 1
        if removed:
            log.warning("tunnel %s: removed %d stale MACsec SA(s) left by a previous run",
                        self.tunnel_id, removed, extra={"tunnel": self.tunnel_id})
            self.emit(SaStaleRemoved(self.tunnel_id, removed))

    def allocate_spi(self) -> int:
        used = {g.inbound.spi for g in self.generations.values() if g.inbound is not None}
        for step in range(1, 5):
            an = (self._last_an + step) % 4
            if an not in used:
                self._last_an = an
                return an
        raise TunnelError("allocate_an", errno.EBUSY, "all four ANs in use")

    def _keys(self, gen: Generation, session: Any, direction: str, sci: int, an: int) -> Any:
        return self.schedule.macsec_keys(session, self.tunnel_id, direction, sci, an, gen.number,
                                         self.spec.link.cipher)

    def _sa(self, keys: Any, an: int) -> MacsecSaSpec:
        xpn = self.spec.link.cipher is MacsecCipher.GCM_AES_XPN_256
        return MacsecSaSpec(an=an, key=keys.sak, keyid=keys.keyid, pn=1, active=True,
                            ssci=keys.ssci if xpn else None, salt=keys.salt if xpn else None)

    def _add_inbound(self, gen: Generation, session: Any, direction: str, spi: int,
                     now: float) -> SaRecord:
        keys = self._keys(gen, session, direction, self.spec.peer_sci, spi)
        self.backend.add_rx_sa(self.link, self.spec.peer_sci, self._sa(keys, spi))
        return SaRecord("in", spi, 0, now, (self.spec.peer_sci, spi))

    def _add_outbound(self, gen: Generation, session: Any, direction: str, spi: int,
                      now: float) -> SaRecord:
        if self.local_sci is None:
            raise TunnelError("add_tx_sa", errno.ENODEV, f"{self.link} not set up")
        if not 0 <= spi <= 3:
            raise TunnelError("add_tx_sa", errno.EINVAL, f"AN {spi} out of range")
        keys = self._keys(gen, session, direction, self.local_sci, spi)
        self.backend.add_tx_sa(self.link, self._sa(keys, spi))
        return SaRecord("out", spi, 0, now, (self.local_sci, spi))

    def _switch_to(self, gen: Generation) -> None:
        assert gen.outbound is not None
        self.backend.set_encoding_sa(self.link, gen.outbound.spi)

    def _block_outbound(self) -> None:
        pass  # every TX SA is gone: the kernel drops frames with no active encoding SA

    def _remove_sa(self, rec: SaRecord) -> None:
        sci, an = rec.handle
        if rec.direction == "out":
            self.backend.set_tx_sa_active(self.link, an, False)
            self.backend.remove_tx_sa(self.link, an)
        else:
            self.backend.set_rx_sa_active(self.link, sci, an, False)
            self.backend.remove_rx_sa(self.link, sci, an)

    def _poll_counters(self) -> str | None:
        act = self.active
        if act is None or act.outbound is None:
            return None
        st = self.backend.query_tx_sa(self.link, act.outbound.spi)
        self._observe("out", st)
        self.counters = {**self.counters, "bytes_out": st.octets, "packets_out": st.packets}
        bits = 64 if self.spec.link.cipher is MacsecCipher.GCM_AES_XPN_256 else 32
        if st.next_pn >= int(self.spec.pn_threshold * (1 << bits)):
            return "pn_exhaustion"
        soft = self.lifetimes.soft_bytes
        if soft and st.octets >= soft:
            return "soft_bytes"
        return None

    def shutdown(self, teardown: bool) -> None:
        """Remove every SA (no kernel lifetimes would ever end them); keep
        the strict link so traffic blocks, unless ``teardown`` also deletes
        a link we created."""
        for gen in list(self.generations.values()):
            self._drop_generation(gen)
        self.active = None
        self.state = "blocked"
        if teardown and self._created:
            try:
                self.backend.destroy_link(self.link)
                self.state = "down"
            except TunnelError as exc:
                self._fail("destroy_link", exc)
