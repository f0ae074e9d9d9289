"""Read one connection out of the operator's swanctl.conf.

Theory of operation: vici ``load-conn`` replaces a whole connection, so to
point ``ppk_id`` at generation g qkdgate must send the full definition. The
operator keeps that definition where strongSwan users keep it, in
swanctl.conf (swanctl.conf(5)); qkdgate reads the named
``connections.<name>`` section from the same file and re-sends it with
``ppk_id`` and ``ppk_required`` set (:class:`ConnSpec`).

This reads the subset of strongSwan's settings syntax (strongswan.conf(5),
"SETTINGS SYNTAX") a connection uses: ``name {`` ... ``}`` sections (same-
named sections merge, later keys win, as in strongSwan), ``key = value``
(to the end of the line, or a double-quoted string), ``#`` comments and
``include PATTERN`` (glob, relative to the including file). Section
references (``name : base {``) are refused with a ConfigError rather than
guessed at. Errors name the file and line.
"""

from __future__ import annotations

import glob
import os
from typing import Union

from qkdgate.errors import ConfigError

MAX_INCLUDE_DEPTH = 10

# a settings section: keys to values or to subsections
Section = dict[str, Union[str, "Section"]]


def read_connection(path: str, name: str) -> Section:
    """The ``connections.<name>`` tree of the swanctl.conf at ``path``."""
    tree = parse_file(path)
    conns = tree.get("connections")
    body = conns.get(name) if isinstance(conns, dict) else None
    if not isinstance(body, dict):
        raise ConfigError(f"no connection '{name}' in connections {{ }}", file=path)
    return body


def parse_file(path: str, _depth: int = 0) -> Section:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read swanctl.conf: {e.strerror}", file=path) from None
    return parse(text, path, _depth)


def _merge(into: Section, new: Section) -> None:
    for k, v in new.items():
        old = into.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            _merge(old, v)
        else:
            into[k] = v


def _strip_comment(line: str) -> str:
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def _value(raw: str, path: str, lineno: int) -> str:
    raw = raw.strip()
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise ConfigError("unterminated quoted value", file=path, line=lineno)
        return raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return raw


def parse(text: str, path: str = "<swanctl.conf>", _depth: int = 0) -> Section:
    root: Section = {}
    stack = [root]
    for lineno, line in enumerate(text.splitlines(), 1):
        s = _strip_comment(line).strip()
        if not s:
            continue
        if s == "}":
            if len(stack) == 1:
                raise ConfigError("'}' without a section", file=path, line=lineno)
            stack.pop()
            continue
        if s.startswith(("include ", "include\t")):
            if _depth >= MAX_INCLUDE_DEPTH:
                raise ConfigError("includes nested too deep", file=path, line=lineno)
            pattern = _value(s[len("include"):], path, lineno)
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(os.path.abspath(path)), pattern)
            for inc in sorted(glob.glob(pattern)):
                _merge(stack[-1], parse_file(inc, _depth + 1))
            continue
        if "=" in s and not s.endswith("{"):
            key, _, raw = s.partition("=")
            key = key.strip()
            if not key or any(c.isspace() for c in key):
                raise ConfigError(f"bad key '{key}'", file=path, line=lineno)
            stack[-1][key] = _value(raw, path, lineno)
            continue
        if s.endswith("{"):
            head = s[:-1].strip()
            if ":" in head:
                raise ConfigError("section references ('name : base') are not supported "
                                  "here; write the connection out", file=path, line=lineno)
            if not head or any(c.isspace() for c in head):
                raise ConfigError(f"bad section name '{head}'", file=path, line=lineno)
            sec = stack[-1].get(head)
            if not isinstance(sec, dict):
                sec = stack[-1][head] = {}
            stack.append(sec)
            continue
        # the line itself is not quoted back: it may hold a secret
        raise ConfigError("expected 'key = value', 'name {' or '}'", file=path, line=lineno)
    if len(stack) != 1:
        raise ConfigError("section not closed at end of file", file=path)
    return root
