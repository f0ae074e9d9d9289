"""Every constant of the qkdgate peer protocol, in one place (wireguard-go's
``device/constants.go``); docs/protocol.md section 11 is the same table.

Theory of operation: wire-format limits are fixed by protocol version 1 and
change only with it; timer and rate values are the defaults of
:class:`~qkdgate.gateway.protocol.config.SessionConfig` (the operator may set
the ones that are fields there); the rest are fixed policy of this
implementation. Modules import what they need from here; nothing else
defines a protocol number.
"""

from __future__ import annotations

from typing import Final

# ---------------------------------------------------------------- wire (version 1)
VERSION: Final = 1                   # header version of every message (docs/protocol.md 4.1)
LABEL: Final = b"qkdgate/1"          # root of every hash and signature context
MAC_LEN: Final = 16                  # mac1, HMAC-SHA-256 truncated (5.1)
COOKIE_LEN: Final = 16               # COOKIE reply, HMAC-SHA-256 truncated (8)
MAX_KEY_IDS: Final = 16              # key_IDs per message (ETSI GS QKD 014 6.3 key_ID)
MAX_QKD_SOURCES: Final = 8           # key sources per peer (sourced key_IDs, issue 13)
MAX_SPIS: Final = 4096               # tunnels per peer (u16 count; docs/protocol.md 3.2)
MAX_TUNNEL_ID: Final = 255           # bytes of one tunnel id on the wire
SPI_ENTRY_MAX: Final = 1 + MAX_TUNNEL_ID + 5   # one ``spis`` entry at most (4.2)
MAX_DETAIL: Final = 120              # bytes of ABORT detail text
DATAGRAM_VERSION: Final = 2          # fragment header version (3.1); 1 had u8 fragment counts
MAX_DATAGRAM: Final = 1200           # bytes: fits IPv6's 1280 minimum MTU (RFC 8200 5)
MESSAGE_FIXED: Final = 8192          # bytes of a message besides its ``spis`` entries
# bytes of one reassembled message, whatever the tunnels (1,077,248: 910 fragments);
# a session accepts no more than its own tunnels need (message_limit, 3.2)
MAX_MESSAGE: Final = MESSAGE_FIXED + MAX_SPIS * SPI_ENTRY_MAX
# room a session leaves beyond its own tunnels' entries, so a peer configured
# with a few more tunnels still gets its INIT decoded and refused by name
MESSAGE_SLACK: Final = 64 * SPI_ENTRY_MAX
MAX_PARTIAL: Final = 4               # messages in reassembly per peer
REASSEMBLY_TIMEOUT: Final = 10.0     # seconds a partial message is kept

# ---------------------------------------------------------------- identities
MAX_PEER_IDENTITIES: Final = 4       # pinned per peer (2 during a rollover)

# ---------------------------------------------------------------- timers (SessionConfig defaults)
REKEY_INTERVAL: Final = 3600.0       # seconds between scheduled rekeys
REKEY_JITTER: Final = 0.05           # fraction of the interval / retry, drawn from rng
RETRANSMIT_BASE: Final = 0.5         # first retransmission of INIT / CONFIRM
RETRANSMIT_MAX: Final = 8.0          # retransmission interval doubles up to this
EXCHANGE_TIMEOUT: Final = 30.0       # an exchange not finished by then fails
# An exchange keys every tunnel of its peer, and the work of each side (SPI
# reservations, key derivation, SA installs) grows with their number: beyond
# EXCHANGE_FREE_TUNNELS both bounds grow linearly (timers.exchange_timeout_for,
# docs/protocol.md 7). 50 ms a tunnel is about twice what a 1,000-tunnel
# exchange took in a starved lab VM (21-32 s, issue 19): 1,000 tunnels 76.8 s,
# 4,096 tunnels 231.6 s. The first retransmission waits 2 ms more a tunnel
# (1,000 tunnels 2.37 s), still capped at retransmit_max, so a big INIT or
# CONFIRM is not resent while the responder is still working on it.
EXCHANGE_FREE_TUNNELS: Final = 64    # up to this many tunnels: the fixed bounds above
EXCHANGE_TIMEOUT_PER_TUNNEL: Final = 0.05   # seconds of exchange timeout per tunnel beyond
RETRANSMIT_PER_TUNNEL: Final = 0.002        # seconds of first retransmission per tunnel beyond
RETRY_BASE: Final = 2.0              # first retry after a failed exchange
RETRY_MAX: Final = 30.0              # kept short: after a partition heals the pair reconverges
IMMEDIATE_RETRIES: Final = 3         # fast restarts (lost QKD key, fallback) before backoff
# An exchange whose peer was heard this recently is not preempted by an INIT
# from another, unauthenticated epoch (split brain of an HA pair: 10.1); the
# first three retransmissions of a live peer fall inside it.
EXCHANGE_HOLD: Final = 4 * RETRANSMIT_BASE   # 2 s
# After losing a collision (docs/protocol.md 7) our retry waits this long
# after our RESP for the CONFIRM of the exchange that won: longer than the
# peer's own work between them (decapsulation, its KME's dec_keys, signing,
# its inbound installs), short enough that a peer gone silent costs little.
YIELD_HOLD: Final = 2 * EXCHANGE_HOLD          # 4 s

# ---------------------------------------------------------------- denial of service
RATE_PER_SECOND: Final = 2.0         # expensive INIT work per peer (token bucket)
RATE_BURST: Final = 8
COOKIE_ROTATE: Final = 120.0         # seconds; the previous cookie secret stays valid
VERIFY_RATE: Final = 8.0             # ML-DSA verifications per exchange and second
VERIFY_BURST: Final = 16             # ... at once; forgeries never abort an exchange
VIOLATION_EVENT_INTERVAL: Final = 1.0  # ProtocolViolation events per kind, at most one per
