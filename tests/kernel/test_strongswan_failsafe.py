"""``qkdgate failsafe`` after SIGKILL of the process holding strongSwan
consumers (issue 21 item 4): charon keeps PPKs with no lifetime, so the
failsafe must unload them and terminate the IKE_SAs (tests/kernel/
test_strongswan.py has the gateways and the rotation test)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from strongswan_lab import CHILD, CONN, TID, gateways  # noqa: F401 (fixture)

from qkdgate.tunnels.strongswan_vici import ViciError

# A stand-in for the daemon: both gateways' consumers in one process, each
# recording itself in its gateway's registry as the daemon's do.
DAEMON = """
import os, sys, time
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.consumer import ConsumerKey
from qkdgate.tunnels.events import KeyInputs
from qkdgate.tunnels.state import TunnelRegistry
from qkdgate.tunnels.strongswan import StrongswanConsumer, StrongswanSpec
from qkdgate.tunnels.strongswan_conf import read_connection
tid, conn, child = sys.argv[1:4]
secret = os.urandom(32)
sides = []
for conf, vici, reg in zip(sys.argv[4::3], sys.argv[5::3], sys.argv[6::3]):
    spec = StrongswanSpec(tid, conn, child, read_connection(conf, conn), vici_socket=vici)
    c = StrongswanConsumer(spec, registry=TunnelRegistry(reg))
    c.setup(time.monotonic())
    sides.append(c)
for c, role in zip(sides, ("initiator", "responder")):
    c.prepare(ConsumerKey(tid, "strongswan", 1, SecretBytes(secret), KeyInputs(), role, 0.0))
for c, role in zip(reversed(sides), ("responder", "initiator")):
    c.install(ConsumerKey(tid, "strongswan", 1, SecretBytes(secret), KeyInputs(), role, 0.0))
print("READY", flush=True)
time.sleep(600)
"""


def test_failsafe_after_sigkill_unloads_ppks_and_terminates(topo, gateways, tmp_path):  # noqa: F811
    a, b = gateways
    regs = [tmp_path / "reg-gA.json", tmp_path / "reg-gB.json"]
    argv = [x for s, r in zip((a, b), regs, strict=True)
            for x in (str(s.conf), s.charon.vici, str(r))]
    d = subprocess.Popen([sys.executable, "-c", DAEMON, TID, CONN, CHILD, *argv], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert d.stdout is not None and d.stdout.readline().strip() == "READY"
        assert a.v.list_sas(CONN) and "qkdgate-sw-ab-g1" in b.v.shared_ids()
    finally:
        d.kill()                                      # SIGKILL: no clean-up of its own
        d.wait(10)
    assert "qkdgate-sw-ab-g1" in a.v.shared_ids()     # PPKs have no lifetime in charon
    for s, reg in zip((a, b), regs, strict=True):
        r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "qkdgate"),
                            "failsafe", "--state", str(reg)], capture_output=True, text=True)
        print(r.stdout, r.stderr)
        assert r.returncode == 0, r
        assert not s.v.list_sas(CONN)
        assert not any(i.startswith("qkdgate-") for i in s.v.shared_ids())
    # and nothing can come up again: ppk_required, no PPK
    with pytest.raises(ViciError):
        a.v.initiate(CONN, CHILD, 40000)
