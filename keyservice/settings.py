"""What the key service is told: its pools and its times (docs/keyservice.md 5).

The config (qkdgate.gateway.config) reads the YAML and builds these; the
service reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from qkdgate.errors import LocalProtocolError
from qkdgate.keymix.keypool import MAX_KEY_BITS, MIN_KEY_BITS
from qkdgate.tunnels.policy import KeyPolicy

DEFAULT_SERVE_MARGIN = 90.0     # T: a generation stops serving T before it expires
DEFAULT_DEC_WINDOW = 60.0       # W: dec_keys accepts a generation W after it stops serving
DEFAULT_CLOCK_SKEW = 5.0        # added to W on the fetching side
DEFAULT_LIFETIME = 3600.0
DEFAULT_POOL_KEYS = 1024        # indices per generation, both halves together
MAX_KEY_PER_REQUEST = 128


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One pool: the keys of one SAE pair across one peer pair.

    ``local_sae`` is attached to this gateway, ``remote_sae`` to ``peer``; the
    peer's configuration names the same pool with the two SAEs swapped."""

    name: str
    peer: str
    local_sae: str
    remote_sae: str
    key_size: int = 256                 # bits; one size per pool
    keys: int = DEFAULT_POOL_KEYS       # indices per generation (each gateway serves half)
    lifetime: float = DEFAULT_LIFETIME  # seconds from confirmation to erasure
    policy: KeyPolicy = KeyPolicy.HYBRID_REQUIRED
    skip_port: int | None = None        # loopback port of this pool's SKIP backend

    def check(self, times: ServiceTimes) -> None:
        if self.key_size % 8 or not MIN_KEY_BITS <= self.key_size <= MAX_KEY_BITS:
            raise LocalProtocolError(f"pool {self.name}: key size {self.key_size} bits")
        if not 2 <= self.keys <= 1 << 20:
            raise LocalProtocolError(f"pool {self.name}: keys {self.keys} not in 2..2^20")
        if self.local_sae == self.remote_sae:
            raise LocalProtocolError(f"pool {self.name}: the two SAEs must differ")
        if self.lifetime <= times.serve_margin:
            raise LocalProtocolError(f"pool {self.name}: lifetime must exceed serve_margin")


@dataclass(frozen=True, slots=True)
class ServiceTimes:
    serve_margin: float = DEFAULT_SERVE_MARGIN    # T
    dec_window: float = DEFAULT_DEC_WINDOW        # W
    clock_skew: float = DEFAULT_CLOCK_SKEW

    def check(self) -> None:
        if min(self.serve_margin, self.dec_window, self.clock_skew) < 0:
            raise LocalProtocolError("key-service times must not be negative")
        if self.dec_window + self.clock_skew > self.serve_margin:
            # A key served just before its generation stops serving must stay
            # fetchable (W + skew) before the generation's secret is erased.
            raise LocalProtocolError("serve_margin must be at least dec_window + clock_skew")
