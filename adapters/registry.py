"""Key-source factory fed by Python entry points.

Theory of operation: a config entry names a ``kind``; :func:`create_key_source`
finds the factory for it and calls ``factory(settings) -> KeySource``.
Built-in kinds are listed here and also registered as entry points in
pyproject.toml (group ``qkdgate.key_sources``); a third-party package adds a
kind by declaring, in its own pyproject::

    [project.entry-points."qkdgate.key_sources"]
    mykme = "mypackage.kme:create"

without touching qkdgate. Entry points are read on first lookup of an
unknown kind, not at import time, and a third party cannot replace a
built-in kind (that would let an installed package redirect key requests).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from qkdgate.errors import ConfigError
from qkdgate.interfaces import KeySource

if TYPE_CHECKING:
    from importlib.metadata import EntryPoints

log = logging.getLogger("qkdgate.adapters.registry")

GROUP = "qkdgate.key_sources"

# kind -> "module:function"; the vendor kinds are the ETSI 014 client with a
# profile preset (qkdgate.adapters.profiles).
BUILTIN: dict[str, str] = {
    "etsi014": "qkdgate.adapters.etsi014:from_settings",
    "etsi004": "qkdgate.adapters.etsi004_source:from_settings",
    "idq-cerberis-xgr": "qkdgate.adapters.registry:create_idq",
    "toshiba": "qkdgate.adapters.registry:create_toshiba",
}

Factory = Callable[[object], KeySource]


def _with_profile(settings: object, profile: str) -> KeySource:
    from dataclasses import replace

    from qkdgate.adapters.etsi014 import Etsi014KeySource
    from qkdgate.adapters.settings import source_settings
    s = source_settings(settings)
    opts = dict(s.options)
    opts.setdefault("profile", profile)
    return Etsi014KeySource(replace(s, options=opts))


def create_idq(settings: object) -> KeySource:
    return _with_profile(settings, "idq-cerberis-xgr")


def create_toshiba(settings: object) -> KeySource:
    return _with_profile(settings, "toshiba")


def entry_points(group: str) -> EntryPoints:
    """The installed plugins of ``group``. importlib.metadata is imported
    here, when a kind is not built in: it reads every installed package's
    metadata, which ``qkdgate run`` with built-in kinds need not (issue 19)."""
    from importlib.metadata import entry_points as installed
    return installed(group=group)


def _load(target: str) -> Factory:
    module, _, attr = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"key source factory {target} is not callable", path="kind")
    return obj


def available_kinds() -> list[str]:
    kinds = set(BUILTIN)
    kinds.update(ep.name for ep in entry_points(group=GROUP))
    return sorted(kinds)


def find_factory(kind: str) -> Factory:
    if kind in BUILTIN:
        return _load(BUILTIN[kind])
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == kind]
    if not matches:
        raise ConfigError("unknown key source kind", path="kind",
                          expected=", ".join(available_kinds()), found=kind)
    if len({ep.value for ep in matches}) > 1:
        raise ConfigError(f"key source kind {kind!r} is registered by several packages: "
                          + ", ".join(sorted({ep.value for ep in matches})), path="kind")
    try:
        factory: object = matches[0].load()
    except Exception as exc:  # noqa: BLE001  a broken plugin is the operator's to fix, not a crash
        raise ConfigError(f"cannot load key source plugin {matches[0].value}: "
                          f"{type(exc).__name__}: {exc}", path="kind") from None
    if not callable(factory):
        raise ConfigError(f"key source plugin {matches[0].value} is not callable", path="kind")
    return factory


def create_key_source(kind: str, settings: object) -> KeySource:
    """Build the key source for one ``key_sources`` entry."""
    source = find_factory(kind)(settings)
    if not isinstance(source, KeySource):
        raise ConfigError(f"key source kind {kind!r} built {type(source).__name__}, "
                          "which does not implement KeySource", path="kind")
    log.debug("key source %r of kind %s ready", getattr(source, "name", "?"), kind)
    return source
