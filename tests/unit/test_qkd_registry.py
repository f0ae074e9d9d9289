"""Key-source registry (entry points), vendor profiles, settings and the
kme-sim command's argument checks."""

import argparse
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint

import pytest

from qkdgate.adapters import registry
from qkdgate.adapters.profiles import PROFILES, get_profile
from qkdgate.adapters.settings import source_settings
from qkdgate.errors import ConfigError


class _PluginSource:
    def __init__(self, settings):
        self.settings = settings

    async def get_new_keys(self, peer_sae_id, number=1, size_bits=256, additional_slave_sae_ids=()):
        return []

    async def get_keys_by_id(self, master_sae_id, key_ids):
        return []

    async def status(self, peer_sae_id):
        raise NotImplementedError

    async def close(self):
        pass


def plugin_factory(settings):
    return _PluginSource(settings)


def _fake_entry_points(monkeypatch, *eps):
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [e for e in eps if e.group == group])


def test_third_party_kind_from_entry_point(monkeypatch):
    ep = EntryPoint("acme", f"{__name__}:plugin_factory", registry.GROUP)
    _fake_entry_points(monkeypatch, ep)
    src = registry.create_key_source("acme", {"x": 1})
    assert isinstance(src, _PluginSource) and src.settings == {"x": 1}
    assert "acme" in registry.available_kinds() and "etsi014" in registry.available_kinds()


def test_plugin_cannot_replace_a_builtin(monkeypatch):
    ep = EntryPoint("etsi014", f"{__name__}:plugin_factory", registry.GROUP)
    _fake_entry_points(monkeypatch, ep)
    assert registry.find_factory("etsi014") is not plugin_factory


def test_unknown_broken_and_ambiguous_kinds(monkeypatch):
    _fake_entry_points(monkeypatch,
                       EntryPoint("broken", "no_such_module_xyz:f", registry.GROUP),
                       EntryPoint("twice", "a:f", registry.GROUP),
                       EntryPoint("twice", "b:f", registry.GROUP))
    with pytest.raises(ConfigError, match="unknown key source kind"):
        registry.create_key_source("nope", {})
    with pytest.raises(ConfigError, match="cannot load key source plugin"):
        registry.create_key_source("broken", {})
    with pytest.raises(ConfigError, match="several packages"):
        registry.create_key_source("twice", {})


def test_non_keysource_plugin_is_refused(monkeypatch):
    _fake_entry_points(monkeypatch, EntryPoint("odd", "builtins:dict", registry.GROUP))
    with pytest.raises(ConfigError, match="does not implement KeySource"):
        registry.create_key_source("odd", {})


def test_vendor_kinds_build_the_etsi014_client_with_their_profile(tmp_path):
    for f in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / f).write_text("x")
    settings = {"name": "kme", "url": "https://kme.example:443",
                "tls": {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem"),
                        "ca": str(tmp_path / "ca.pem")}}
    # the dummy PEM files fail to load: a clear config error, not a crash
    with pytest.raises(ConfigError, match="cannot load certificate"):
        registry.create_key_source("idq-cerberis-xgr", settings)


def test_profiles_are_sourced_and_overridable():
    for p in PROFILES.values():
        assert p.sources and p.default_key_bits % 8 == 0
    assert get_profile("idq-cerberis-xgr").enc_keys_method == "GET"
    assert get_profile("toshiba").enc_keys_method == "POST"
    p = get_profile("generic", {"enc_keys_method": "get", "key_size": 512,
                                "sae_id_format": "uuid", "empty_pool_statuses": [400, 503]})
    assert (p.enc_keys_method, p.default_key_bits, p.empty_pool_statuses) == \
        ("GET", 512, frozenset({400, 503}))
    with pytest.raises(ConfigError, match="UUID"):
        p.check_sae_id("SAE-A")
    with pytest.raises(ConfigError, match="unknown KME profile"):
        get_profile("acme")
    with pytest.raises(ConfigError):
        get_profile("generic", {"key_size": 100})


@dataclass(frozen=True)
class _Tls:
    cert: str = "/c"
    key: str = "/k"
    ca: str = "/ca"


@dataclass(frozen=True)
class _Entry:   # the shape of gateway/config/model.py's KeySourceConfig
    name: str = "kme-a"
    kind: str = "etsi014"
    url: str = "https://10.0.0.1:8443"
    tls: _Tls = _Tls()
    kme_id: str = "KME-A"
    timeout: float = 2.0
    retries: int = 1
    options: dict = field(default_factory=dict)


def test_settings_from_a_config_dataclass_or_mapping():
    s = source_settings(_Entry())
    assert (s.name, s.url, s.tls.ca, s.kme_id, s.timeout, s.retries) == \
        ("kme-a", "https://10.0.0.1:8443", "/ca", "KME-A", 2.0, 1)
    with pytest.raises(ConfigError, match=r"key_sources\[x\]\.retries"):
        source_settings({"name": "x", "url": "https://k", "retries": 99})


def test_kme_sim_refuses_state_dir_in_source_tree():
    from qkdgate.gateway.cli import kme_sim as cli
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--state-dir", str(cli._SOURCE_TREE / "state")])
    with pytest.raises(ConfigError, match="source tree"):
        cli.run(args)
    with pytest.raises(ConfigError, match="two distinct"):
        cli.run(p.parse_args(["--kmes", "KME-A", "--state-dir", "/tmp/x"]))
