"""A QKD link model for the KME simulator: decoy-state BB84 key rates.

Theory of operation: :func:`secret_key_rate` evaluates the asymptotic
decoy-state BB84 (GLLP) formulas of the shared link-model summary
(/work/shared/specs/qkd-link-model.md; Lo, Ma, Chen, PRL 94 230504 (2005);
Ma et al., PRA 72 012326 (2005)) for a fibre of given length and a detector
type. :class:`QkdLink` turns the rate into a key pool shared by the two
KMEs at its ends: key arrives in whole post-processing blocks (bursts), the
pool is capped at ``max_key_count`` keys, delivery empties it. An
intercept-resend eavesdropper on a fraction p of photons adds about
p * 25 % QBER; above the abort threshold the link produces nothing and
raises an alarm the KMEs report in their status extension.

The model is pure: time comes in as ``now`` arguments (seconds, any
monotonic origin), so tests advance a fake clock instead of sleeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

ALARM_QBER = "QBER_ABOVE_THRESHOLD"
ALARM_LINK_DOWN = "LINK_DOWN"

# Detector defaults from the link-model summary: InGaAs APD vs SNSPD.
DETECTORS = {
    "ingaas": {"eta_det": 0.25, "y0": 1e-6},
    "snspd": {"eta_det": 0.80, "y0": 1e-8},
}


def h2(x: float) -> float:
    """Binary entropy, 0 at the ends."""
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1 - x) * math.log2(1 - x)


@dataclass(frozen=True, slots=True)
class LinkParams:
    distance_km: float = 10.0
    alpha_db_per_km: float = 0.2       # 0.16 for ultra-low-loss fibre
    insertion_loss_db: float = 0.0     # connectors, splices, Bob's optics beyond eta_bob
    detector: str = "ingaas"
    eta_det: float | None = None       # None: the detector type's default
    y0: float | None = None            # dark-count yield per pulse; None: detector default
    eta_bob: float = 0.5
    mu: float = 0.5                    # signal-state mean photon number
    e_d: float = 0.015                 # optical misalignment error
    f_ec: float = 1.16                 # error-correction inefficiency
    q: float = 1.0                     # sifting factor (efficient BB84)
    rep_rate_hz: float = 1e9
    eta_fk: float = 1.0                # finite-key factor (0.2-0.6 in practice)
    block_bits: int = 131072           # post-processing block: key arrives in these bursts
    qber_threshold: float = 0.08       # systems abort at 5-8 % (summary); 11 % is the BB84 limit

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {sorted(DETECTORS)}")
        if self.distance_km < 0 or self.rep_rate_hz <= 0 or self.block_bits <= 0:
            raise ValueError("distance, repetition rate and block size must be positive")
        if not 0 < self.mu < 5 or not 0 < self.qber_threshold < 0.5:
            raise ValueError("mu or QBER threshold out of range")

    @property
    def detector_efficiency(self) -> float:
        return self.eta_det if self.eta_det is not None else DETECTORS[self.detector]["eta_det"]

    @property
    def dark_yield(self) -> float:
        return self.y0 if self.y0 is not None else DETECTORS[self.detector]["y0"]


# A realistic commercial-system default (summary: "about 1 Mb/s at 10 km"):
# the asymptotic rate times a finite-key factor of 0.06 (3-10x below theory
# for implementation losses, times 0.2-0.6 finite-key).
REALISTIC = LinkParams(eta_fk=0.06)


def secret_key_rate(p: LinkParams, eve_fraction: float = 0.0) -> tuple[float, float]:
    """(secret key rate in bit/s, QBER) for ``p`` with an intercept-resend
    eavesdropper on ``eve_fraction`` of the photons."""
    t = 10 ** (-(p.alpha_db_per_km * p.distance_km + p.insertion_loss_db) / 10)
    eta = t * p.eta_bob * p.detector_efficiency
    y0, mu, e0 = p.dark_yield, p.mu, 0.5
    gain = 1 - math.exp(-eta * mu)
    q_mu = y0 + gain
    e_mu = (e0 * y0 + p.e_d * gain) / q_mu
    y1 = y0 + eta
    e1 = (e0 * y0 + p.e_d * eta) / y1
    q1 = y1 * mu * math.exp(-mu)
    extra = 0.25 * min(max(eve_fraction, 0.0), 1.0)
    e_mu, e1 = min(e_mu + extra, 0.5), min(e1 + extra, 0.5)
    r = p.q * (q1 * (1 - h2(e1)) - p.f_ec * q_mu * h2(e_mu))
    return max(r, 0.0) * p.rep_rate_hz * p.eta_fk, e_mu


@dataclass
class QkdLink:
    """The key pool between two KMEs, fed by the modelled rate in bursts.

    ``stored_bits`` is what both ends hold and have not yet handed out.
    Faults: ``up = False`` (fibre cut), ``eve_fraction`` (eavesdropper),
    ``paused`` (exhausted pool that does not refill).
    """

    kme_a: str
    kme_b: str
    params: LinkParams = field(default_factory=lambda: REALISTIC)
    key_size: int = 256
    max_key_count: int = 100000
    now: float = 0.0
    stored_bits: int = 0
    up: bool = True
    paused: bool = False
    eve_fraction: float = 0.0
    produced_bits: int = 0
    _carry: float = 0.0

    @property
    def capacity_bits(self) -> int:
        return self.max_key_count * self.key_size

    def rate(self) -> tuple[float, float]:
        return secret_key_rate(self.params, self.eve_fraction)

    def alarms(self) -> list[str]:
        out = []
        if not self.up:
            out.append(ALARM_LINK_DOWN)
        if self.rate()[1] > self.params.qber_threshold:
            out.append(ALARM_QBER)
        return out

    def producing(self) -> bool:
        return self.up and not self.paused and not self.alarms()

    def advance(self, now: float) -> int:
        """Move the link to time ``now``; returns the bits added to the pool."""
        dt = max(0.0, now - self.now)
        self.now = max(self.now, now)
        if not self.producing():
            # A QBER alarm discards the block in progress: it may be known to Eve.
            self._carry = 0.0
            return 0
        self._carry += self.rate()[0] * dt
        blocks = int(self._carry // self.params.block_bits)
        if not blocks:
            return 0
        self._carry -= blocks * self.params.block_bits
        before = self.stored_bits
        self.stored_bits = min(self.capacity_bits, before + blocks * self.params.block_bits)
        self.produced_bits += blocks * self.params.block_bits
        return self.stored_bits - before

    def stored_keys(self, size: int | None = None) -> int:
        return self.stored_bits // (size or self.key_size)

    def take(self, bits: int) -> bool:
        """Consume ``bits`` of key for delivery, all or nothing."""
        if bits > self.stored_bits or not self.up or self.alarms():
            return False
        self.stored_bits -= bits
        return True

    def fill(self, keys: int | None = None) -> None:
        """Test/demo helper: pre-fill the pool (to capacity by default)."""
        bits = self.capacity_bits if keys is None else keys * self.key_size
        self.stored_bits = min(self.capacity_bits, self.stored_bits + bits)

    def drain(self) -> None:
        self.stored_bits = 0
        self._carry = 0.0

    def with_params(self, *, distance_km: float) -> None:
        """Change the fibre length (the admin API's one live knob); LinkParams checks it."""
        self.params = replace(self.params, distance_km=distance_km)
