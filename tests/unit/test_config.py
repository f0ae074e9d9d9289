"""gateway/config/model.py: strict typing, defaults, cross-checks, lookups."""

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.model import (
    POLICY_LEGS,
    REQID_SPAN,
    Config,
    IpsecCipher,
    KemSuite,
    KeyPolicy,
    LogLevel,
    Profile,
    QkdRole,
    TunnelType,
    load_config,
    parse_config,
)
from qkdgate.gateway.config.validate import warnings
from qkdgate.interfaces import MacsecCipher, Mode

BASE = (Path(__file__).resolve().parents[1] / "config" / "good-minimal.yaml").read_text()


def cfg_with(*subs: tuple[str, str], base: str = BASE) -> str:
    text = base
    for old, new in subs:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def parse(text: str, **kw) -> Config:
    return parse_config(text, "/etc/qkdgate/q.yaml", **kw)


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


# ---------------------------------------------------------------- good input

def test_minimal_config_gets_documented_defaults():
    c = parse(BASE)
    assert c.version == 1
    g = c.gateway
    assert g.name == "gw-a" and g.identity == "/etc/qkdgate/identity.json"  # relative: next to file
    assert g.listen.address == ipaddress.ip_address("0.0.0.0") and g.listen.port == 4600
    assert g.profile is Profile.DEFAULT and g.kem_suite is KemSuite.ML_KEM_768
    assert g.identity_profile == "mldsa65-ed25519"
    p = c.peer("gw-b")
    assert p.port == 4600 and p.psk_file is None and p.identities == ("/etc/qkdgate/gw-b.pub",)
    assert p.qkd.role is QkdRole.MASTER and p.qkd.key_size == 256
    ks = c.key_source("kme-a")
    assert ks.timeout == 5.0 and ks.retries == 3 and dict(ks.options) == {}
    assert ks.tls.ca == "/etc/qkdgate/kme-ca.crt"
    t = c.tunnel("dc1-dc2")
    assert t.type is TunnelType.IPSEC and t.policy is KeyPolicy.HYBRID_REQUIRED
    assert t.ipsec.mode is Mode.TUNNEL and t.ipsec.cipher is IpsecCipher.AES_256_GCM
    assert t.ipsec.replay_window == 1024 and t.ipsec.esn and t.ipsec.mark is None
    assert (t.rekey.interval, t.rekey.soft_lifetime, t.rekey.hard_lifetime) == (60, 90, 120)
    assert c.telemetry.prometheus.enabled is False and c.telemetry.log.level is LogLevel.INFO
    assert c.tunnels_for("gw-b") == (t,)


def test_lookups_of_unknown_names_raise_keyerror():
    c = parse(BASE)
    for fn in (c.peer, c.key_source, c.tunnel):
        with pytest.raises(KeyError):
            fn("nope")


def test_config_is_frozen_and_comparable():
    a, b = parse(BASE), parse(BASE)
    assert a == b
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.gateway.name = "x"  # type: ignore[misc]
    assert parse(cfg_with(("reqid: 100", "reqid: 200"))) != a


def test_string_fields_keep_yaml11_lookalikes_verbatim():
    c = parse(cfg_with(("    timeout: 5s\n", "    timeout: 5s\n    kme_id: on\n"),
                       ("local_sae_id: SAE-A", "local_sae_id: 12:30"),
                       ("peer_sae_id: SAE-B", "peer_sae_id: 0755")))
    assert c.key_source("kme-a").kme_id == "on"
    assert c.peer("gw-b").qkd.local_sae_id == "12:30"
    assert c.peer("gw-b").qkd.peer_sae_id == "0755"


@pytest.mark.parametrize("text,seconds", [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0),
    ("1.5s", 1.5), ("2d", 172800.0), ("7", 7.0), ("2.5", 2.5), ('"45s"', 45.0)])
def test_durations(text, seconds):
    c = parse(cfg_with(("    enabled: false\n", f"    enabled: false\n    interval: {text}\n")))
    assert c.telemetry.mqtt.interval == seconds


