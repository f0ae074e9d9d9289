"""The qkdgate peer protocol (wire version 1), sans-IO; see docs/protocol.md.

Modules: ``messages`` (codec), ``fragment`` (UDP fragmentation and bounded
reassembly), ``session`` (:class:`PeerSession`, the state machine the daemon
drives; its halves live in ``initiator``, ``responder`` and ``lifecycle``),
``exchange`` (per-exchange state and bindings), ``dos`` (rate limit and
cookies), ``events`` and ``config``. Nothing here opens a socket, reads the
clock or calls a KME; import the submodules you need (this package imports
nothing, so ``qkdgate --help`` stays fast).
"""
