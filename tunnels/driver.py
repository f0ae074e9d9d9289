"""The kernel half of a tunnel: what IPsec and MACsec do differently.

Theory of operation: one :class:`~qkdgate.tunnels.tunnel.Tunnel` owns the
generations of a tunnel (make-before-break, key policy, lifetimes, retire
grace); it holds one :class:`TunnelDriver` that performs the kernel
operations of its kind and nothing else: no clock, no generation table, no
events. :class:`~qkdgate.tunnels.ipsec_tunnel.IpsecDriver` drives XFRM
policies and SAs, :class:`~qkdgate.tunnels.macsec_tunnel.MacsecDriver` one
macsec netdevice, :class:`~qkdgate.tunnels.consumer.ConsumerDriver` a key
consumer (WireGuard, strongSwan) that runs its own data plane. Every
operation either completes or raises :class:`~qkdgate.errors.TunnelError`;
the tunnel decides what that means.

This is Arnika's key-sink shape (install this key; invalidate the tunnel) and
strongSwan's ``kernel_ipsec`` narrow interface, one level up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from qkdgate.errors import TunnelError
from qkdgate.interfaces import (
    AllocateSpi,
    IpsecOp,
    MacsecCipher,
    MacsecSaState,
    PolicySpec,
    SaCounters,
    SaId,
    SaState,
)
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.timers import Lifetimes

if TYPE_CHECKING:
    from qkdgate.keymix.combiner import SessionSecret


class MacsecKeyMaterial(Protocol):
    """What the key schedule hands a MACsec SA (IEEE 802.1AE-2018 10.7.27)."""

    @property
    def sak(self) -> SecretBytes: ...
    @property
    def keyid(self) -> bytes: ...
    @property
    def salt(self) -> SecretBytes | None: ...
    @property
    def ssci(self) -> int | None: ...


class KeySchedule(Protocol):
    """The part of ``qkdgate.keymix.schedule`` the tunnels use."""

    def esp_key(self, session: SessionSecret, tunnel_id: str, direction: str, spi: int,
                generation: int) -> SecretBytes: ...

    def macsec_keys(self, session: SessionSecret, tunnel_id: str, direction: str, sci: int,
                    an: int, generation: int, cipher: MacsecCipher) -> MacsecKeyMaterial: ...

    def consumer_key(self, session: SessionSecret, consumer: str, tunnel_id: str,
                     generation: int) -> SecretBytes: ...


SaHandle = SaId | tuple[int, int]     # SaId for IPsec; (sci, an) for MACsec


@dataclass
class SaRecord:
    """One installed SA (IPsec) or SA on an AN (MACsec)."""

    direction: str                 # "in" | "out"
    spi: int                       # ESP SPI, or MACsec AN
    reqid: int
    installed_at: float
    handle: SaHandle

    def describe(self) -> dict[str, object]:
        return {"direction": self.direction, "spi": f"{self.spi:#010x}", "reqid": self.reqid}


@dataclass(frozen=True, slots=True)
class NewSa:
    """Everything a driver needs to key and install one SA of a generation."""

    session: SessionSecret
    generation: int
    direction: str                 # key-schedule direction: "i2r" | "r2i"
    spi: int                       # ESP SPI, or MACsec AN
    lifetimes: Lifetimes
    schedule: KeySchedule
    now: float
    hard_at: float | None = None   # the generation's hard deadline (same clock as now)


@dataclass(frozen=True, slots=True)
class SetupReport:
    """What :meth:`TunnelDriver.setup` found in the kernel.

    ``adopted``: SAs of a previous run the tunnel takes over (keys unknown,
    bounded by their kernel lifetime); ``sending_reqid``: the reqid the
    outbound policy sends under, if it names one of them; ``stale_removed``:
    SAs removed because nothing bounds their life."""

    adopted: tuple[SaRecord, ...] = ()
    sending_reqid: int | None = None
    stale_removed: int = 0
    replaced: tuple[tuple[str, str], ...] = ()    # (what, why) weaker objects replaced


@dataclass(frozen=True, slots=True)
class CounterReading:
    """Kernel counters of the sending generation's SAs."""

    counters: dict[str, int] = field(default_factory=dict)
    observed: tuple[tuple[str, SaCounters | MacsecSaState], ...] = ()
    rekey_reason: str | None = None      # a kind-specific limit (MACsec PN space)