@pytest.mark.parametrize("text", ["5 s", "5sec", "-5s", "s", "5m5", '"7"', "1h-30m", "true"])
def test_bad_durations(text):
    e = error(cfg_with(("    enabled: false\n", f"    enabled: false\n    interval: {text}\n")))
    assert e.path == "telemetry.mqtt.interval" and e.line == BASE.count("\n") + 1
    assert e.expected.startswith("a duration such as")


def test_duration_bounds():
    e = error(cfg_with(("timeout: 5s", "timeout: 6m")))
    assert (e.path, e.expected, e.found) == ("key_sources[0].timeout",
                                             "more than 0s and at most 300s", "360s")


def test_explicit_hex_and_octal_integers_are_accepted():
    c = parse(cfg_with(("reqid: 100", "reqid: 0x64"),
                       ("      udp_encap: false\n",
                        "      udp_encap: false\n      mark: {value: 0o17, mask: 0xff}\n")))
    assert c.tunnels[0].ipsec.reqid == 100
    assert c.tunnels[0].ipsec.mark.to_mark().value == 15 and c.tunnels[0].ipsec.mark.mask == 255


@pytest.mark.parametrize("spelling,value", [("true", True), ("True", True), ("TRUE", True),
                                            ("false", False), ("False", False)])
def test_yaml12_core_booleans(spelling, value):
    c = parse(cfg_with(("udp_encap: false", f"udp_encap: {spelling}")))
    assert c.tunnels[0].ipsec.udp_encap is value


@pytest.mark.parametrize("spelling", ["yes", "No", "OFF", "y", "n", '"true"', "1"])
def test_non_core_booleans_are_errors(spelling):
    e = error(cfg_with(("udp_encap: false", f"udp_encap: {spelling}")))
    assert e.expected == "true or false" and e.path == "tunnels[0].ipsec.udp_encap"


def test_listen_address_must_reach_every_peer_family():
    v6_peer = cfg_with(("address: 192.0.2.2", "address: 2001:db8::2"))
    e = error(v6_peer)
    assert e.path == "peers[0].address" and e.expected == "an IPv4 address, or listen on ::"
    dual = v6_peer.replace("  identity: identity.json\n",
                           "  identity: identity.json\n  listen: {address: '::'}\n")
    assert parse(dual).peers[0].address.version == 6
    e = error(BASE.replace("  identity: identity.json\n",
                           "  identity: identity.json\n  listen: {address: '2001:db8::1'}\n"))
    assert e.path == "peers[0].address" and "IPv4 peer" in e.reason


def test_ipv6_everywhere_and_transport_mode_without_subnets():
    text = cfg_with(("  identity: identity.json\n",
                     "  identity: identity.json\n  listen: {address: '::'}\n"),
                    ("address: 192.0.2.2", "address: 2001:db8::2"),
                    ("local_address: 192.0.2.1", "local_address: 2001:db8::1"),
                    ("remote_address: 192.0.2.2", "remote_address: 2001:db8::2"),
                    ("      local_subnets: [10.1.0.0/16]\n      remote_subnets: [10.2.0.0/16]\n",
                     "      mode: transport\n"))
    t = parse(text).tunnels[0]
    assert t.ipsec.mode is Mode.TRANSPORT and t.ipsec.local_subnets == ()
    e = error(text.replace("      mode: transport\n",
                           "      mode: transport\n      remote_subnets: [10.2.0.0/16]\n"))
    assert e.path == "tunnels[0].ipsec.remote_subnets[0]" and "transport mode" in e.reason


def test_options_pass_through_with_strict_plain_types():
    c = parse(cfg_with(("    timeout: 5s\n", "    timeout: 5s\n    options: {preset: idq, "
                        "flag: on, n: 0x10, f: 1.5, b: true, none: null, l: [1, '2']}\n")))
    assert dict(c.key_source("kme-a").options) == {
        "preset": "idq", "flag": "on", "n": 16, "f": 1.5, "b": True, "none": None, "l": (1, "2")}
    e = error(cfg_with(("    timeout: 5s\n", "    timeout: 5s\n    options: {mode: 0644}\n")))
    assert e.path == "key_sources[0].options.mode" and "leading zero" in e.reason


