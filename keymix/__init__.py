"""qkdgate.keymix: the pure hybrid key core.

Theory of operation: :mod:`.kem` (ML-KEM via pyca/cryptography, liboqs) and
:mod:`.classical` (X25519) produce shared secrets; :mod:`.combiner` mixes them
with a QKD key and the handshake transcript hash into one session secret per
rekey; :mod:`.schedule` derives every ESP/MACsec SA key and the key
confirmation values from it under the label tree of :mod:`.labels`;
:mod:`.secret` keeps all of it out of logs, reprs and pickles. Nothing here
does I/O: no asyncio, sockets, YAML or netlink. docs/keymix.md is the
byte-exact specification; tests/vectors holds its known answers.
"""
