"""Every timer of one peer session, with named hooks (wireguard-go's
``device/timers.go``).

Theory of operation: a :class:`~qkdgate.gateway.protocol.session.PeerSession`
has exactly three kinds of deadline, and only this class sets or reads them:

* per exchange: the **exchange timeout** (an exchange not finished by then
  fails) and the initiator's **retransmission** (INIT until RESP, CONFIRM
  until DONE; ``retransmit_base`` doubling to ``retransmit_max``); both grow
  with the number of tunnels the exchange keys (:func:`exchange_timeout_for`,
  :func:`retransmit_first_for`);
* per session: the **rekey** (``rekey_interval`` after an establishment,
  minus up to ``rekey_jitter``), which is also the **retry** after a failed
  or lost exchange (``retry_base`` doubling to ``retry_max`` after
  ``IMMEDIATE_RETRIES`` fast ones). A due rekey waits while an exchange runs.

The session calls a hook when something happens (``exchange_started``,
``initiator_sent``, ``answer_authenticated``, ``established``, ``failed``,
``collision_lost``...) and asks :meth:`next_deadline` for its one timer.
A generation's lifetime and retire grace are NOT here: the tunnel layer
(``tunnels/timers.py``) is their single owner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from qkdgate.gateway.protocol.config import SessionConfig
from qkdgate.gateway.protocol.constants import (
    EXCHANGE_FREE_TUNNELS,
    EXCHANGE_TIMEOUT_PER_TUNNEL,
    IMMEDIATE_RETRIES,
    RETRANSMIT_PER_TUNNEL,
)
from qkdgate.gateway.protocol.exchange import Exchange


def _beyond_free(config: SessionConfig) -> int:
    return max(0, len(config.tunnels) - EXCHANGE_FREE_TUNNELS)


def exchange_timeout_for(config: SessionConfig) -> float:
    """``exchange_timeout + EXCHANGE_TIMEOUT_PER_TUNNEL * max(0, N - 64)``
    for a peer of N tunnels (docs/protocol.md 7): one exchange keys them all,
    and each side's work grows with N, so a big peer's exchange in a slow
    machine is not abandoned and retried (issue 19: 21-32 s for 1,000
    tunnels in a starved lab VM, against a fixed 30 s)."""
    return config.exchange_timeout + EXCHANGE_TIMEOUT_PER_TUNNEL * _beyond_free(config)


def retransmit_first_for(config: SessionConfig) -> float:
    """``min(retransmit_max, retransmit_base + RETRANSMIT_PER_TUNNEL *
    max(0, N - 64))``: the first retransmission of an initiator message
    (docs/protocol.md 7); it then doubles up to ``retransmit_max`` as before."""
    first = config.retransmit_base + RETRANSMIT_PER_TUNNEL * _beyond_free(config)
    return min(first, max(config.retransmit_base, config.retransmit_max))


class SessionTimers:
    def __init__(self, config: SessionConfig, jitter: Callable[[], float], now: float) -> None:
        self.config = config
        self._jitter = jitter                      # uniform [0, 1) from the injected rng
        self.rekey_at: float | None = now if config.initiate_on_start else None
        self.rekey_reason = "start"
        self.failures = 0                          # failed exchanges since the last success

    # ---------------------------------------------------------------- exchange hooks

    def exchange_started(self, ex: Exchange, now: float) -> None:
        ex.deadline = now + exchange_timeout_for(self.config)

    def initiator_sent(self, ex: Exchange, now: float) -> None:
        """An initiator message left: retransmit it until answered."""
        ex.retx_interval = retransmit_first_for(self.config)
        ex.retx_at = now + ex.retx_interval

    def answer_authenticated(self, ex: Exchange) -> None:
        """The answer we retransmitted for arrived (RESP, DONE)."""
        ex.retx_at = None

    def exchange_ended(self, ex: Exchange) -> None:
        ex.retx_at = None

    def keep_done_cache(self, ex: Exchange, now: float) -> None:
        """A finished responder exchange repeats DONE to a retransmitted
        CONFIRM for one more exchange timeout."""
        ex.deadline = now + exchange_timeout_for(self.config)

    def expired(self, ex: Exchange, now: float) -> bool:
        return now >= ex.deadline

    def retransmit_due(self, ex: Exchange, now: float) -> bool:
        return ex.retx_at is not None and now >= ex.retx_at

    def retransmitted(self, ex: Exchange, now: float) -> None:
        ex.retx_interval = min(ex.retx_interval * 2, self.config.retransmit_max)
        ex.retx_at = now + ex.retx_interval

    # ---------------------------------------------------------------- rekey hooks

    def rekey_due(self, now: float) -> str | None:
        """The reason of a due rekey (and consume it), or None."""
        if self.rekey_at is None or now < self.rekey_at:
            return None
        self.rekey_at = None
        return self.rekey_reason

    def rekey_started(self) -> None:
        """An exchange started on demand: it replaces the scheduled one."""
        self.rekey_at = None

    def established(self, now: float) -> None:
        cfg = self.config
        self.failures = 0
        self.rekey_at = now + cfg.rekey_interval * (1 - cfg.rekey_jitter * self._jitter())
        self.rekey_reason = "timer"

    def failed(self, now: float, retry_in: float | None, *, retries: bool) -> float | None:
        """An exchange failed. ``retries``: whether this side owns a retry
        (the initiator; a responder that began installing). Returns when the
        session tries again (the earlier of the retry and the scheduled rekey)."""
        if not retries:
            return self.rekey_at
        cfg = self.config
        self.failures += 1
        if retry_in is None or self.failures > IMMEDIATE_RETRIES:
            retry_in = min(cfg.retry_max, cfg.retry_base * 2 ** min(self.failures - 1, 30))
            retry_in *= 1 + cfg.rekey_jitter * self._jitter()
        retry_at = now + retry_in
        if self.rekey_at is None or retry_at < self.rekey_at:
            self.rekey_at, self.rekey_reason = retry_at, "retry"
        return self.rekey_at

    def collision_lost(self, now: float) -> None:
        """We dropped our attempt for the peer's: our rekey stays scheduled,
        so if the peer's exchange fails we try again instead of waiting for
        the peer to complete one (issue 17 finding 3)."""
        if self.rekey_at is None:
            cfg = self.config
            self.rekey_at = now + cfg.retry_base * (1 + cfg.rekey_jitter * self._jitter())
            self.rekey_reason = "retry"

    def reconfigured(self, config: SessionConfig, established_at: float | None,
                     now: float) -> None:
        """A reload may shorten the interval: bring the scheduled rekey forward."""
        self.config = config
        if established_at is not None and self.rekey_reason == "timer":
            due = established_at + config.rekey_interval
            if self.rekey_at is None or due < self.rekey_at:
                self.rekey_at = max(now, due)

    def stop(self) -> None:
        self.rekey_at = None

    # ---------------------------------------------------------------- the one timer

    def next_deadline(self, exchanges: Iterable[Exchange], *,
                      rekey_waits: bool | None = None,
                      rekey_not_before: float | None = None) -> float | None:
        """The session's one timer. A due rekey waits for a running exchange
        (``rekey_waits`` None: any); the session passes False when the only
        one running is an unconfirmed answer to an unauthenticated epoch,
        which must not hold its rekey (docs/protocol.md 10.1);
        ``rekey_not_before``: nor before this time (a lost collision's retry)."""
        times: list[float] = []
        busy = False
        for ex in exchanges:
            busy = True
            times.append(ex.deadline)
            if ex.retx_at is not None:
                times.append(ex.retx_at)
        if self.rekey_at is not None and not (busy if rekey_waits is None else rekey_waits):
            at = self.rekey_at            # a due rekey waits for the running exchange
            if rekey_not_before is not None:
                at = max(at, rekey_not_before)
            times.append(at)
        return min(times) if times else None
