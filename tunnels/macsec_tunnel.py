"""MACsec (IEEE 802.1AE) tunnels for the tunnel manager.

Theory of operation: one :class:`MacsecDriver` (the kernel half of a MACsec
:class:`~qkdgate.tunnels.tunnel.Tunnel`) drives one macsec netdevice
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

from qkdgate.errors import LocalProtocolError, TunnelError
from qkdgate.interfaces import (
    MacsecBackend,
    MacsecCipher,
    MacsecLinkSpec,
    MacsecSaSpec,
    MacsecSaState,
    MacsecSecyState,
)
from qkdgate.tunnels.driver import (
    CounterReading,
    KeySchedule,
    MacsecKeyMaterial,
    NewSa,
    SaRecord,
    SetupReport,
)
from qkdgate.tunnels.events import TunnelEventSink
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import Tunnel, TunnelPolicy

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


def macsec_tunnel(spec: MacsecTunnelSpec, backend: MacsecBackend, *, policy: TunnelPolicy,
                  lifetimes: Lifetimes, schedule: KeySchedule | None = None,
                  emit: TunnelEventSink | None = None) -> Tunnel:
    """A MACsec :class:`Tunnel`: the generation manager over a :class:`MacsecDriver`."""
    return Tunnel(MacsecDriver(spec, backend), policy=policy, lifetimes=lifetimes,
                  schedule=schedule, emit=emit)


class MacsecDriver:
    """One macsec netdevice and its SAs (kernel operations only)."""

    kind = "macsec"
    sas_outlive_daemon = False    # MACsec has no kernel lifetimes
    batch = None                  # one operation at a time (a few SAs per link)

    def __init__(self, spec: MacsecTunnelSpec, backend: MacsecBackend) -> None:
        self.spec = spec
        self.backend = backend
        self.local_sci: int | None = None
        self._created = False
        self._last_an = 3            # the first AN handed out is 0

    @property
    def tunnel_id(self) -> str:
        return self.spec.tunnel_id

    @property
    def link(self) -> str:
        return self.spec.link.name

    def _weaker(self, st: MacsecSecyState) -> list[str]:
        """How an existing link is weaker than the configured one (empty:
        at least as strict; IEEE 802.1AE-2018 10.7.8 validateFrames,
        10.7.9 replayProtect/replayWindow, 10.7.17 confidentiality)."""
        want, why = self.spec.link, []
        if st.cipher is not want.cipher:
            why.append(f"cipher suite {st.cipher.value if st.cipher else 'unknown'}, "
                       f"configured {want.cipher.value}")
        if st.icv_len != want.icv_len:
            why.append(f"ICV length {st.icv_len}, configured {want.icv_len}")
        if not st.protect:
            why.append("protect off")
        if want.encrypt and not st.encrypt:
            why.append("encrypt off")
        if want.validate_strict and not st.validate_strict:
            why.append("validate not strict")
        if want.replay_protect and not st.replay_protect:
            why.append("replay protection off")
        elif want.replay_protect and st.replay_window > want.replay_window:
            why.append(f"replay window {st.replay_window} > configured {want.replay_window}")
        return why

    def setup(self, now: float) -> SetupReport:
        existed = False
        replaced: list[tuple[str, str]] = []
        try:
            self.backend.create_link(self.spec.link)
            self._created = True
        except TunnelError as exc:
            if exc.errno != errno.EEXIST:
                raise
            existed = True
            why = self._weaker(self.backend.secy_state(self.link))
            if why:
                # Issue 17 finding 1: never key a link weaker than configured.
                # Down first (nothing leaves it), then rebuild it as configured.
                self.backend.set_link_up(self.link, False)
                self.backend.destroy_link(self.link)
                self.backend.create_link(self.spec.link)
                self._created = True
                existed = False
                replaced.append((f"macsec link {self.link}", "; ".join(why)))
        self.local_sci = self.backend.link_sci(self.link)
        try:
            self.backend.add_rx_sc(self.link, self.spec.peer_sci)
        except TunnelError as exc:
            if exc.errno != errno.EEXIST:
                raise
        removed = 0
        if existed:
            # A previous run's link (it crashed: a clean exit removes them).
            # Its SAs carry keys whose age nobody knows any more, and MACsec
            # has no kernel lifetime to end them: remove, block, re-key.
            removed = self._remove_stale()
        self.backend.set_link_up(self.link, True)
        return SetupReport(stale_removed=removed, replaced=tuple(replaced))

    def _remove_stale(self) -> int:
        removed = 0
        for an in range(4):
            for direction in ("out", "in"):
                try:
                    self._remove_an(direction, an)
                except TunnelError as exc:
                    if exc.errno != errno.EBUSY:
                        continue          # ENODEV: nothing on this AN
                    self._set_active(direction, an, False)   # the kernel refuses to
                    self._remove_an(direction, an)           # delete an active SA
                removed += 1
        return removed

    def _remove_an(self, direction: str, an: int) -> None:
        if direction == "out":
            self.backend.remove_tx_sa(self.link, an)
        else:
            self.backend.remove_rx_sa(self.link, self.spec.peer_sci, an)

    def _set_active(self, direction: str, an: int, active: bool) -> None:
        if direction == "out":
            self.backend.set_tx_sa_active(self.link, an, active)
        else:
            self.backend.set_rx_sa_active(self.link, self.spec.peer_sci, an, active)

    def allocate_spi(self, inbound_in_use: frozenset[int]) -> int:
        for step in range(1, 5):
            an = (self._last_an + step) % 4
            if an not in inbound_in_use:
                self._last_an = an
                return an
        raise TunnelError("allocate_an", errno.EBUSY, "all four ANs in use")

    def _keys(self, sa: NewSa, sci: int) -> MacsecKeyMaterial:
        return sa.schedule.macsec_keys(sa.session, self.tunnel_id, sa.direction, sci, sa.spi,
                                       sa.generation, self.spec.link.cipher)

    def _sa(self, keys: MacsecKeyMaterial, an: int) -> MacsecSaSpec:
        xpn = self.spec.link.cipher is MacsecCipher.GCM_AES_XPN_256
        return MacsecSaSpec(an=an, key=keys.sak, keyid=keys.keyid, pn=1, active=True,
                            ssci=keys.ssci if xpn else None, salt=keys.salt if xpn else None)

    def add_inbound(self, sa: NewSa) -> SaRecord:
        keys = self._keys(sa, self.spec.peer_sci)
        self.backend.add_rx_sa(self.link, self.spec.peer_sci, self._sa(keys, sa.spi))
        return SaRecord("in", sa.spi, 0, sa.now, (self.spec.peer_sci, sa.spi))

    def add_outbound(self, sa: NewSa, reqids_in_use: frozenset[int]) -> SaRecord:
        if self.local_sci is None:
            raise TunnelError("add_tx_sa", errno.ENODEV, f"{self.link} not set up")
        if not 0 <= sa.spi <= 3:
            raise TunnelError("add_tx_sa", errno.EINVAL, f"AN {sa.spi} out of range")
        keys = self._keys(sa, self.local_sci)
        self.backend.add_tx_sa(self.link, self._sa(keys, sa.spi))
        return SaRecord("out", sa.spi, 0, sa.now, (self.local_sci, sa.spi))

    def switch_to(self, outbound: SaRecord) -> None:
        self.backend.set_encoding_sa(self.link, outbound.spi)

    def block_outbound(self) -> None:
        pass  # every TX SA is gone: the kernel drops frames with no active encoding SA

    def remove_sa(self, rec: SaRecord) -> None:
        sci, an = _sci_an(rec)
        if rec.direction == "out":
            self.backend.set_tx_sa_active(self.link, an, False)
            self.backend.remove_tx_sa(self.link, an)
        else:
            self.backend.set_rx_sa_active(self.link, sci, an, False)
            self.backend.remove_rx_sa(self.link, sci, an)

    def neutralize(self, rec: SaRecord) -> tuple[str, bool]:
        """MACsec SAs have no lifetime: an SA we cannot delete is set inactive
        (IEEE 802.1AE-2018 10.7.22 inUse); if even that fails the link goes
        down, so no frame is sent or accepted under it."""
        sci, an = _sci_an(rec)
        try:
            if rec.direction == "out":
                self.backend.set_tx_sa_active(self.link, an, False)
            else:
                self.backend.set_rx_sa_active(self.link, sci, an, False)
            return f"{rec.direction} SA on AN {an} set inactive", True
        except TunnelError as exc:
            if exc.errno in (errno.ENODEV, errno.ESRCH):
                return f"{rec.direction} SA on AN {an} gone", True
        self.backend.set_link_up(self.link, False)
        return f"{rec.direction} SA on AN {an} could not be deactivated: link down", False

    def poll(self, records: list[SaRecord]) -> CounterReading:
        out = next((r for r in records if r.direction == "out"), None)
        if out is None:
            return CounterReading()
        st: MacsecSaState = self.backend.query_tx_sa(self.link, out.spi)
        bits = 64 if self.spec.link.cipher is MacsecCipher.GCM_AES_XPN_256 else 32
        # IEEE 802.1AE-2018 10.6.2: a PN never repeats under one SAK.
        reason = "pn_exhaustion" if st.next_pn >= int(self.spec.pn_threshold * (1 << bits)) \
            else None
        return CounterReading(counters={"bytes_out": st.octets, "packets_out": st.packets},
                              observed=(("out", st),), rekey_reason=reason)

    def describe(self) -> dict[str, object]:
        return {}

    def teardown(self) -> bool:
        """Delete the link if we created it (True: the tunnel is down)."""
        if not self._created:
            return False
        self.backend.destroy_link(self.link)
        return True


def _sci_an(rec: SaRecord) -> tuple[int, int]:
    if not isinstance(rec.handle, tuple):
        raise LocalProtocolError(f"MACsec SA record without (SCI, AN): {rec.describe()}")
    return rec.handle
