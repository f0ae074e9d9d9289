"""The qkdgate peer protocol (wire version 1), sans-IO; see docs/protocol.md.

Modules: ``messages`` (codec), ``fragment`` (UDP fragmentation and bounded
reassembly), ``session`` (:class:`PeerSession`, the state machine the daemon
drives, one class), ``exchange`` (one exchange's data, states and transition
table), ``handshake`` (pure message, signature and tag computations), ``dos``
(rate limit and cookies), ``events`` and ``config``. Nothing here opens a socket, reads the
clock or calls a KME; import the submodules you need (this package imports
nothing, so ``qkdgate --help`` stays fast).
"""
