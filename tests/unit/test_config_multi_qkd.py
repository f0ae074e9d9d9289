"""Several QKD key sources per peer (issue 13 item 2): the sources form, its
rule, and line-numbered errors for bad rules and duplicate sources."""

from pathlib import Path

import pytest

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.model import parse_config
from qkdgate.gateway.config.validate import warnings

BASE = (Path(__file__).resolve().parents[1] / "config" / "good-minimal.yaml").read_text()
SINGLE = ("    qkd:\n      key_source: kme-a\n      role: master\n"
          "      local_sae_id: SAE-A\n      peer_sae_id: SAE-B\n")
assert SINGLE in BASE
KME_B = ("  - name: kme-b\n    kind: etsi014\n    url: https://127.0.0.1:9443\n"
         "    tls: {cert: sae-a.crt, key: sae-a.key, ca: kme-ca.crt}\n")


def multi(rule: str | None = "all", sources: str | None = None, extra: str = "") -> str:
    if sources is None:
        sources = ("        - key_source: kme-a\n"
                   "          local_sae_id: SAE-A\n"
                   "          peer_sae_id: SAE-B\n"
                   "        - key_source: kme-b\n"
                   "          local_sae_id: SAE-A2\n"
                   "          peer_sae_id: SAE-B2\n"
                   "          key_size: 512\n")
    block = ("    qkd:\n      role: master\n"
             + extra + "      sources:\n" + sources
             + (f"      rule: {rule}\n" if rule is not None else ""))
    text = BASE.replace(SINGLE, block)
    return text.replace("tunnels:\n", KME_B + "tunnels:\n", 1)


def parse(text: str):
    return parse_config(text, "/etc/qkdgate/q.yaml")


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def test_single_source_form_reads_as_one_source():
    q = parse(BASE).peers[0].qkd
    assert not q.multi and q.required == 1
    (s,) = q.source_list
    assert (s.key_source, s.local_sae_id, s.peer_sae_id, s.key_size) == \
        ("kme-a", "SAE-A", "SAE-B", 256)


def test_sources_in_configuration_order_with_their_own_sizes():
    cfg = parse(multi("all"))
    q = cfg.peers[0].qkd
    assert q.multi and q.required == 2
    assert [(s.key_source, s.peer_sae_id, s.key_size) for s in q.source_list] == \
        [("kme-a", "SAE-B", 256), ("kme-b", "SAE-B2", 512)]
    assert not any("not used by any peer" in w for w in warnings(cfg))


def test_k_of_n_rule():
    assert parse(multi("1 of 2")).peers[0].qkd.required == 1
    assert parse(multi("2 of 2")).peers[0].qkd.required == 2


@pytest.mark.parametrize(("rule", "reason"), [
    ("3 of 2", "more sources required than configured"),
    ("0 of 2", "at least one source must deliver"),
    ("1 of 3", "the rule counts 3 sources but sources lists 2"),
])
def test_bad_rules_name_the_rule_line(rule, reason):
    text = multi(rule)
    e = error(text)
    assert e.reason == reason
    assert e.path == "peers[0].qkd.rule"
    assert e.line == line_of(text, "rule:")


@pytest.mark.parametrize("rule", ["most", "2of2", "two of 2", "-1 of 2"])
def test_rule_spelling(rule):
    e = error(multi(rule))
    assert e.path == "peers[0].qkd.rule" and "K of N" in (e.expected or "")


def test_duplicate_source_names_the_second_entry_line():
    text = multi("all", sources=("        - key_source: kme-a\n"
                                 "          local_sae_id: SAE-A\n"
                                 "          peer_sae_id: SAE-B\n"
                                 "        - key_source: kme-a\n"
                                 "          local_sae_id: SAE-A\n"
                                 "          peer_sae_id: SAE-B\n"))
    e = error(text)
    assert e.reason.startswith("duplicate source")
    assert e.path == "peers[0].qkd.sources[1]"
    assert e.line == [n for n, line in enumerate(text.splitlines(), 1)
                      if "- key_source: kme-a" in line][1]


def test_both_forms_at_once_is_an_error():
    text = multi("all", extra="      key_source: kme-a\n")
    e = error(text)
    assert e.path == "peers[0].qkd.key_source"
    assert e.line == line_of(text, "      key_source: kme-a")


def test_unknown_source_in_a_list_points_into_the_list():
    text = multi("all").replace("        - key_source: kme-b", "        - key_source: kme-x")
    e = error(text)
    assert (e.path, e.line) == ("peers[0].qkd.sources[1].key_source",
                                line_of(text, "key_source: kme-x"))


def test_rule_without_sources_and_missing_single_fields():
    e = error(BASE.replace(SINGLE, SINGLE + "      rule: 1 of 1\n"))
    assert e.path == "peers[0].qkd.rule"
    e = error(BASE.replace(SINGLE, "    qkd:\n      role: master\n      local_sae_id: SAE-A\n"
                                   "      peer_sae_id: SAE-B\n"))
    assert e.path == "peers[0].qkd" and "key_source" in e.reason and e.line == 10


def test_same_sae_id_of_one_source_on_two_peers_is_still_refused():
    text = multi("all")
    second = ("  - name: gw-c\n    address: 192.0.2.3\n    identities: [gw-c.pub]\n"
              "    qkd:\n      role: slave\n      key_source: kme-b\n"
              "      local_sae_id: SAE-A2\n      peer_sae_id: SAE-B2\n")
    text = text.replace("key_sources:\n", second + "key_sources:\n", 1)
    e = error(text)
    assert e.path == "peers[1].qkd.peer_sae_id" and "peers[0]" in e.reason
