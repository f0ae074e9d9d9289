"""The per-tunnel key policy: which key legs a generation must have.

Theory of operation: a generation's keys are mixed from up to three legs
(``x25519``, ``mlkem``, ``qkd``). A tunnel's :class:`KeyPolicy` names the
legs it requires and the ones it accepts missing; the tunnel manager checks
every generation against it before any key reaches the kernel. The config
(qkdgate.gateway.config.model) names the policy of each tunnel and imports
it from here, so the tunnels layer imports nothing from the gateway.
"""

from __future__ import annotations

import enum


class KeyPolicy(enum.Enum):
    """Which key legs a tunnel's rekey needs. A *required* leg missing makes
    the rekey fail (closed: the old SA expires, traffic stops); an *optional*
    leg is mixed in when available. See :data:`POLICY_LEGS`."""
    HYBRID_REQUIRED = "hybrid-required"
    PQC_FALLBACK = "pqc-fallback"
    QKD_MANDATORY = "qkd-mandatory"
    PQC_ONLY = "pqc-only"

    @property
    def required(self) -> frozenset[str]:
        return POLICY_LEGS[self][0]

    @property
    def optional(self) -> frozenset[str]:
        return POLICY_LEGS[self][1]

    @property
    def blocks_on_qkd_loss(self) -> bool:
        """``qkd-mandatory``: when the QKD source fails or alarms, block at
        once instead of running the current keys to their hard lifetime."""
        return self is KeyPolicy.QKD_MANDATORY

    @property
    def uses_qkd(self) -> bool:
        return "qkd" in self.required or "qkd" in self.optional


LEGS = ("x25519", "mlkem", "qkd")
POLICY_LEGS: dict[KeyPolicy, tuple[frozenset[str], frozenset[str]]] = {
    KeyPolicy.HYBRID_REQUIRED: (frozenset({"x25519", "mlkem", "qkd"}), frozenset()),
    KeyPolicy.PQC_FALLBACK: (frozenset({"x25519", "mlkem"}), frozenset({"qkd"})),
    KeyPolicy.QKD_MANDATORY: (frozenset({"x25519", "mlkem", "qkd"}), frozenset()),
    KeyPolicy.PQC_ONLY: (frozenset({"x25519", "mlkem"}), frozenset()),
}
