"""Kernel tests run inside the lab VM (tools/test-kernel.sh sets
QKDGATE_KERNEL_TESTS=1): they need ESP, GCM and MACsec, which development
and CI host kernels may lack. One five-namespace topology serves the whole
session; every test removes the XFRM state and macsec links it made."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from kernel_lab import Topology, flush_xfrm

from qkdgate.tunnels.macsec import MacsecBackend
from qkdgate.tunnels.xfrm import XfrmBackend


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QKDGATE_KERNEL_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="kernel tests run in the lab VM: tools/test-kernel.sh")
    for item in items:
        item.add_marker(skip)


def pytest_runtest_logreport(report):
    """A failure's report as soon as it happens, not at the session's end:
    a lab VM that times out (LAB_TIMEOUT) prints no summary, and the first
    CPU-hog series run lost four failures' reasons that way. Appended to
    LAB_OUT/failures.txt (the host keeps it) and printed at once."""
    if not report.failed:
        return
    text = f"\n=== FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n" \
           f"{report.longreprtext[-6000:]}\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    out = os.environ.get("LAB_OUT")
    if out:
        with open(os.path.join(out, "failures.txt"), "a") as f:
            f.write(text)


@pytest.fixture(scope="session")
def topo():
    t = Topology().up()
    yield t
    t.down()


@pytest.fixture(autouse=True)
def clean_kernel_state(request):
    yield
    if "topo" not in request.fixturenames:
        return
    t = request.getfixturevalue("topo")
    for ns in (t.gA, t.gB):
        be = XfrmBackend(ns, verify=False)
        flush_xfrm(be)
        be.close()
        mb = MacsecBackend(ns)
        for link in mb.macsec_links():
            mb.destroy_link(link)
        mb.close()
