"""The fault matrix's zeros, on a subset sized for CI (issue 10 item 2).

Every fault of bench/faults.py runs once, against real daemons, real ESP
and MACsec and the KME simulator, with the wire sniffed and both kernels
read: no cleartext inner packet on the wire, no packet accepted after an
SA's hard lifetime, no QKD key_ID used twice, the daemons running and the
tunnels keyed again after the fault clears. The policy is hybrid-required,
the one where every fault matters: it must block rather than fall back
when QKD fails, so QKD faults and kills reach the hard lifetime and the
recovery path. Two of the ten exchange steps are killed here (an initiator
waiting for RESP, a responder between its inbound SA and the switch); the
full table over four policies and every step is bench/fault_matrix.py's
(docs/faults.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fault_cell as fc  # bench/: one copy of the lab, the injectors and the measurement
import fault_lab as fl
import faults as ff

# Opt-in until it has passed in the lab: on the loaded 2-core machine it was
# written on, the guest was starved (kernel watch reads 4 s apart, lab
# set-up 4-7 min) and the first cells took 1-4 min each (docs/faults.md).
pytestmark = pytest.mark.skipif(os.environ.get("QKDGATE_FAULT_MATRIX") != "1",
                                reason="opt-in: QKDGATE_FAULT_MATRIX=1 (docs/faults.md)")

HOLD = 5.0      # seconds each fault lasts here (the partition keeps its 10 s)


def subset() -> list[ff.Fault]:
    return [ff.KmeUnreachable(), ff.KmeSlow(), ff.PoolEmpty(), ff.Eavesdropper(),
            ff.KmeGarbage(), ff.PeerKilled(), ff.LocalKilledAt("gw-a", "i-init-sent"),
            ff.LocalKilledAt("gw-b", "r-install-inbound"), ff.BrokenReload(), ff.Partition(),
            ff.ClockStep(3600), ff.ClockStep(-3600)]


def test_fault_matrix_zeros_hybrid_required(tmp_path):
    lab = fl.Lab("hybrid-required", keep=tmp_path)
    cells = []
    try:
        lab.up()
        for f in subset():
            if f.hold and not isinstance(f, ff.Partition):
                f.hold = HOLD
            cells.append((f, fc.run_cell(lab, f)))
            print("| " + " | ".join(cells[-1][1].row()) + " |", flush=True)
    finally:
        errors = lab.down()
    table = fc.markdown([c for _f, c in cells])
    diag = "\n".join(c.diag for _f, c in cells if c.diag)
    assert errors == [], errors
    for f, c in cells:
        assert (c.cleartext, c.after_hard, c.key_ids_reused) == (0, 0, 0), table
        assert c.recovery_s is not None, f"{c.fault}: not keyed again\n{table}\n{diag}"
        assert not [n for n in c.notes if "not running" in n or "died" in n], table
        if isinstance(f, ff.LocalKilledAt):
            assert f.reached, f"{c.fault}: the exchange never reached the step\n{table}"
    # the tunnels kept rekeying through the run (not one stale generation)
    assert sum(c.rekeys for _f, c in cells) > len(cells), table
