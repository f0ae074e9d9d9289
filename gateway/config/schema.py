"""A strict typed-schema walker from YAML nodes to frozen dataclasses.

Theory of operation: ruamel.yaml only *composes* the file into a node tree
(no construction, so no YAML 1.1 or 1.2 implicit typing decides anything and
no tag can instantiate an object). This module then walks that tree guided
by the dataclass type hints in :mod:`qkdgate.gateway.config.model`: every value is
converted by the type the schema wants, from the scalar's *source text*.

Consequences an operator can rely on:

* a string field keeps exactly what was written (``on`` stays ``"on"``,
  ``12:30`` stays ``"12:30"``);
* a bool field accepts only ``true``/``false``; ``on``/``yes``/``no`` are an
  error naming the YAML 1.1 trap (YAML 1.2 core schema, 10.3.2);
* an int field rejects ``0755`` (YAML 1.1 octal, YAML 1.2 decimal: the same
  text means two numbers, so we refuse to guess) and ``12:30`` (YAML 1.1
  sexagesimal); ``0o755`` and ``0x1ed`` are explicit and accepted;
* quoted scalars are strings: ``port: "4600"`` is an error, not a number;
* unknown and duplicate keys, anchors/aliases, merge keys (``<<``) and
  non-core tags are rejected.

Every error is a :class:`~qkdgate.errors.ConfigError` with file, line, YAML
path, what was expected and what was found. The walker also records the line
of every path it visits so later cross-checks can point at the right line.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import ipaddress
import math
import os
import re
import types
import typing
from collections import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qkdgate.errors import ConfigError

_CORE_TAGS = {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map",
                                                   "seq")}
_NULLS = {"", "~", "null", "Null", "NULL"}
_TRUE = {"true", "True", "TRUE"}          # YAML 1.2 core schema 10.3.2
_FALSE = {"false", "False", "FALSE"}
_YAML11_BOOLS = {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO",
                 "on", "On", "ON", "off", "Off", "OFF"}
_INT_RE = re.compile(r"[-+]?(?:0|[1-9][0-9]*)\Z")
_HEX_RE = re.compile(r"0x[0-9a-fA-F]+\Z")
_OCT_RE = re.compile(r"0o[0-7]+\Z")
_LEADING_ZERO_RE = re.compile(r"[-+]?0[0-9]+\Z")
_SEXAGESIMAL_RE = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?\Z")
_FLOAT_RE = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\Z")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MAX_NUMBER_CHARS = 40   # Python refuses int() of > 4300 digits; no setting needs 40
_MAX_DEPTH = 16
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")

IPv4or6 = ipaddress.IPv4Address | ipaddress.IPv6Address
NetV4or6 = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A config dataclass's annotations, resolved once per class: they are
    strings (``from __future__ import annotations``) that get_type_hints
    compiles and evaluates again at every call, and the builder asks for
    each mapping of the file (issue 19: 3 per tunnel at every start)."""
    return typing.get_type_hints(cls, include_extras=True)


# ---------------------------------------------------------------- markers
# Used inside typing.Annotated[...] in the schema dataclasses.


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive bounds for an int/float/duration; ``gt`` makes ``lo`` exclusive."""
    lo: float | None = None
    hi: float | None = None
    gt: bool = False


@dataclass(frozen=True, slots=True)
class Length:
    """Bounds on the number of items in a list."""
    lo: int = 0
    hi: int | None = None


class Duration:
    """Marker: ``500ms``, ``30s``, ``5m``, ``1h``, ``1h30m`` or a number of seconds -> float."""


class FilePath:
    """Marker: a file path; relative paths are resolved against the config file's folder."""


@dataclass(frozen=True, slots=True)
class PathOrLiteral:
    """Marker: a file path, or (when it starts with ``prefix``) a literal kept verbatim."""
    prefix: str


class Name:
    """Marker: an identifier used for cross references and log/metric labels."""


@dataclass(frozen=True, slots=True)
class Pattern:
    regex: str
    expected: str


# ---------------------------------------------------------------- walker

