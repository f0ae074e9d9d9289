"""docs/config.md documents every key of the schema, and the shipped
example sets every key, so neither can drift from gateway/config/model.py."""

import dataclasses
import re
import typing
from pathlib import Path

from qkdgate.gateway.config.model import Config

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "config.md").read_text()


def _dataclass_in(tp):
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if dataclasses.is_dataclass(tp):
        return tp, ""
    for arg in typing.get_args(tp):
        found = _dataclass_in(arg)
        if found:
            return found[0], "[]" if typing.get_origin(tp) is tuple else found[1]
    return None


def schema_sections(cls=Config, path=""):
    """{'tunnels[].ipsec': ['local_address', ...], ...} for every mapping."""
    hints = typing.get_type_hints(cls, include_extras=True)
    keys = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    out = {path: keys}
    for key in keys:
        found = _dataclass_in(hints[key])
        if found:
            sub, suffix = found
            out.update(schema_sections(sub, f"{path}.{key}{suffix}".lstrip(".")))
    return out


def doc_section(path):
    if not path:
        start = DOC.index("## Top level")
    else:
        m = re.search(r"^#+ .*`" + re.escape(path) + r"`", DOC, re.M)
        assert m, f"docs/config.md has no section for `{path}`"
        start = m.start()
    end = DOC.find("\n#", start + 1)
    return DOC[start:end if end != -1 else len(DOC)]


def test_every_schema_key_is_documented():
    sections = schema_sections()
    assert "tunnels[].ipsec.mark" in sections and "telemetry.mqtt.tls" in sections
    for path, keys in sections.items():
        text = doc_section(path)
        rows = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
        assert rows == set(keys), f"{path or 'top level'}: docs list {sorted(rows)}, schema {keys}"


def test_shipped_example_mentions_every_key():
    example = (ROOT / "systemd" / "qkdgate.yaml").read_text()
    # key_service and ha are commented out there (they need certificates,
    # keepalived): count their keys too
    example = re.sub(r"^#(?=key_service:|ha:|  )", "", example, flags=re.M)
    written = set(re.findall(r"^\s*(?:- )?([a-z_]+):", example, re.M))
    written |= set(re.findall(r"[{,]\s*([a-z_]+):", example))
    every = {k for keys in schema_sections().values() for k in keys}
    assert every - written == set()