def test_macsec_tunnel_and_default_interface_name():
    text = cfg_with(("    type: ipsec\n",
                     "    type: macsec\n    macsec: {parent: eth1, peer_mac: 02:00:5e:10:00:02}\n"),
                    ("    ipsec:\n", "    x_ipsec:\n"))
    text = text.replace("    x_ipsec:\n", "    rekey_unused:\n", 1)
    text = text[:text.index("    rekey_unused:")] + text[text.index("    rekey:"):]
    t = parse(text).tunnels[0]
    assert t.type is TunnelType.MACSEC and t.macsec.cipher is MacsecCipher.GCM_AES_XPN_256
    assert t.macsec_interface == "qm-dc1-dc2" and t.ipsec is None
    assert t.macsec_peer_sci == 0x02005e100002_0001
    e = error(text.replace("{parent: eth1,", "{parent: eth1, interface: eth1,"))
    assert e.path == "tunnels[0].macsec.interface"
    e = error(text.replace("{parent: eth1,", "{parent: this-name-is-too-long,"))
    assert e.path == "tunnels[0].macsec.parent" and e.expected.startswith("a Linux interface")
    e = error(text.replace("02:00:5e:10:00:02", "01:00:5e:10:00:02"))
    assert e.path == "tunnels[0].macsec.peer_mac" and "unicast" in e.reason
    e = error(text.replace("02:00:5e:10:00:02", "02:00:5e:10:00"))
    assert e.path == "tunnels[0].macsec.peer_mac" and e.expected.startswith("a MAC address")


WG_KEY = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


def _consumer_text(section: str) -> str:
    text = cfg_with(("    type: ipsec\n", section), ("    ipsec:\n", "    x_ipsec:\n"))
    text = text.replace("    x_ipsec:\n", "    rekey_unused:\n", 1)
    return text[:text.index("    rekey_unused:")] + text[text.index("    rekey:"):]


def test_wireguard_and_strongswan_tunnels_name_their_consumer():
    """Issue 21 item 5: a tunnel's type names its key consumer."""
    wg = parse(_consumer_text(
        "    type: wireguard\n    wireguard:\n      interface: wg0\n"
        f"      peer_public_key: {WG_KEY}\n      allowed_ips: [10.9.0.2/32, fd00::2/128]\n"))
    t = wg.tunnels[0]
    assert t.type is TunnelType.WIREGUARD and t.type.consumer == "wireguard"
    assert t.wireguard.interface == "wg0" and t.wireguard.peer_public_key == WG_KEY
    assert [str(n) for n in t.wireguard.allowed_ips] == ["10.9.0.2/32", "fd00::2/128"]
    assert t.ipsec is None and t.macsec is None and t.strongswan is None
    assert TunnelType.IPSEC.consumer == "xfrm"
    sw = parse(_consumer_text("    type: strongswan\n    strongswan: {connection: gw-gw}\n"))
    assert sw.tunnels[0].strongswan.connection == "gw-gw"
    assert sw.tunnels[0].strongswan.vici_socket == "/var/run/charon.vici"


@pytest.mark.parametrize("section,path,why", [
    ("    type: wireguard\n", "tunnels[0]", "needs a 'wireguard' section"),
    ("    type: wireguard\n    wireguard: {interface: wg0, peer_public_key: "
     f"'{WG_KEY}', allowed_ips: []}}\n", "tunnels[0].wireguard.allowed_ips", ""),
    ("    type: wireguard\n    wireguard: {interface: wg0, peer_public_key: "
     f"'{WG_KEY[:-2]}h=', allowed_ips: [10.0.0.0/8]}}\n",
     "tunnels[0].wireguard.peer_public_key", ""),
    ("    type: wireguard\n    wireguard: {interface: wg0, peer_public_key: "
     f"'{WG_KEY}', allowed_ips: [10.0.0.0/8, 10.1.0.0/16]}}\n",
     "tunnels[0].wireguard.allowed_ips[1]", "overlaps"),
    ("    type: strongswan\n", "tunnels[0]", "needs a 'strongswan' section"),
])
def test_consumer_sections_are_checked_with_their_path(section, path, why):
    e = error(_consumer_text(section))
    assert e.path == path and why in e.reason


