"""SIGHUP: re-read the configuration and apply what may change live.

Theory of operation: :class:`ReloadApplier` validates the new file first (a
bad file changes nothing and is reported), lets
:func:`~qkdgate.gateway.daemon.build.apply_live` apply tunnel policies,
lifetimes and the log level, and lists what needs a restart. A policy that a
reload *tightens* is enforced at once (issue 17 finding 6): the generation
carrying traffic is checked against the new policy; one that falls short is
rekeyed now, ``qkd-mandatory`` blocks now, and any other policy blocks when
that exchange ends without a generation meeting it
(:meth:`ReloadApplier.exchange_ended`, called by every peer runner).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.model import Config, load_config
from qkdgate.gateway.daemon import build
from qkdgate.gateway.telemetry.events import ConfigRejected, ConfigReloaded, Event, PolicyShortfall
from qkdgate.tunnels.manager import TunnelManager
from qkdgate.tunnels.tunnel import GenerationRefused, check_policy

log = logging.getLogger("qkdgate.daemon")


class ReloadApplier:
    def __init__(self, config_path: str | None, tunnels: TunnelManager, *,
                 emit: Callable[[Event], None], clock: Callable[[], float],
                 rekey: Callable[[str, str], object]) -> None:
        self._path = config_path
        self._tunnels = tunnels
        self._emit = emit
        self._clock = clock
        self._rekey = rekey
        self.short_of_policy: dict[str, str] = {}    # tunnel -> why (tightened by reload)

    def apply(self, running: Config) -> tuple[Config, list[str], list[str]]:
        """Read, validate and apply the file; returns the config to run with
        (the new one, or ``running`` when parts need a restart), what was
        applied and what needs a restart. :class:`ConfigError`: nothing changed."""
        if self._path is None:
            raise ConfigError("the daemon was not started from a file; nothing to reload")
        try:
            new = load_config(self._path)
        except ConfigError as exc:
            log.error("reload refused, configuration unchanged: %s", exc)
            self._emit(ConfigRejected(str(exc)))
            raise
        before = {tid: t.policy for tid, t in self._tunnels.tunnels.items()}
        applied, restart = build.apply_live(running, new, self._tunnels)
        self._enforce([tid for tid, t in self._tunnels.tunnels.items()
                       if t.policy != before[tid]])
        for item in restart:
            log.warning("reload: %s needs a restart to take effect", item)
        log.info("configuration reloaded: %s", ", ".join(applied) or "no live changes")
        self._emit(ConfigReloaded(tuple(applied), tuple(restart)))
        return (running if restart else new), applied, restart

    def _enforce(self, tunnel_ids: list[str]) -> None:
        now = self._clock()
        for tid in tunnel_ids:
            tunnel = self._tunnels.get(tid)
            active = tunnel.active
            if active is None or tunnel.state == "blocked":
                continue
            try:
                check_policy(tunnel.policy, active.provenance)
                continue
            except GenerationRefused as exc:
                short = (f"policy now {tunnel.policy.value}, active generation "
                         f"{active.number} falls short: {exc}")
            log.warning("tunnel %s: %s; rekeying now", tid, short, extra={"tunnel": tid})
            self._emit(PolicyShortfall(tid, tunnel.policy.value, active.number, str(short)))
            self.short_of_policy[tid] = short
            if tunnel.policy.blocks_on_qkd_loss:
                tunnel.block(now, short)
            self._rekey(tid, "policy_tightened")

    def exchange_ended(self, tunnel_ids: list[str]) -> None:
        """An exchange for these tunnels ended (established or failed):
        every one still short of its tightened policy blocks now."""
        now = self._clock()
        for tid in tunnel_ids:
            short = self.short_of_policy.pop(tid, None)
            if short is None:
                continue
            tunnel = self._tunnels.get(tid)
            if tunnel.active is None or tunnel.state == "blocked":
                continue
            try:
                check_policy(tunnel.policy, tunnel.active.provenance)
            except GenerationRefused:
                tunnel.block(now, short + "; the rekey did not bring one that meets it")
