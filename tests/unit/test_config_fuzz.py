"""Fuzz the config loader: any text either parses or raises ConfigError
with a one-line message that points inside the file. Never anything else."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.model import Config, parse_config

BASE = (Path(__file__).resolve().parents[1] / "config" / "good-minimal.yaml").read_text()
LINES = BASE.splitlines()
TOKENS = ["on", "no", "0755", "12:30", "", "~", "[]", "{}", "-1", "1e999", "0x", "!!binary aGk=",
          "&a x", "*a", "'x'", '"\\t"', "[1, [2, {a: 3}]]", "{a: 1, a: 2}", "? x", "|\n  x",
          "70000", "0s", "10.0.0.0/33", "::1", "1h30m", "null", "true", "- x", "%YAML 1.1",
          "\t", "\ufeff", "\x00", "é", "ML-KEM-1024", "macsec", "ipsec", "gw-b", "kme-a",
          "qkdgate-id1:mldsa65-ed25519:AAAA", "0o777", "1_000", ".inf", ".nan"]

mutation = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, len(LINES) - 1), st.just("")),
    st.tuples(st.just("duplicate"), st.integers(0, len(LINES) - 1), st.just("")),
    st.tuples(st.just("value"), st.integers(0, len(LINES) - 1), st.sampled_from(TOKENS)),
    st.tuples(st.just("value"), st.integers(0, len(LINES) - 1), st.text(max_size=12)),
    st.tuples(st.just("insert"), st.integers(0, len(LINES)), st.text(max_size=20)),
    st.tuples(st.just("indent"), st.integers(0, len(LINES) - 1), st.sampled_from([" ", "  ", "\t"])),
)


def mutate(muts):
    lines = list(LINES)
    for kind, i, arg in muts:
        i = min(i, len(lines) - 1) if kind != "insert" else min(i, len(lines))
        if not lines:
            break
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "value":
            head, sep, _ = lines[i].partition(":")
            lines[i] = f"{head}: {arg}" if sep else arg
        elif kind == "insert":
            lines.insert(i, arg)
        elif kind == "indent":
            lines[i] = arg + lines[i]
    return "\n".join(lines) + "\n"


def check(text):
    try:
        cfg = parse_config(text, "f.yaml", base_dir="/etc/qkdgate")
    except ConfigError as exc:
        msg = str(exc)
        # parse or fail with a one-line error that names the file (the invariant)
        assert msg.startswith("f.yaml") and "\n" not in msg, msg
        if exc.line is not None:
            assert 1 <= exc.line <= text.count("\n") + 2, (exc.line, msg)  # noqa: PT017
        return
    assert isinstance(cfg, Config)
    cfg.to_dict()  # a valid config always serialises


@settings(max_examples=400, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_configs_parse_or_raise_configerror(muts):
    check(mutate(muts))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_configerror(text):
    check(text)


def _bomb(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("text,reason", [
    (_bomb(5000), "nested too deeply"),
    ("a: " + _bomb(500), "nested too deeply"),
    (BASE.replace("reqid: 100", "reqid: " + "9" * 5000), "number too long"),
    (BASE.replace("    timeout: 5s\n", "    timeout: 5s\n    options: {x: " + _bomb(40) + "}\n"),
     "nested too deeply"),
    (BASE.replace("timeout: 5s", "timeout: " + "9" * 400 + "s"), "number too large"),
    (BASE.replace("hard_lifetime: 120s", "hard_lifetime: 1e400"), "number too large"),
    ("version: 1\x1f\n", "character not allowed"),
])
def test_hostile_inputs_are_refused_cleanly(text, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.yaml")
    assert reason in str(info.value) and "\n" not in str(info.value)
