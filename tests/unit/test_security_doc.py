"""docs/security.md makes every claim with the test that shows it: each
`tests/...py::name` it names must exist, so renaming or deleting a test
cannot silently leave a claim without evidence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _refs() -> list[tuple[str, str]]:
    return sorted(set(REF.findall(DOC.read_text(encoding="utf-8"))))


def test_the_threat_model_names_tests():
    assert len(_refs()) >= 50


@pytest.mark.parametrize("path, name", _refs(), ids=lambda v: v)
def test_every_named_test_exists(path, name):
    source = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path} has no test {name}"
