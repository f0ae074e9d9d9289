"""No ``Any`` in the public signatures of the stage packages (issue 9, item 6).

mypy --strict accepts an explicit ``Any``; this test does not, for every public
function and method (and every public parameter of a class's ``__init__``,
dataclass fields included) in the packages listed below. Data from outside
(JSON, YAML, a caller's settings object) is typed ``object`` and checked.
Packages join the list when their owner brings them to zero (docs/architecture.md,
"Gates").
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
import types
from collections.abc import Callable, Iterator

import pytest

PACKAGES = ["qkdgate.keymix", "qkdgate.adapters", "qkdgate.gateway.protocol", "qkdgate.tunnels",
            "qkdgate.keyservice"]

_ANY = re.compile(r"\bAny\b")


def _modules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    return [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]


def _public_callables(module: object, modname: str) -> Iterator[tuple[str, Callable[..., object]]]:
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member


def any_in_module(module: types.ModuleType) -> list[str]:
    found = []
    for qualname, fn in _public_callables(module, module.__name__):
        for param, annotation in fn.__annotations__.items():
            if param.startswith("_"):   # private dataclass fields and parameters
                continue
            if _ANY.search(str(annotation)):
                found.append(f"{module.__name__}.{qualname}: {param}: {annotation}")
    return found


def any_in_public_signatures(package: str) -> list[str]:
    return [hit for modname in _modules(package)
            for hit in any_in_module(importlib.import_module(modname))]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_any_in_public_signatures(package: str) -> None:
    assert any_in_public_signatures(package) == []


def test_the_check_sees_any(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scanner finds each kind of ``Any`` it is meant to (so an empty result
    above means something), and leaves private names alone."""
    module = types.ModuleType("probe_module")
    monkeypatch.setitem(sys.modules, "probe_module", module)   # dataclass looks it up
    exec(  # noqa: S102  a fixed snippet: a module with known signatures
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from typing import Any\n"
        "def f(x: Any) -> int: ...\n"
        "def g(x: int) -> dict[str, Any]: ...\n"
        "def _private(x: Any) -> Any: ...\n"
        "@dataclass\n"
        "class C:\n"
        "    field: list[Any]\n"
        "    _hidden: Any = None\n"
        "    def method(self, *, opt: Any | None = None) -> None: ...\n"
        "    def clean(self, x: object) -> object: ...\n",
        module.__dict__)
    assert sorted(any_in_module(module)) == [
        "probe_module.C.__init__: field: list[Any]",
        "probe_module.C.method: opt: Any | None",
        "probe_module.f: x: Any",
        "probe_module.g: return: dict[str, Any]",
    ]
