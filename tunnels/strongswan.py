"""The strongSwan key consumer: each generation's key as an RFC 8784 PPK.

Theory of operation: strongSwan mixes a postquantum preshared key into an
IKE_SA's keys only when the IKE_SA authenticates (RFC 8784 3: SK_d, SK_pi
and SK_pr are re-derived with prf+(PPK, ...)); its CHILD_SAs take their keys
from that SK_d. So a new PPK protects traffic only after a new IKE_SA is
authenticated with it. Per generation g, with the two gateways' steps in
the order the qkdgate exchange gives them (docs/consumers.md):

1. ``prepare(g)`` (both, before either switches): ``load-shared`` PPK g
   under the id ``qkdgate-<tunnel>-g<g>``, the id both gateways derive.
2. ``install(g)``: ``load-conn`` with ``ppk_id`` naming g (the connection
   body read from the operator's swanctl.conf, ``ppk_required = yes``). The
   side that ran this generation's qkdgate handshake as initiator then
   re-authenticates make-before-break: vici ``initiate`` of a new IKE_SA
   with its CHILD_SA (authenticated with PPK g; the peer loaded g in step
   1), and only once it is up ``terminate`` of every older IKE_SA of the
   connection. The kernel holds both CHILD_SAs' SAs until the old ones go,
   so traffic keeps flowing (what charon's own make-before-break reauth
   does; charon's reauth itself is not used: it reuses the old IKE_SA's
   config, i.e. the old ``ppk_id``).
3. ``retire(g-1)``: ``unload-shared`` PPK g-1.

``ppk_required = yes`` means an IKE_SA without the right PPK is refused, not
established without one (RFC 8784 3, NO_PPK_AUTH is never accepted).
``invalidate`` unloads every PPK of the tunnel and, to block, terminates
its IKE_SAs; the connection's CHILD_SAs must use ``start_action = trap``
(checked at construction) so that once they are gone the kernel drops the
protected traffic (trap policy, no SA) instead of routing it in clear.
While blocked the trap is disarmed (the connection reloaded with
``start_action = none``) and the block policies (next paragraph) hold the traffic: a
trap then only makes charon start IKE_SAs that cannot authenticate, and the
half-open IKE_SAs they leave at the peer make it refuse our next
re-authentication (``_disarm``). After a block the initiator's ``install``
arms it again once its new IKE_SA is up, the responder's next ``install``
does; ``teardown`` leaves it armed.

The trap policy alone leaves a gap: ``load-conn`` of a trapped connection
makes charon remove its trap policies and add them again, and a packet sent
in between, with no CHILD_SA up (the first install, the first after a block),
matches no policy and leaves in clear. So the consumer holds its own XFRM
*block* policies for the connection's traffic selectors (read from the
child's ``local_ts``/``remote_ts`` in swanctl.conf), out, in and fwd, at a
priority below every policy charon installs for a CHILD_SA or trap
(:data:`BLOCK_PRIORITY`), from ``setup`` (before the first ``load-conn``)
for the consumer's whole life: while charon's policy is there it wins (a
smaller priority number), in the gap the block drops. ``qkdgate failsafe``
leaves them (traffic stays blocked); only ``teardown`` removes them.

Provenance: charon numbers IKE_SAs with increasing unique ids, and the
consumer records the highest id it saw when each generation's PPK became the
only one a new IKE_SA can use; an IKE_SA is attributed to the newest
generation whose mark is below its id (on the re-authenticating side the id
``initiate`` returned is recorded exactly). ``describe()`` lists each IKE_SA
with its ``ppk_id``.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qkdgate.errors import ConfigError, TunnelError
from qkdgate.interfaces import Direction, IpsecBackend, Mark, PolicyAction, PolicySpec, Selector
from qkdgate.tunnels.consumer import ConsumerKey, ConsumerReport, Invalidation, ThreadedConsumer
from qkdgate.tunnels.strongswan_vici import (
    ConnSpec,
    IkeSaInfo,
    Ppk,
    Vici,
    ViciAuthFailed,
    ViciClient,
    ViciError,
)

if TYPE_CHECKING:
    from qkdgate.tunnels.state import TunnelRegistry

log = logging.getLogger("qkdgate.tunnels")

KIND = "strongswan"
DEFAULT_SWANCTL_CONF = "/etc/swanctl/swanctl.conf"
DEFAULT_VICI_SOCKET = "/var/run/charon.vici"
# The initiator's re-authentication may reach the peer's charon before the
# peer's own install of generation g has run its load-conn: the exchange's
# DONE leaves the responder when its install is queued on its worker thread
# (ThreadedConsumer), not when charon has it, and a charon responder with
# ppk_required accepts only the PPK_ID its connection names ("received
# PPK_ID 'g', but require 'g-1'"). Its AUTHENTICATION_FAILED is retried after
# these pauses (3.75 s in all), each attempt one IKE_SA_INIT + IKE_AUTH round
# trip; the running IKE_SA is untouched meanwhile (make-before-break). Any
# other failure, or the last refusal, fails the install at once. A later
# generation's install queued behind this one ends the retries (and skips a
# re-authentication not yet started): its key supersedes this one, and the
# peer may be refusing us because it has moved on to it (it requires g+1
# while we offer g, and its own retries wait for our install of g+1, queued
# behind ours: the two workers held each other 6 s in a loaded lab).
REAUTH_RETRY_S = (0.25, 0.5, 1.0, 2.0)
BLOCKED_PPK_ID = "qkdgate-none"   # ppk_id while no generation is installed: never loaded


# local/remote keys whose values swanctl replaces with file contents
# (src/swanctl/commands/load_conns.c, add_file_list_key)
FILE_KEYS = frozenset({"certs", "cacerts", "pubkeys"})


# strongSwan 5.9 src/libcharon/plugins/kernel_netlink/kernel_netlink_ipsec.c
# get_priority(): PRIO_BASE 200000; a trap (POLICY_PRIORITY_ROUTED) or
# CHILD_SA (POLICY_PRIORITY_DEFAULT) policy gets 2 * PRIO_BASE minus its
# selector's specificity, so at most 400000; only charon's own FALLBACK drop
# policies (3 * PRIO_BASE - ...) rank lower. A larger number is a lower
# priority in XFRM, so this block ranks below every policy that protects.
CHARON_PRIO_BASE = 200000
BLOCK_PRIORITY = 2 * CHARON_PRIO_BASE + 1
# The kernel keeps one policy per (selector, direction, mark, if_id)
# (net/xfrm/xfrm_policy.c xfrm_policy_insert_list): a block with charon's
# selector and charon's mark 0/0 would replace charon's policy. Two marks
# that split the mark space on bit 0 (a packet matches when mark & m == v)
# together match every packet and are each distinct from charon's 0/0.
BLOCK_MARKS = (Mark(0, 1), Mark(1, 1))


def _selectors(spec: str, default: str, where: str) -> list[ipaddress.IPv4Network
                                                              | ipaddress.IPv6Network]:
    """swanctl.conf(5) ``local_ts``/``remote_ts``: comma-separated subnets;
    ``dynamic`` (also the default) is the IKE address (``local_addrs``)."""
    out = []
    for item in (x.strip() for x in (spec or "dynamic").split(",")):
        if item == "dynamic":
            item = default
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            # ranges, [proto/port] and %any: a block of the subnet would be
            # wider or narrower than charon's policy; refuse, never guess
            raise ConfigError(f"{where}: '{item}' is not a subnet or address qkdgate can "
                              "hold a block policy for (write plain subnets)") from None
    if not out:
        raise ConfigError(f"{where}: no traffic selector")
    return out


def block_policies(connection: str, body: Mapping[str, object]) -> tuple[PolicySpec, ...]:
    """The XFRM block policies that hold every child's traffic selectors of
    ``body`` (swanctl.conf ``connections.<name>``) closed beneath charon's."""
    children = body.get("children")
    if not isinstance(children, Mapping):
        return ()
    local = str(body.get("local_addrs", "")).split(",")[0].strip()
    remote = str(body.get("remote_addrs", "")).split(",")[0].strip()
    out: list[PolicySpec] = []
    for name, child in children.items():
        if not isinstance(child, Mapping):
            continue
        where = f"connection '{connection}' child '{name}'"
        prio = BLOCK_PRIORITY
        if "priority" in child:         # swanctl.conf(5): overrides charon's own
            try:
                prio = max(prio, int(str(child["priority"])) + 1)
            except ValueError:
                raise ConfigError(f"{where}: priority is not a number") from None
        lts = _selectors(str(child.get("local_ts", "")), local, f"{where} local_ts")
        rts = _selectors(str(child.get("remote_ts", "")), remote, f"{where} remote_ts")
        for lo in lts:
            for rem in rts:
                if lo.version != rem.version:
                    continue
                for src, dst, d in ((lo, rem, Direction.OUT), (rem, lo, Direction.IN),
                                    (rem, lo, Direction.FWD)):
                    out.extend(PolicySpec(Selector(src, dst), d, PolicyAction.BLOCK,
                                          priority=prio, mark=mk) for mk in BLOCK_MARKS)
    return tuple(out)