def test_policy_legs_table_matches_the_docs():
    assert POLICY_LEGS[KeyPolicy.HYBRID_REQUIRED][0] == {"x25519", "mlkem", "qkd"}
    assert KeyPolicy.PQC_FALLBACK.optional == {"qkd"} and KeyPolicy.PQC_FALLBACK.uses_qkd
    assert "qkd" in KeyPolicy.QKD_MANDATORY.required
    assert not KeyPolicy.PQC_ONLY.uses_qkd
    assert set(POLICY_LEGS) == set(KeyPolicy)


def test_cipher_maps_to_kernel_aead_names():
    assert IpsecCipher.AES_256_GCM.aead == "rfc4106(gcm(aes))"
    assert IpsecCipher.CHACHA20_POLY1305.aead == "rfc7539esp(chacha20,poly1305)"


def test_cnsa2_profile_defaults_to_mlkem1024():
    g = parse(cfg_with(("  identity: identity.json\n",
                        "  identity: identity.json\n  profile: cnsa2\n"))).gateway
    assert g.kem_suite is KemSuite.ML_KEM_1024 and g.identity_profile == "mldsa87-ed25519"


def test_inline_pinned_identity_is_checked_by_the_identity_parser():
    from qkdgate.gateway.protocol.identity import LocalIdentity
    pub = LocalIdentity.generate(rng=lambda n: bytes(range(n))).public.to_string()
    c = parse(cfg_with(("[gw-b.pub]", f'["{pub}", gw-b.next.pub]')))
    assert c.peer("gw-b").identities == (pub, "/etc/qkdgate/gw-b.next.pub")
    e = error(cfg_with(("[gw-b.pub]", f'["{pub[:-4]}"]')))
    assert e.path == "peers[0].identities[0]" and e.line == 8


# ---------------------------------------------------------------- cross-checks

@pytest.mark.parametrize("subs,path,reason", [
    ((("  - name: gw-b\n", "  - name: gw-a\n"),), "peers[0].name", "this gateway's name"),
    ((("local_sae_id: SAE-A", "local_sae_id: SAE-B"),), "peers[0].qkd.peer_sae_id", "equals ours"),
    ((("      reqid: 100\n", "      reqid: 100\n      if_id: 0\n"),), "tunnels[0].ipsec.if_id",
     "out of range"),
    ((("remote_address: 192.0.2.2", "remote_address: 192.0.2.1"),),
     "tunnels[0].ipsec.remote_address", "equals the local"),
    ((("remote_address: 192.0.2.2", "remote_address: 224.0.0.1"),),
     "tunnels[0].ipsec.remote_address", "unicast"),
    ((("    timeout: 5s\n", "    timeout: 5s\n    retries: 11\n"),), "key_sources[0].retries",
     "out of range"),
    ((("      hard_lifetime: 120s\n", "      hard_lifetime: 120s\n      grace: 60s\n"),),
     "tunnels[0].rekey.grace", "interval + grace"),
    ((("  mqtt:\n    enabled: false\n", "  mqtt:\n    password_file: pw\n"),),
     "telemetry.mqtt.password_file", "needs a username"),
    ((("  mqtt:\n    enabled: false\n", "  mqtt:\n    topic_prefix: a/#\n"),),
     "telemetry.mqtt.topic_prefix", "invalid value"),
    ((("[gw-b.pub]", "[gw-b.pub, ./gw-b.pub]"),), "peers[0].identities[1]", "duplicate"),
    ((("peer_sae_id: SAE-B\n", "peer_sae_id: SAE-B\n      key_size: 260\n"),),
     "peers[0].qkd.key_size", "whole bytes"),
])
def test_cross_checks(subs, path, reason):
    e = error(cfg_with(*subs))
    assert e.path == path and reason in str(e)
    assert e.file == "/etc/qkdgate/q.yaml" and e.line is not None