@dataclass(slots=True)
class Walk:
    """State of one walk: the file name for errors, the folder relative paths
    are resolved against, and the line of every path seen."""

    file: str
    base_dir: str
    lines: dict[str, int] = dataclasses.field(default_factory=dict)

    def error(self, node: Any, path: str, message: str, *, expected: str | None = None,
              found: str | None = None) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else self.lines.get(path)
        if node is not None and _is_null(node) and node.value == "" and path in self.lines:
            line = self.lines[path]   # "key:" with no value: the mark is on the next token
        return ConfigError(message, file=self.file, line=line, path=path or None,
                           expected=expected, found=found)

    def build(self, tp: Any, node: Any, path: str) -> Any:
        self._check_node(node, path)
        self.lines.setdefault(path, node.start_mark.line + 1)
        markers: tuple[object, ...] = ()
        if typing.get_origin(tp) is typing.Annotated:
            tp, *rest = typing.get_args(tp)
            markers = tuple(rest)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            members = [a for a in args if a is not type(None)]
            if len(members) < len(args) and _is_null(node):
                return None
            if set(members) == set(typing.get_args(IPv4or6)):
                return self._address(node, path)
            if set(members) == set(typing.get_args(NetV4or6)):
                return self._network(node, path)
            if len(members) == 1:
                inner = members[0]
                if markers:
                    inner = typing.Annotated[(inner, *markers)]
                return self.build(inner, node, path)
            raise TypeError(f"schema type {tp!r} not supported")  # our bug, not the operator's
        if origin is tuple:
            return self._sequence(args[0], markers, node, path)
        if origin in (dict, abc.Mapping) or tp is Mapping:
            return self._free_mapping(node, path)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.dataclass(tp, node, path)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._enum(tp, node, path)
        if tp is bool:
            return self._bool(node, path)
        if tp is int:
            return self._ranged(self._int(node, path), markers, node, path)
        if tp is float:
            if any(m is Duration for m in markers):
                return self._ranged(self._duration(node, path), markers, node, path, unit="s")
            return self._ranged(self._float(node, path), markers, node, path)
        if tp is str:
            return self._string(node, path, markers)
        raise TypeError(f"schema type {tp!r} not supported")

    # -- structure

    def _check_node(self, node: Any, path: str) -> None:
        if getattr(node, "anchor", None):
            raise self.error(node, path, "YAML anchors and aliases are not supported",
                             expected="the value written out", found=f"&{node.anchor}")
        if node.tag not in _CORE_TAGS:
            raise self.error(node, path, "unsupported YAML tag", expected="no tag",
                             found=str(node.tag))

    def _mapping_items(self, node: Any, path: str, what: str) -> list[tuple[str, Any, Any]]:
        if node.id != "mapping":
            raise self.error(node, path, "wrong type", expected=what, found=describe(node))
        seen: dict[str, int] = {}
        items = []
        for knode, vnode in node.value:
            kpath = _join(path, getattr(knode, "value", "?"))
            if knode.tag == "tag:yaml.org,2002:merge":
                raise self.error(knode, path, "YAML merge keys (<<) are not supported",
                                 expected="keys written out", found="'<<'")
            if knode.id != "scalar" or _is_null(knode):
                raise self.error(knode, path, "keys must be strings", expected="a string key",
                                 found=describe(knode))
            self._check_node(knode, kpath)
            key = knode.value
            if key in seen:
                raise self.error(knode, kpath, f"duplicate key (first given at line {seen[key]})",
                                 expected="each key once", found=f"'{key}' again")
            seen[key] = knode.start_mark.line + 1
            items.append((key, knode, vnode))
        return items

    def dataclass(self, cls: type, node: Any, path: str) -> Any:
        items = self._mapping_items(node, path, f"a mapping ({_label(cls)})")
        hints = _type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)
                  if f.init and not f.name.startswith("_")}
        values: dict[str, Any] = {}
        for key, knode, vnode in items:
            kpath = _join(path, key)
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f", did you mean '{close[0]}'?" if close else ""
                raise self.error(knode, kpath, "unknown key" + hint,
                                 expected="one of " + ", ".join(fields), found=f"'{key}'")
            if _is_null(vnode) and vnode.value == "":
                # "key:" with nothing after it: point at the key, not the next line
                self.lines[kpath] = knode.start_mark.line + 1
            values[key] = self.build(hints[key], vnode, kpath)
        for name, f in fields.items():
            if name not in values and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                raise self.error(node, path, f"missing required key '{name}'",
                                 expected=f"'{name}' in {_label(cls)}",
                                 found="keys " + (", ".join(k for k, _, _ in items) or "none"))
        return cls(**values)

    def _sequence(self, item_tp: Any, markers: tuple[object, ...], node: Any,
                  path: str) -> tuple[object, ...]:
        if node.id != "sequence":
            raise self.error(node, path, "wrong type", expected="a list", found=describe(node))
        out = tuple(self.build(item_tp, child, f"{path}[{i}]")
                    for i, child in enumerate(node.value))
        for m in markers:
            if isinstance(m, Length) and not (m.lo <= len(out) <= (m.hi if m.hi is not None
                                                                   else len(out))):
                want = (f"{m.lo} to {m.hi} items" if m.hi is not None
                        else f"at least {m.lo} item" + ("s" if m.lo != 1 else ""))
                raise self.error(node, path, "wrong number of items", expected=want,
                                 found=f"{len(out)}")
        return out

    def _free_mapping(self, node: Any, path: str) -> Mapping[str, Any]:
        """Adapter-specific options: passed through as plain, strictly typed data."""
        items = self._mapping_items(node, path, "a mapping")
        return types.MappingProxyType({k: self._plain(v, _join(path, k)) for k, _, v in items})

    def _plain(self, node: Any, path: str) -> Any:
        self._check_node(node, path)
        if path.count(".") + path.count("[") > _MAX_DEPTH:
            raise self.error(node, path, "nested too deeply", expected=f"at most {_MAX_DEPTH} "
                             "levels", found="more")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if node.id == "mapping":
            return self._free_mapping(node, path)
        if node.id == "sequence":
            return tuple(self._plain(c, f"{path}[{i}]") for i, c in enumerate(node.value))
        text = node.value
        if node.style is not None:
            return text
        if text in _NULLS:
            return None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        if _INT_RE.match(text) or _HEX_RE.match(text) or _OCT_RE.match(text) \
                or _LEADING_ZERO_RE.match(text):
            return self._int(node, path)
        if _FLOAT_RE.match(text):
            return self._finite(float(text), node, path)
        return text

    # -- scalars

    def _scalar(self, node: Any, path: str, expected: str) -> str:
        if node.id != "scalar":
            raise self.error(node, path, "wrong type", expected=expected, found=describe(node))
        return str(node.value)

    def _string(self, node: Any, path: str, markers: tuple[object, ...]) -> str:
        if _is_null(node):
            raise self.error(node, path, "missing value", expected=_expect_str(markers),
                             found="null")
        text = self._scalar(node, path, _expect_str(markers))
        for m in markers:
            if m is Name and not _NAME_RE.match(text):
                raise self.error(node, path, "invalid name", expected=_expect_str(markers),
                                 found=f"'{text}'")
            if isinstance(m, Pattern) and not re.fullmatch(m.regex, text):
                raise self.error(node, path, "invalid value", expected=m.expected,
                                 found=f"'{text}'")
            if isinstance(m, PathOrLiteral) and text.startswith(m.prefix):
                return text.strip()
            if m is FilePath or isinstance(m, PathOrLiteral):
                if not text.strip() or "\0" in text:
                    raise self.error(node, path, "invalid path", expected="a file path",
                                     found=f"'{text}'")
                text = os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(text)))
        return text

    def _bool(self, node: Any, path: str) -> bool:
        text = self._scalar(node, path, "true or false")
        if node.style is None and text in _TRUE:
            return True
        if node.style is None and text in _FALSE:
            return False
        if node.style is None and text in _YAML11_BOOLS:
            raise self.error(node, path, "YAML 1.1 boolean spelling is not accepted",
                             expected="true or false", found=f"'{text}'")
        raise self.error(node, path, "wrong type", expected="true or false", found=describe(node))

    def _int(self, node: Any, path: str) -> int:
        text = self._scalar(node, path, "an integer")
        if node.style is None and len(text) > _MAX_NUMBER_CHARS:
            raise self.error(node, path, "number too long", expected="an integer of at most "
                             f"{_MAX_NUMBER_CHARS} characters", found=f"{len(text)} characters")
        if node.style is None:
            if _INT_RE.match(text):
                return int(text)
            if _HEX_RE.match(text):
                return int(text[2:], 16)
            if _OCT_RE.match(text):
                return int(text[2:], 8)
            if _LEADING_ZERO_RE.match(text):
                raise self.error(node, path, "ambiguous number with a leading zero "
                                 "(YAML 1.1 reads it as octal, YAML 1.2 as decimal)",
                                 expected="a decimal integer without leading zeros or an "
                                          "explicit 0o/0x number", found=f"'{text}'")
            if _SEXAGESIMAL_RE.match(text):
                raise self.error(node, path, "YAML 1.1 sexagesimal number is not accepted",
                                 expected="an integer", found=f"'{text}'")
        raise self.error(node, path, "wrong type", expected="an integer", found=describe(node))

    def _float(self, node: Any, path: str) -> float:
        text = self._scalar(node, path, "a number")
        if node.style is None and (_FLOAT_RE.match(text) or _INT_RE.match(text)):
            return self._finite(float(text), node, path)
        raise self.error(node, path, "wrong type", expected="a number", found=describe(node))

    def _finite(self, value: float, node: Any, path: str) -> float:
        if not math.isfinite(value):
            raise self.error(node, path, "number too large", expected="a finite number",
                             found=f"'{node.value[:20]}'")
        return value

    def _duration(self, node: Any, path: str) -> float:
        expected = "a duration such as 500ms, 30s, 5m, 1h or 1h30m"
        text = self._scalar(node, path, expected)
        if node.style is None and (_INT_RE.match(text) or _FLOAT_RE.match(text)):
            return self._finite(float(text), node, path)
        pos, total = 0, 0.0
        for m in _DURATION_PART_RE.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if text and pos == len(text):
            return self._finite(total, node, path)
        if node.style is None and _SEXAGESIMAL_RE.match(text):
            raise self.error(node, path, "YAML 1.1 sexagesimal number is not accepted",
                             expected=expected, found=f"'{text}'")
        raise self.error(node, path, "invalid duration", expected=expected, found=describe(node))

    def _ranged(self, value: float, markers: tuple[object, ...], node: Any, path: str,
                unit: str = "") -> Any:
        for m in markers:
            if not isinstance(m, Range):
                continue
            low_bad = m.lo is not None and (value <= m.lo if m.gt else value < m.lo)
            if low_bad or (m.hi is not None and value > m.hi):
                raise self.error(node, path, "out of range", expected=_range_text(m, unit),
                                 found=f"{_num(value)}{unit}")
        return value

    def _enum(self, cls: type[enum.Enum], node: Any, path: str) -> enum.Enum:
        choices = [str(e.value) for e in cls]
        expected = "one of " + ", ".join(choices)
        text = self._scalar(node, path, expected)
        for e in cls:
            if text == e.value:
                return e
        close = difflib.get_close_matches(text, choices, n=1)
        hint = f", did you mean '{close[0]}'?" if close else ""
        what = re.split(r"[.\[]", path)[-1].replace("_", " ") if path else _label(cls)
        raise self.error(node, path, f"unknown {what}{hint}", expected=expected,
                         found=f"'{text}'")

    def _address(self, node: Any, path: str) -> IPv4or6:
        text = self._scalar(node, path, "an IP address")
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            raise self.error(node, path, "not an IP address",
                             expected="an IPv4 or IPv6 address", found=f"'{text}'") from None

    def _network(self, node: Any, path: str) -> NetV4or6:
        expected = "an IP network such as 10.1.0.0/16 or 2001:db8::/48"
        text = self._scalar(node, path, expected)
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise self.error(node, path, "not an IP network", expected=expected,
                                 found=f"'{text}'") from None
            raise self.error(node, path, "host bits set in network",
                             expected=f"the network address {net}", found=f"'{text}'") from None