def _pkey(p: PolicySpec) -> tuple[object, ...]:
    return (p.selector, p.direction, p.mark, p.action, p.priority)


def ppk_prefix(tunnel_id: str) -> str:
    return f"qkdgate-{tunnel_id}-g"


@dataclass(frozen=True)
class StrongswanSpec:
    """Everything one strongSwan tunnel needs (from its YAML section)."""

    tunnel_id: str
    connection: str
    child: str
    body: Mapping[str, object]
    vici_socket: str = DEFAULT_VICI_SOCKET
    timeout_ms: int = 15000
    block: tuple[PolicySpec, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        children = self.body.get("children")
        if not isinstance(children, Mapping) or self.child not in children:
            raise ConfigError(f"connection '{self.connection}' has no child '{self.child}'")
        for sec, auth in self.body.items():
            # swanctl turns these file names into blobs before load-conn; qkdgate
            # resends the tree as written, so they must not be there
            if (sec.startswith(("local", "remote")) and isinstance(auth, Mapping)
                    and (bad := sorted(FILE_KEYS & auth.keys()))):
                raise ConfigError(f"connection '{self.connection}' {sec}: {', '.join(bad)} "
                                  "name files swanctl reads itself; load credentials with "
                                  "swanctl --load-creds and match them by id instead")
        for name, child in children.items():
            # fail closed: with no CHILD_SA the trap policy drops, nothing
            # goes out in clear (swanctl.conf(5) start_action)
            if not isinstance(child, Mapping) or child.get("start_action") != "trap":
                raise ConfigError(f"connection '{self.connection}' child '{name}' needs "
                                  "start_action = trap (fail closed when no CHILD_SA is up)")
        object.__setattr__(self, "block", block_policies(self.connection, self.body))


class StrongswanConsumer:
    """One strongSwan connection keyed by qkdgate (the KeyConsumer protocol)."""

    def __init__(self, spec: StrongswanSpec, *, connect: Callable[[str], Vici] = ViciClient,
                 registry: TunnelRegistry | None = None, netns: str | None = None,
                 xfrm: Callable[[], IpsecBackend] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.spec = spec
        self._sleep = sleep
        self._connect = connect
        self._xfrm_factory = xfrm or self._default_xfrm
        self._xfrm: IpsecBackend | None = None
        self._registry, self._netns = registry, netns
        self._vici: Vici | None = None
        self.current: ConsumerKey | None = None      # the generation load-conn names
        self.loaded: dict[int, str] = {}             # generation -> PPK id loaded by us
        self.marks: list[tuple[int, str]] = []       # (highest IKE id before, ppk id)
        self.exact: dict[int, str] = {}              # IKE id we initiated -> ppk id
        self.blocked = True
        # whether a later generation's install waits behind the running one
        # (a ThreadedConsumer sets it: consumer.Supersedable)
        self.superseded: Callable[[int], bool] = lambda _generation: False

    # -- KeyConsumer identity
    @property
    def tunnel_id(self) -> str:
        return self.spec.tunnel_id

    @property
    def kind(self) -> str:
        return KIND

    # -- plumbing
    def _default_xfrm(self) -> IpsecBackend:
        from qkdgate.tunnels.xfrm import XfrmBackend
        be: IpsecBackend = XfrmBackend(self._netns)
        return be

    def _hold_block(self) -> None:
        """Assert the block policies beneath charon's and read them back
        (before every ``load-conn``: someone may have flushed the SPD)."""
        if not self.spec.block:
            return
        if self._xfrm is None:
            self._xfrm = self._xfrm_factory()
        have = {_pkey(p) for p in self._xfrm.list_policies()}
        for p in self.spec.block:
            if _pkey(p) not in have:
                self._xfrm.install_policy(p)
        have = {_pkey(p) for p in self._xfrm.list_policies()}
        missing = [p for p in self.spec.block if _pkey(p) not in have]
        if missing:
            raise TunnelError("block_policy", None, f"{self.spec.connection}: "
                              f"{len(missing)} block policies not in the SPD after install")

    def _release_block(self) -> None:
        if self._xfrm is None:
            return
        have = {_pkey(p) for p in self._xfrm.list_policies()}
        for p in self.spec.block:
            if _pkey(p) in have:
                self._xfrm.remove_policy(p)
        close = getattr(self._xfrm, "close", None)
        if callable(close):
            close()
        self._xfrm = None

    def _v(self) -> Vici:
        if self._vici is None:
            self._vici = self._connect(self.spec.vici_socket)
        return self._vici

    def _call(self, fn: Callable[[Vici], Any]) -> Any:
        """One vici call; a broken session is dropped so the next call reconnects."""
        try:
            return fn(self._v())
        except ViciError:
            if self._vici is not None:
                with contextlib.suppress(OSError):
                    self._vici.close()
                self._vici = None
            raise

    def _conn(self, ppk_id: str, *, armed: bool = True) -> ConnSpec:
        """The connection as the operator wrote it naming ``ppk_id``; not
        ``armed``: every child with ``start_action = none`` (swanctl.conf(5)),
        so charon uninstalls its trap policies and never initiates on a
        kernel acquire."""
        body = self.spec.body
        children = body.get("children")
        if not armed and isinstance(children, Mapping):
            body = {**body, "children": {
                n: {**c, "start_action": "none"} if isinstance(c, Mapping) else c
                for n, c in children.items()}}
        return ConnSpec(self.spec.connection, body, ppk_id)

    def _disarm(self) -> None:
        """While blocked, no trap: the block policies (held first) drop the
        traffic without an acquire. A trap whose connection names a PPK we
        unloaded makes charon initiate an IKE_SA per kernel acquire that
        gives up after IKE_SA_INIT (ppk_required, RFC 8784 3) without a word
        to the peer, whose half-open IKE_SA then lives on for
        charon.half_open_timeout (30 s); at charon.block_threshold (5) such
        SAs from one address the peer ignores every IKE_SA_INIT from it, the
        next install's re-authentication included (issue 21, the gap test)."""
        if not self.spec.block:
            return      # nothing else would hold the traffic: keep the trap
        self._hold_block()
        self._call(lambda v: v.load_conn(self._conn(BLOCKED_PPK_ID, armed=False)))

    def _ike_sas(self) -> list[IkeSaInfo]:
        sas: list[IkeSaInfo] = self._call(lambda v: v.list_sas(self.spec.connection))
        return sas

    def _mark(self, ppk_id: str) -> None:
        top = max((sa.unique_id for sa in self._ike_sas()), default=0)
        self.marks.append((top, ppk_id))
        del self.marks[:-8]

    def ppk_of(self, unique_id: int) -> str | None:
        if unique_id in self.exact:
            return self.exact[unique_id]
        found = None
        for top, ppk_id in self.marks:
            if unique_id > top:
                found = ppk_id
        return found

    # -- the verbs
    def setup(self, now: float) -> ConsumerReport:
        """Start fail closed: the block policies beneath charon's, no
        qkdgate PPK loaded, no IKE_SA of the connection running."""
        self._hold_block()
        if self._registry is not None:
            self._registry.add_consumer(self._netns, {
                "kind": KIND, "tunnel_id": self.tunnel_id, "connection": self.spec.connection,
                "vici_socket": self.spec.vici_socket})
        return self.invalidate(Invalidation(self.tunnel_id, "daemon start", True))

    def prepare(self, key: ConsumerKey) -> None:
        """MAKE: PPK g loaded, so the peer's next IKE_SA can authenticate
        with it; what this side initiates with is unchanged."""
        self._call(lambda v: v.load_ppk(Ppk(key.key_name, key.key)))
        self.loaded[key.generation] = key.key_name

    def install(self, key: ConsumerKey) -> ConsumerReport:
        """SWITCH: the connection names PPK g; the handshake initiator re-
        authenticates make-before-break. On failure the connection names
        the previous key again and the error is raised."""
        if key.generation not in self.loaded:
            self.prepare(key)
        previous = self.current.key_name if self.current and not self.blocked else BLOCKED_PPK_ID
        was_blocked = previous == BLOCKED_PPK_ID    # a failure leaves it disarmed again
        # charon re-adds a trap policy on load-conn: the block holds the gap.
        # After a block the trap stays off until a CHILD_SA is up: armed with
        # none, the flood's first packet makes charon start a second IKE_SA
        # beside the re-authentication (or the peer's), and terminating that
        # one half-built ("destroying IKE_SA in state CONNECTING without
        # notification") orphans the copy the peer finished, whose terminate
        # on the next block then waits out every retransmit (issue 21). The
        # initiator arms it once its IKE_SA is up; the responder with the
        # next generation (its CHILD_SA is up by then).
        self._hold_block()
        self._call(lambda v: v.load_conn(self._conn(key.key_name, armed=not was_blocked)))
        self._mark(key.key_name)
        detail = f"connection {self.spec.connection} ppk_id {key.key_name}"
        up = True
        try:
            if key.role == "initiator":
                up, detail = self._reauthenticate(key)
                if was_blocked and up:   # the CHILD_SA's policy holds the selector: no acquire
                    self._call(lambda v: v.load_conn(self._conn(key.key_name)))
        except TunnelError:
            with contextlib.suppress(TunnelError):
                self._call(lambda v: v.load_conn(self._conn(previous, armed=not was_blocked)))
            raise
        # superseded before an IKE_SA came up after a block: still disarmed,
        # and the next install keeps it so until a CHILD_SA is up (above)
        self.current, self.blocked = key, was_blocked and not up
        ids = self._call(lambda v: v.shared_ids())
        verified = key.key_name in ids
        return ConsumerReport(key.key_name, key.generation, verified, False, detail)

    def _reauthenticate(self, key: ConsumerKey) -> tuple[bool, str]:
        """(whether a new IKE_SA is up, what was done)."""
        old = [sa.unique_id for sa in self._ike_sas()]
        new = self._initiate(key)
        if new is None:
            return False, (f"connection {self.spec.connection} ppk_id {key.key_name}; not "
                           "re-authenticated: a later generation's install is queued behind it")
        if new in old:
            # charon added a CHILD_SA to a running IKE_SA instead of
            # authenticating a new one: no PPK was mixed in
            raise ViciError("initiate", f"charon reused IKE_SA #{new}: set "
                            "charon.reuse_ikesa = no in strongswan.conf")
        self.exact[new] = key.key_name
        up = {sa.unique_id: sa for sa in self._ike_sas()}
        sa = up.get(new)
        if sa is None or sa.state != "ESTABLISHED" or not any(
                c.state == "INSTALLED" for c in sa.children):
            raise ViciError("initiate", f"IKE_SA #{new} not established with a CHILD_SA")
        for uid in old:
            if uid != new:
                self._terminate(uid)
        for uid in list(self.exact):
            if uid not in up:
                del self.exact[uid]
        return True, (f"IKE_SA #{new} authenticated with ppk_id {key.key_name}; "
                      f"terminated {sorted(u for u in old if u != new)}")

    def _initiate(self, key: ConsumerKey) -> int | None:
        """vici ``initiate``, again after each of REAUTH_RETRY_S while the
        peer refuses our IKE_AUTH (its load-conn of this generation may
        still be queued); the unique id of the new IKE_SA, or None once a
        later generation's install is queued (REAUTH_RETRY_S)."""
        pauses = iter(REAUTH_RETRY_S)
        while not self.superseded(key.generation):
            try:
                uid: int = self._call(lambda v: v.initiate(
                    self.spec.connection, self.spec.child, self.spec.timeout_ms))
                return uid
            except ViciAuthFailed:
                pause = next(pauses, None)
                if pause is None:
                    raise                   # refused after every pause: a real mismatch
                if self.superseded(key.generation):
                    break
                log.info("tunnel %s: the peer refused IKE_AUTH with %s (its install not in "
                         "charon yet?): again in %.2f s", self.tunnel_id, key.key_name, pause,
                         extra={"tunnel": self.tunnel_id})
                self._sleep(pause)
        return None

    def _terminate(self, uid: int) -> None:
        try:
            self._call(lambda v: v.terminate_ike(uid, self.spec.timeout_ms))
        except ViciError as e:
            # gone meanwhile (the peer deleted it): what we wanted
            if uid in {sa.unique_id for sa in self._ike_sas()}:
                raise
            del e

    def retire(self, generation: int) -> None:
        """BREAK: PPK g unloaded (never the one the connection names)."""
        ppk_id = self.loaded.get(generation)
        if ppk_id is None or (self.current is not None and self.current.generation == generation
                              and not self.blocked):
            return
        self._unload(ppk_id)
        del self.loaded[generation]

    def _unload(self, ppk_id: str) -> None:
        try:
            self._call(lambda v: v.unload_shared(ppk_id))
        except ViciError:
            if ppk_id in self._call(lambda v: v.shared_ids()):
                raise

    def invalidate(self, why: Invalidation) -> ConsumerReport:
        """Fail closed: every qkdgate PPK of this tunnel is unloaded, so no
        IKE_SA can authenticate (ppk_required), and with ``block`` every
        IKE_SA of the connection is terminated after its trap is disarmed
        (:meth:`_disarm`): the block policies then drop the traffic, and no
        acquire starts an IKE_SA that cannot authenticate. The next
        ``install`` arms the trap again (docs/consumers.md)."""
        prefix = ppk_prefix(self.tunnel_id)
        try:
            ids = self._call(lambda v: v.shared_ids())
        except ViciError as e:
            if e.errno not in (_errno.ENOENT, _errno.ECONNREFUSED):
                raise
            # charon is not running: no PPK and no IKE_SA exist to remove
            self.loaded.clear()
            self.blocked = self.blocked or why.block
            return ConsumerReport(None, None, True, self.blocked, "charon not running")
        for ppk_id in sorted(ids):
            if ppk_id.startswith(prefix):
                self._unload(ppk_id)
        self.loaded.clear()
        terminated = []
        if why.block:
            # the trap goes before the CHILD_SAs: no acquire in between
            try:
                self._disarm()
            finally:
                for sa in self._ike_sas():
                    self._terminate(sa.unique_id)
                    terminated.append(sa.unique_id)
                self.blocked = True
        left = [i for i in self._call(lambda v: v.shared_ids()) if i.startswith(prefix)]
        return ConsumerReport(None, None, not left, self.blocked,
                              f"{why.reason}: PPKs unloaded, IKE_SAs terminated {terminated}")

    def teardown(self) -> bool:
        self.invalidate(Invalidation(self.tunnel_id, "teardown", True))
        # charon's trap holds the traffic once our block goes (no PPK loaded)
        try:
            self._call(lambda v: v.load_conn(self._conn(BLOCKED_PPK_ID)))
        except ViciError as e:
            if e.errno not in (_errno.ENOENT, _errno.ECONNREFUSED):
                raise
        self._release_block()
        if self._vici is not None:
            self._vici.close()
            self._vici = None
        return True

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "connection": self.spec.connection, "vici_socket": self.spec.vici_socket,
            "ppk_id": None if self.blocked or self.current is None else self.current.key_name,
            "blocked": self.blocked, "loaded_ppks": sorted(self.loaded.values()),
            "block_policies": len(self.spec.block)}
        try:
            out["ike_sas"] = [
                {"unique_id": sa.unique_id, "state": sa.state, "initiator": sa.initiator,
                 "ppk_id": self.ppk_of(sa.unique_id),
                 "child_sas": [{"name": c.name, "state": c.state, "spi_in": f"{c.spi_in:#010x}",
                                "spi_out": f"{c.spi_out:#010x}"} for c in sa.children]}
                for sa in self._ike_sas()]
        except ViciError as e:
            out["error"] = str(e)
        return out


class StrongswanSection(Protocol):
    """The ``strongswan:`` section of a tunnel (gateway.config's
    StrongswanConfig; tunnels/ may not import the config layer)."""

    @property
    def connection(self) -> str: ...
    @property
    def vici_socket(self) -> str: ...
    @property
    def swanctl_conf(self) -> str: ...
    @property
    def child(self) -> str | None: ...


class StrongswanTunnel(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def strongswan(self) -> StrongswanSection | None: ...


def strongswan_consumer(t: StrongswanTunnel, registry: TunnelRegistry | None,
                        netns: str | None = None) -> ThreadedConsumer:
    """build.py's factory: a tunnel's ``strongswan:`` section to a consumer
    whose vici calls run on its own worker thread, off the daemon's event
    loop (:class:`~qkdgate.tunnels.consumer.ThreadedConsumer`). The
    connection is read from swanctl.conf now (start, reload)."""
    from qkdgate.tunnels.strongswan_conf import read_connection

    sw = t.strongswan
    if sw is None:
        raise ConfigError(f"tunnel '{t.name}' has no strongswan section")
    body = read_connection(sw.swanctl_conf, sw.connection)
    children = body.get("children")
    child = sw.child or (next(iter(children), None) if isinstance(children, dict) else None)
    if child is None:
        raise ConfigError(f"connection '{sw.connection}' has no children", file=sw.swanctl_conf)
    spec = StrongswanSpec(t.name, sw.connection, child, body, vici_socket=sw.vici_socket)
    return ThreadedConsumer(StrongswanConsumer(spec, registry=registry, netns=netns))


def failsafe(ns: str | None, records: list[dict[str, str]], dry: bool,
             say: Callable[[str | None, str], None] | None = None) -> int:
    """``qkdgate failsafe`` for strongSwan tunnels: unload every qkdgate PPK
    of each recorded tunnel and terminate its connection's IKE_SAs. PPKs
    have no lifetime in charon, so a SIGKILLed daemon's key would otherwise
    authenticate new IKE_SAs forever. Returns the number of failures."""
    def tell(text: str) -> None:
        if say is not None:
            say(ns, text)

    failures = 0
    for rec in records:
        tid, conn, sock = rec["tunnel_id"], rec["connection"], rec["vici_socket"]
        prefix = ppk_prefix(tid)
        if dry:
            tell(f"would unload PPKs {prefix}* and terminate IKE_SAs of {conn} via {sock}")
            continue
        try:
            with contextlib.closing(ViciClient(sock)) as v:
                gone = [i for i in sorted(v.shared_ids()) if i.startswith(prefix)]
                for ppk_id in gone:
                    v.unload_shared(ppk_id)
                ike = [sa.unique_id for sa in v.list_sas(conn)]
                for uid in ike:
                    with contextlib.suppress(ViciError):
                        v.terminate_ike(uid, 10000)
                left = [sa.unique_id for sa in v.list_sas(conn)]
                tell(f"strongSwan {conn}: unloaded PPKs {gone}, terminated IKE_SAs {ike}")
                if left or any(i.startswith(prefix) for i in v.shared_ids()):
                    tell(f"strongSwan {conn}: still up: IKE_SAs {left}")
                    failures += 1
        except ViciError as e:
            if e.errno in (_errno.ENOENT, _errno.ECONNREFUSED):
                tell(f"strongSwan {conn}: charon not running ({sock}): no PPK to unload")
                continue
            tell(f"strongSwan {conn}: {e}")
            failures += 1
    return failures
