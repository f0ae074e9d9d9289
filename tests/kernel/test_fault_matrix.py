"""The fault matrix's zeros (issue 10 item 2), against real daemons, real ESP
and MACsec and the KME simulator, with the wire sniffed and both kernels
read: no cleartext inner packet on the wire, no packet accepted after an
SA's hard lifetime, no QKD key_ID used twice, the daemons running and the
tunnels keyed again after each fault clears.

``test_fault_matrix_zeros_hybrid_required`` runs by default: every fault of
bench/faults.py once under hybrid-required, the policy where every fault
matters (it must block rather than fall back when QKD fails, so QKD faults,
kills and the partition reach the hard lifetime and the recovery path).
One of the ten exchange steps is killed (an initiator waiting for RESP).
Each cell's recovery time is reported; the test asserts that the tunnels
are keyed again at the end (on a starved guest a cell's 90 s wait was not
always enough after a kill, docs/faults.md). The full table, four
policies and every step, is bench/fault_matrix.py's, also run by
``test_fault_matrix_full`` when QKDGATE_FAULT_MATRIX=1 (docs/faults.md).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fault_cell as fc  # bench/: one copy of the lab, the injectors and the measurement
import fault_lab as fl
import fault_matrix
import faults as ff
from fault_observe import SaTimeline

from qkdgate.gateway.demo.kernelwatch import _Reader


def subset() -> list[ff.Fault]:
    return [ff.KmeUnreachable(), ff.KmeSlow(), ff.PoolEmpty(), ff.Eavesdropper(),
            ff.KmeGarbage(), ff.PeerKilled(), ff.LocalKilledAt("gw-a", "i-init-sent"),
            ff.BrokenReload(), ff.Partition(),
            ff.ClockStep(3600), ff.ClockStep(-3600)]


def test_larval_sa_read_unkeyed_then_a_new_sa():
    """The root cause of the last two non-zero cells, on the real kernel: an
    SPI reserved by XFRM_MSG_ALLOCSPI is dumped as an SA without an
    algorithm, and keying it (XFRM_MSG_UPDSA) gives a new SA with a new
    add_time. The counter starts the keyed SA's clock, not the reservation's,
    and still counts an SA that receives past its hard lifetime."""
    ns = f"qg-larval-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    reader = None
    try:
        def ip(*args: str) -> str:
            return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True,
                                  text=True).stdout
        out = ip("xfrm", "state", "allocspi", "src", "192.0.2.1", "dst", "192.0.2.2",
                 "proto", "esp", "min", "0xc0000000", "max", "0xcfffffff")
        spi = int(re.search(r"spi (0x[0-9a-f]+)", out).group(1), 16)
        reader = _Reader(ns)
        larval = [v for v in reader.esp() if v.key[2] == spi]
        assert [v.keyed for v in larval] == [False], larval
        time.sleep(1.1)                 # add_time is in whole seconds
        ip("xfrm", "state", "update", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp",
           "spi", hex(spi), "reqid", "1", "mode", "tunnel",
           "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128")
        keyed = [v for v in reader.esp() if v.key[2] == spi]
        assert [v.keyed for v in keyed] == [True], keyed
        assert keyed[0].added > larval[0].added, (larval, keyed)
    finally:
        if reader is not None:
            reader.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    # the counter on these readings: reserved 6 s before keyed, then 5 s of
    # traffic under a 6 s lifetime: nothing; 3 s more past hard + slack: counted
    from qkdgate.gateway.demo.kernelwatch import Reading
    tl = SaTimeline(6.0, {"n": "192.0.2.2"})
    for i in range(6):
        tl.feed("n", Reading(float(i), i + 0.01, (larval[0],)))
    for i in range(6, 18):
        v = replace(keyed[0], packets=10 * (i - 6))
        tl.feed("n", Reading(float(i), i + 0.01, (v,)))
    assert tl.after_hard(0, 14) == 0        # from the reservation it would count from 9 s
    assert tl.after_hard(0, 20) == 10 * (17 - 14)


def test_fault_matrix_zeros_hybrid_required(tmp_path):
    lab = fl.Lab("hybrid-required", keep=tmp_path)
    cells = []
    t0 = time.monotonic()
    try:
        lab.up()
        print(f"lab up in {time.monotonic() - t0:.0f} s", flush=True)
        for f in subset():
            cells.append((f, fc.run_cell(lab, f, settle=1.0)))
            print("| " + " | ".join(cells[-1][1].row()) + " |", flush=True)
        keyed_at_end = lab.wait_keyed(settle=1.0, timeout=180)
        end_diag = "" if keyed_at_end else lab.diagnose()
    finally:
        errors = lab.down()
    print(f"{len(cells)} cells in {time.monotonic() - t0:.0f} s", flush=True)
    table = fc.markdown([c for _f, c in cells])
    diag = "\n".join(c.diag for _f, c in cells if c.diag)
    assert errors == [], errors
    for f, c in cells:
        assert (c.cleartext, c.after_hard, c.key_ids_reused) == (0, 0, 0), table
        assert not [n for n in c.notes if "not running" in n or "died" in n], table
        if isinstance(f, ff.LocalKilledAt):
            assert f.reached, f"{c.fault}: the exchange never reached the step\n{table}"
    assert keyed_at_end, f"not keyed again after the last fault\n{table}\n{diag}\n{end_diag}"
    # the tunnels kept rekeying through the run (not one stale generation)
    assert sum(c.rekeys for _f, c in cells) > len(cells), table


@pytest.mark.skipif(os.environ.get("QKDGATE_FAULT_MATRIX") != "1",
                    reason="opt-in: QKDGATE_FAULT_MATRIX=1 (the full table, docs/faults.md)")
def test_fault_matrix_full():
    """Every fault x every policy: the zeros hold in every cell."""
    out = Path(os.environ["LAB_OUT"]) / "fault-matrix.json"
    assert fault_matrix.main(["--json", str(out), "--jobs", "2"]) == 0
