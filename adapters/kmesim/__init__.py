"""The KME simulator: ETSI GS QKD 014/004 KMEs over HTTPS with mutual TLS,
joined by modelled QKD links (``qkdgate kme-sim``; embed with
``qkdgate.adapters.kmesim.server.KmeSimulator.start``). See docs/qkd.md."""
