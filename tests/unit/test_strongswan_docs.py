"""docs/consumers.md shows the swanctl.conf the strongSwan kernel-lab test
loads (tests/kernel/strongswan_lab.py DOCUMENTED), verbatim with gA's
addresses, and qkdgate's own reader accepts it."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "kernel"))

from strongswan_lab import DOCUMENTED

from qkdgate.tunnels.strongswan import StrongswanSpec
from qkdgate.tunnels.strongswan_conf import parse

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "consumers.md")
LAB_A = {"@LOCAL@": "192.0.2.1", "@REMOTE@": "192.0.2.2",
         "@LOCAL_TS@": "10.1.0.0/24", "@REMOTE_TS@": "10.2.0.0/24"}


def documented() -> str:
    text = DOCUMENTED
    for k in ("@LOCAL_TS@", "@REMOTE_TS@", "@LOCAL@", "@REMOTE@"):
        text = text.replace(k, LAB_A[k])
    return text


def test_docs_show_the_tested_swanctl_conf():
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    assert documented() in doc, "docs/consumers.md: the strongSwan snippet drifted from the lab's"


def test_documented_connection_builds_a_consumer_spec():
    body = parse(documented())["connections"]["qkd-ab"]
    spec = StrongswanSpec("sw-b", "qkd-ab", "lan", body)
    assert spec.body["ppk_required"] == "yes"