def test_reqid_ranges_may_touch_but_not_overlap():
    second = ("  - name: t2\n    peer: gw-b\n    type: ipsec\n    policy: pqc-only\n    ipsec:\n"
              "      local_address: 192.0.2.1\n      remote_address: 192.0.2.2\n"
              "      local_subnets: [10.5.0.0/16]\n      remote_subnets: [10.6.0.0/16]\n"
              "      reqid: {}\ntelemetry:\n")
    ok = parse(cfg_with(("telemetry:\n", second.format(100 + REQID_SPAN))))
    assert [t.ipsec.reqid for t in ok.tunnels] == [100, 116]
    e = error(cfg_with(("telemetry:\n", second.format(100 + REQID_SPAN - 1))))
    assert e.path == "tunnels[1].ipsec.reqid" and e.line == 45


def test_validate_false_skips_cross_checks_only():
    text = cfg_with(("    peer: gw-b\n", "    peer: gw-x\n"))
    assert parse(text, validate=False).tunnels[0].peer == "gw-x"
    with pytest.raises(ConfigError):
        parse(text, validate=False).validate()
    with pytest.raises(ConfigError):
        parse(cfg_with(("reqid: 100", "reqid: x")), validate=False)


def test_error_carries_structured_fields():
    e = error(cfg_with(("    address: 192.0.2.2\n", "    address: 192.0.2.2\n    port: 0\n")))
    assert (e.path, e.line, e.expected, e.found) == ("peers[0].port", 8, "from 1 to 65535", "0")


def test_warnings_for_legal_but_suspicious_settings():
    assert warnings(parse(BASE)) == []
    c = parse(cfg_with(("policy: hybrid-required", "policy: pqc-fallback"),
                       ("    qkd:\n      key_source: kme-a\n      role: master\n"
                        "      local_sae_id: SAE-A\n      peer_sae_id: SAE-B\n", "")))
    assert warnings(c) == [
        "tunnels[0].policy: pqc-fallback but peer 'gw-b' has no qkd section: this tunnel will "
        "run on PQC keys only",
        "key_sources[0]: 'kme-a' is not used by any peer"]


# ---------------------------------------------------------------- files

