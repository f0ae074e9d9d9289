"""QKD key sources: implementations of :class:`qkdgate.interfaces.KeySource`.

Theory of operation: ``create_key_source(kind, settings)`` in
:mod:`qkdgate.adapters.registry` builds a source for one ``key_sources``
config entry. The built-in kinds are the ETSI GS QKD 014 client
(:mod:`.etsi014`, messages in :mod:`.etsi014_codec`, HTTPS in :mod:`.https`)
with vendor presets (:mod:`.profiles`); :mod:`.etsi004` is an ETSI GS QKD 004
client. :mod:`.kmesim` is the KME simulator used by tests and the demo.
See docs/qkd.md.
"""