# ---------------------------------------------------------------- helpers

def describe(node: Any) -> str:
    """How a node looks to the operator, for the 'found ...' part of errors."""
    if node is None:
        return "nothing"
    if node.id == "mapping":
        return "a mapping"
    if node.id == "sequence":
        return "a list"
    if node.style is None and node.value in _NULLS:
        return "null"
    if node.style is not None:
        return f"quoted string '{node.value}'"
    return f"'{node.value}'"


def _is_null(node: Any) -> bool:
    return node.id == "scalar" and node.style is None and node.value in _NULLS


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _label(cls: type) -> str:
    label = getattr(cls, "_yaml_label", None)
    return str(label) if label else re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()


def _expect_str(markers: tuple[object, ...]) -> str:
    for m in markers:
        if m is Name:
            return "a name of letters, digits, '.', '_', '-' (at most 63, starting alphanumeric)"
        if m is FilePath:
            return "a file path"
        if isinstance(m, PathOrLiteral):
            return f"a file path or a {m.prefix}... string"
        if isinstance(m, Pattern):
            return m.expected
    return "a string"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def _range_text(m: Range, unit: str) -> str:
    lo = None if m.lo is None else _num(m.lo) + unit
    hi = None if m.hi is None else _num(m.hi) + unit
    if lo is not None and hi is not None:
        return f"from {lo} to {hi}" if not m.gt else f"more than {lo} and at most {hi}"
    if lo is not None:
        return f"more than {lo}" if m.gt else f"at least {lo}"
    return f"at most {hi}"
