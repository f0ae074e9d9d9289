"""The `key_service:` section: parsed into the model, cross-checked, built
into a key service with the pools and times it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.model import parse_config
from qkdgate.gateway.daemon import build
from qkdgate.tunnels.policy import KeyPolicy

SHIPPED = (Path(__file__).resolve().parents[2] / "systemd" / "qkdgate.yaml").read_text()
# The shipped example has the section commented out (a fresh install has no
# certificates for it); its YAML lines start with '#key_service:' or '#  '.
EXAMPLE = re.sub(r"^#(?=key_service:|  )", "", SHIPPED, flags=re.M)


def with_(old: str, new: str) -> str:
    assert old in EXAMPLE
    return EXAMPLE.replace(old, new, 1)


def test_shipped_example_starts_without_the_key_service():
    """A fresh install has no key-service certificates or PSK: the shipped
    example leaves the section off, and uncommenting it gives a valid one."""
    assert parse_config(SHIPPED, "/etc/qkdgate/qkdgate.yaml").key_service is None
    assert EXAMPLE != SHIPPED and "\nkey_service:\n" in EXAMPLE


def test_example_builds_the_service():
    cfg = parse_config(EXAMPLE, "/etc/qkdgate/qkdgate.yaml")
    runner = build.key_service(cfg, clock=lambda: 0.0, emit=lambda e: None)
    svc = runner.service
    assert svc.kme_id == "qkdgate-gw-a" and svc.local_saes == {"SAE-A1"}
    spec = svc.pools["app1"].spec
    assert (spec.peer, spec.remote_sae, spec.key_size, spec.keys, spec.lifetime, spec.policy) == \
        ("gw-b", "SAE-B1", 256, 1024, 3600.0, KeyPolicy.HYBRID_REQUIRED)
    assert (svc.times.serve_margin, svc.times.dec_window, svc.times.clock_skew) == (90, 60, 5)
    assert runner._skip[0].accept == "127.0.0.1:9443" and runner._skip[0].tls_mode == "both"


@pytest.mark.parametrize("old,new,path", [
    ("serve_margin: 90s", "serve_margin: 30s", "key_service.serve_margin"),
    ("      peer: gw-b\n      local_sae", "      peer: gw-z\n      local_sae",
     "key_service.pools[0].peer"),
    ("remote_sae: SAE-B1", "remote_sae: SAE-A1", "key_service.pools[0].remote_sae"),
    ("key_size: 256                           # bits; one size per pool", "key_size: 260",
     "key_service.pools[0].key_size"),
    ("lifetime: 1h                            # from", "lifetime: 60s  # from",
     "key_service.pools[0].lifetime"),
    ("local_system: SAE-A1", "local_system: SAE-Z", "key_service.skip[0].local_system"),
    ("ca: /etc/qkdgate/ks/sae-ca.crt}", "ca: null}", "key_service.tls"),
])
def test_cross_checks(old, new, path):
    with pytest.raises(ConfigError) as e:
        parse_config(with_(old, new), "/etc/qkdgate/qkdgate.yaml")
    assert e.value.path == path


def test_no_section_no_service():
    cfg = parse_config(EXAMPLE[:EXAMPLE.index("\n# The hybrid key service")] + "\n",
                       "/etc/qkdgate/qkdgate.yaml")
    assert cfg.key_service is None
    assert build.key_service(cfg, clock=lambda: 0.0, emit=lambda e: None) is None