def test_load_config_resolves_relative_paths_next_to_the_file(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text(BASE)
    c = load_config(f)
    assert c.gateway.identity == str(tmp_path / "identity.json")
    assert c.key_source("kme-a").tls.key == str(tmp_path / "sae-a.key")


def test_load_config_rejects_non_utf8(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_bytes(BASE.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.line == BASE.count("\n") + 1 and "UTF-8" in str(info.value)


@pytest.mark.parametrize("text,reason", [
    ("<<: {version: 1}\n", "merge keys"),
    ("version: !!binary aGVsbG8=\n", "unsupported YAML tag"),
    ("version: !custom 1\n", "unsupported YAML tag"),
    ("? [a, b]\n: 1\n", "keys must be strings"),
])
def test_yaml_features_we_refuse(text, reason):
    e = error(text)
    assert reason in str(e) and e.line == 1


@pytest.mark.parametrize("options,path", [
    ("{profile: no-such-kme}", "key_sources[0].options.profile"),
    ("{enc_keys_method: PUT}", "key_sources[0].options.enc_keys_method"),
    ("{sae_id_format: uuid}", "peers[0].qkd.local_sae_id"),   # SAE-A is not a UUID
])
def test_vendor_options_are_checked_by_the_adapter_rules_at_load_time(options, path):
    e = error(cfg_with(("    timeout: 5s\n", f"    timeout: 5s\n    options: {options}\n")))
    assert e.path == path and e.line in (12, 20)


def test_vendor_kind_gets_its_preset_and_unknown_kinds_a_suggestion():
    assert parse(cfg_with(("kind: etsi014", "kind: toshiba"))).key_sources[0].kind == "toshiba"
    e = error(cfg_with(("kind: etsi014", "kind: etsi14")))
    assert e.path == "key_sources[0].kind" and "did you mean 'etsi014'?" in str(e)


def test_warning_when_tunnels_to_one_peer_rekey_at_different_intervals():
    second = ("  - name: t2\n    peer: gw-b\n    type: ipsec\n    ipsec:\n"
              "      local_address: 192.0.2.1\n      remote_address: 192.0.2.2\n"
              "      local_subnets: [10.5.0.0/16]\n      remote_subnets: [10.6.0.0/16]\n"
              "      reqid: 200\n    rekey: {interval: 30s}\ntelemetry:\n")
    assert warnings(parse(cfg_with(("telemetry:\n", second)))) == [
        "peers[0]: tunnels to 'gw-b' have different rekey intervals; the session with it "
        "rekeys every 30s"]


def test_warning_when_a_key_source_may_fail_after_a_qkd_tunnels_hard_lifetime():
    # BASE: timeout 5 s, retries 3 (20 s to fail); rekey 60 s, hard 120 s: no warning
    assert warnings(parse(BASE)) == []
    slow = cfg_with(("    timeout: 5s\n", "    timeout: 16s\n"))        # 64 s to fail
    assert warnings(parse(slow)) == [
        "tunnels[0].rekey: hybrid-required, and key source 'kme-a' may take 64s (timeout x "
        "(retries + 1)) to fail, more than the 60s from a rekey to the hard lifetime: a KME "
        "that slow blocks this tunnel"]
    assert warnings(parse(cfg_with(("    timeout: 5s\n", "    timeout: 15s\n")))) == []
    # pqc-fallback cuts its QKD wait to fit: no warning
    fallback = cfg_with(("    timeout: 5s\n", "    timeout: 16s\n"),
                        ("policy: hybrid-required", "policy: pqc-fallback"))
    assert not [w for w in warnings(parse(fallback)) if "may take" in w]


@pytest.mark.parametrize("key", ["password", "api_key", "client_secret", "Token"])
def test_inline_secrets_in_options_are_refused(key):
    e = error(cfg_with(("    timeout: 5s\n", f"    timeout: 5s\n    options: {{{key}: hunter2}}\n")))
    assert e.path == f"key_sources[0].options.{key}" and "hunter2" not in str(e)
    ok = parse(cfg_with(("    timeout: 5s\n", f"    timeout: 5s\n    options: {{{key}_file: f}}\n")))
    assert ok.key_sources[0].options[f"{key}_file"] == "f"


def test_json_form_is_itself_a_valid_configuration():
    """JSON is YAML 1.2, so `check-config --json` output can be fed back."""
    import json
    example = Path(__file__).resolve().parents[2] / "systemd" / "qkdgate.yaml"
    c = load_config(example)
    again = parse_config(json.dumps(c.to_dict()), "/elsewhere/x.json")
    assert again == c


def test_warnings_about_exposure_and_rekey_storms():
    c = parse(cfg_with(
        ("  mqtt:\n    enabled: false\n",
         "  mqtt: {enabled: true, host: broker.example, username: u, password_file: pw}\n"
         "  prometheus: {enabled: true, address: '::'}\n"),
        ("      hard_lifetime: 120s\n", "      hard_lifetime: 120s\n      max_bytes: 4096\n")))
    assert warnings(c) == [
        "tunnels[0].rekey.max_bytes: 4096 bytes is under 1 MiB; expect a rekey every few "
        "packets under load",
        "telemetry.mqtt.tls: none towards broker.example: tunnel state and the broker password "
        "travel in clear text",
        "telemetry.prometheus.address: :: serves metrics (topology, key-source health) beyond "
        "this host; firewall it"]
    local = cfg_with(("  mqtt:\n    enabled: false\n", "  mqtt: {enabled: true, host: '[::1]'}\n"))
    assert warnings(parse(local)) == []


def test_two_macsec_links_on_one_parent_need_distinct_sci_ports():
    def macsec(name, extra=""):
        return (f"  - name: {name}\n    peer: gw-b\n    type: macsec\n    policy: pqc-only\n"
                f"    macsec: {{parent: eth1, peer_mac: 02:00:5e:10:00:02{extra}}}\n")
    text = cfg_with(("telemetry:\n", macsec("m1") + macsec("m2") + "telemetry:\n"))
    e = error(text)
    assert e.path == "tunnels[2].macsec.port" and "tunnels[1]" in e.reason and e.line == 45
    ok = parse(text.replace("02:00:5e:10:00:02}\ntelemetry", "02:00:5e:10:00:02, port: 2}\ntelemetry"))
    assert [t.macsec_interface for t in ok.tunnels[1:]] == ["qm-m1", "qm-m2"]
