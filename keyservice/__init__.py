"""The hybrid key service (issue 22, docs/keyservice.md): ETSI GS QKD 014 and
SKIP keys for devices on the protected side, derived by both gateways from
their confirmed hybrid generations, failing closed."""