@dataclass(frozen=True, slots=True)
class KernelSnapshot:
    """One dump of a backend's policies and SAs, indexed, shared by the
    setup (or teardown) of every tunnel on that backend: start-up and
    shutdown stay linear in the number of tunnels (issue 19), where one
    dump per tunnel made them quadratic."""

    policies: dict[tuple[object, ...], PolicySpec]     # (selector, dir, mark, if_id)
    sas_by_reqid: dict[int, list[SaState]]


class BatchOps(Protocol):
    """Optional capability of a driver (:attr:`TunnelDriver.batch`): its
    kernel operations as parameter objects, so the manager sends those of
    many tunnels in one pipelined batch (issue 19) rather than one
    request/ack round trip each. Drivers whose :attr:`group` is the same
    object share one backend and are batched together."""

    @property
    def group(self) -> object: ...

    def apply(self, ops: Sequence[IpsecOp]) -> list[TunnelError | None]:
        """The backend's batch: one result per op (None: done)."""

    def spi_request(self) -> AllocateSpi:
        """What :meth:`TunnelDriver.allocate_spi` would reserve, not yet sent."""

    def allocate_spis(self, requests: Sequence[AllocateSpi]) -> list[int | TunnelError]:
        """The backend's batch of reservations: per request its SPI or error."""

    def inbound_op(self, sa: NewSa) -> tuple[SaRecord, IpsecOp]: ...

    def outbound_op(self, sa: NewSa, reqids_in_use: frozenset[int]
                    ) -> tuple[SaRecord, IpsecOp]: ...

    def switch_ops(self, outbound: SaRecord) -> list[IpsecOp]:
        """The ops of :meth:`TunnelDriver.switch_to`, not yet applied."""

    def switch_done(self, outbound: SaRecord, results: Sequence[TunnelError | None]
                    ) -> TunnelError | None:
        """Record the outcome of :meth:`switch_ops`; on a failure point back
        whatever already moved and return the error (nothing half-switched)."""

    def remove_op(self, rec: SaRecord) -> IpsecOp: ...

    def read_counters(self, records: Sequence[SaRecord]) -> list[SaCounters | TunnelError]:
        """The counters of these SAs (any tunnels' of the group) in one
        read of the backend: per record its counters or its error, in order."""

    def counters_from(self, records: Sequence[SaRecord],
                      states: Sequence[SaCounters | TunnelError]) -> CounterReading:
        """What :meth:`TunnelDriver.poll` returns, from ``states`` read by
        :meth:`read_counters`: an SA gone (ESRCH) is skipped, any other
        error raised."""

    def snapshot(self) -> KernelSnapshot: ...

    def setup_from(self, snapshot: KernelSnapshot, now: float) -> SetupReport:
        """:meth:`TunnelDriver.setup` reading ``snapshot`` instead of dumping."""

    def teardown_from(self, snapshot: KernelSnapshot) -> bool:
        """:meth:`TunnelDriver.teardown` reading ``snapshot`` instead of dumping."""


class TunnelDriver(Protocol):
    """Kernel operations of one tunnel kind. Raise TunnelError on failure."""

    @property
    def batch(self) -> BatchOps | None:
        """The batched form of these operations, or None (one at a time)."""

    @property
    def tunnel_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def sas_outlive_daemon(self) -> bool:
        """True when the kernel ends SAs on its own (XFRM lifetimes), so a
        clean exit may leave them in place for a restart to adopt."""

    def setup(self, now: float) -> SetupReport:
        """Install the fail-closed state (blocking policies, strict link)."""

    def allocate_spi(self, inbound_in_use: frozenset[int]) -> int: ...

    def add_inbound(self, sa: NewSa) -> SaRecord: ...

    def add_outbound(self, sa: NewSa, reqids_in_use: frozenset[int]) -> SaRecord: ...

    def switch_to(self, outbound: SaRecord) -> None:
        """Send under ``outbound`` from now on, atomically."""

    def block_outbound(self) -> None:
        """Send nothing (the Arnika 'invalidate' verb)."""

    def remove_sa(self, rec: SaRecord) -> None: ...

    def neutralize(self, rec: SaRecord) -> tuple[str, bool]:
        """Make an SA that could not be removed harmless. Returns what was
        done and whether that contains it (False: the tunnel must block)."""

    def poll(self, records: list[SaRecord]) -> CounterReading: ...

    def teardown(self) -> bool:
        """Remove what setup installed; True when the tunnel is down."""

    def describe(self) -> dict[str, object]:
        """Kind-specific status for ``Tunnel.status`` (empty: nothing to add)."""
