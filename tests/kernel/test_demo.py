"""`qkdgate demo` end to end in the lab VM: real namespaces, real XFRM and
MACsec, the real daemons and the KME simulator. The summary must show
rekeys, traffic through the tunnel, the eavesdropper's QBER alarm and the
policy acting on it (PQC fallback, or blocking for hybrid-required), and
no namespace may be left behind. Each run costs about a minute under TCG
(setup ~30 s, then the demo's own duration)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

from kernel_traffic import Capture, analyse_pcap


def run_demo(tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, "-m", "qkdgate.gateway.cli.main", "demo", "--where", "host",
                        "--json", str(out), *args], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"demo exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}"
    return load_summary(out, args), r.stdout


def load_summary(out, args: tuple[str, ...]) -> dict:
    if os.environ.get("LAB_OUT"):      # kept in the lab's output directory to explain a failure
        shutil.copy(out, os.path.join(os.environ["LAB_OUT"], f"summary-{s_name(args)}.json"))
    s = json.loads(out.read_text())
    tag = s["config"]["namespaces_tag"]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert s["cleanup"]["errors"] == [] and s["cleanup"]["namespaces_left"] == []
    assert len(s["cleanup"]["namespaces_created"]) == 6
    assert f"qd{tag}-" not in left, left
    return s


def run_demo_attached(tmp_path, *args: str) -> tuple[dict, str, list[str], object]:
    """run_demo, with what an operator does beside it (issue 14): once the
    namespaces exist, a capture on the demo's wire bridge; once gw-a's
    control socket (the path the demo prints) exists, ``qkdgate top
    --plain`` attached to it from the lab's root namespace, another process
    outside every demo namespace, printing a look every 2 s until the demo
    ends and takes the socket away. (Started that early because under TCG
    its own start-up can take longer than a short demo's traffic phase.)
    Returns the summary, the demo's output, top's looks and the wire report."""
    out = tmp_path / "summary.json"
    cli = [sys.executable, "-m", "qkdgate.gateway.cli.main"]
    p = subprocess.Popen([*cli, "demo", "--where", "host", "--json", str(out), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    tag = None
    cap = top = None
    try:
        for line in p.stdout:
            lines.append(line)
            if m := re.search(r"demo: namespaces qd([0-9a-f]{6})-\*", line):
                tag = m[1]
            elif m := re.search(r"demo: gw-a control socket: qkdgate top --socket (\S+)", line):
                sock = m[1]
                cap = Capture(types.SimpleNamespace(wire=f"qd{tag}-w"), str(tmp_path / "wire.pcap"))
                # the daemon thread binds it while it starts (before its first generation)
                deadline = time.monotonic() + 120
                while not os.path.exists(sock) and p.poll() is None \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
                top = subprocess.Popen([*cli, "top", "--plain", "-n", "2", "--width", "140",
                                        "--socket", sock], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
        p.wait(timeout=400)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        wire = analyse_pcap(cap.stop()) if cap is not None else None
        top_out = ""
        if top is not None:
            try:
                top_out = top.communicate(timeout=60)[0]
            except subprocess.TimeoutExpired:
                top.kill()
                top_out = top.communicate()[0]
    text = "".join(lines)
    assert p.returncode == 0, f"demo exit {p.returncode}\n{text[-4000:]}"
    assert wire is not None and top is not None, text
    looks = ["qkdgate top  gw-a" + x for x in top_out.split("qkdgate top  gw-a")[1:]]
    if os.environ.get("LAB_OUT"):
        with open(os.path.join(os.environ["LAB_OUT"], f"top-{s_name(args)}.txt"), "w") as f:
            f.write(top_out)
    return load_summary(out, args), text, looks, wire


def check_top(looks: list[str], *, pool_known: bool) -> None:
    """``qkdgate top`` at gw-a in the running demo: a look (the first one
    with the tunnel up; earlier looks may come before the first generation)
    shows the tunnel up with a generation and its key inputs, the QKD
    link's pool (ETSI 014: stored/max; ETSI 004 has no pool size: "-") and
    QBER."""
    assert looks, "qkdgate top printed no look while the demo ran"
    look = next((x for x in looks if re.search(r"lan \(ipsec\)\s+UP\s", x)), looks[-1])
    lines = look.splitlines()
    row = next(x for x in lines if x.lstrip().startswith("gw-a ") and "lan (ipsec)" in x)
    cells = row.split()      # gateway, tunnel, (ipsec), state, generation, inputs, ...
    assert cells[3] == "UP" and int(cells[4]) > 0, row
    assert "ML-KEM-768+X25519+QKD[" in row, row
    link = next(x for x in lines if x.lstrip().startswith("kme "))
    pool = link.split()[1]
    if pool_known:
        stored, _, mx = pool.partition("/")
        assert int(stored) > 0 and int(mx) >= int(stored), link
    else:
        assert pool == "-", link
    assert "%" in link, link              # the QBER


def s_name(args: tuple[str, ...]) -> str:
    return ("macsec-" if "--macsec" in args else "") + f"{time.time():.0f}"


def check_report(folder) -> None:
    """The run report of the real demo (issue 14): an offline page and its
    figures, drawn from this run (the host tests check the drawing itself)."""
    html = (folder / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 3, pngs
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000, p
        assert p.name in html or "data:image/png;base64," in html
    assert "timeline" in json.loads((folder / "summary.json").read_text())
    if os.environ.get("LAB_OUT"):
        shutil.copytree(folder, os.path.join(os.environ["LAB_OUT"], "demo-report"), dirs_exist_ok=True)


def phase(stream: dict, name: str) -> dict:
    return stream["by_phase"].get(name, {"sent": 0, "received": 0, "lost": 0})


def test_demo_pqc_fallback_alarm_fallback_recovery(tmp_path):
    report = tmp_path / "report"
    s, out, looks, wire = run_demo_attached(tmp_path, "--duration", "30", "--eavesdrop-at", "9",
                                            "--eavesdrop-for", "9", "--report", str(report))
    check_report(report)
    check_top(looks, pool_known=True)
    assert wire.cleartext == 0 and wire.esp > 1000, wire
    a = s["tunnels"]["gw-a/lan"]
    assert a["rekeys"] >= 6 and s["tunnels"]["gw-b/lan"]["rekeys"] >= 6
    # the QBER alarm, after the eavesdropper arrived. Times are the summary's
    # own clock (the demo's start), as the eavesdropper's recorded interval:
    # --eavesdrop-at counts from the traffic's start, and setup took 40 s in a
    # lab run beside a CPU hog (the alarm at 29.2 s was not "before 9 s").
    (eve,) = s["timeline"]["eavesdropper"]
    (alarm,) = [x for x in s["alarms"] if x["alarm"] == "QBER_ABOVE_THRESHOLD"]
    assert alarm["qber"] > 0.08 and alarm["t"] >= eve[0]
    # both gateways fell back to PQC-only, then returned to hybrid after it left
    acts = [(x["gateway"], x["action"]) for x in s["policy_actions"]]
    for gw in ("gw-a", "gw-b"):
        assert (gw, "fallback") in acts and (gw, "recovery") in acts
    fb = min(x["t"] for x in s["policy_actions"] if x["action"] == "fallback")
    rc = max(x["t"] for x in s["policy_actions"] if x["action"] == "recovery")
    assert alarm["t"] <= fb < eve[1] + 9.0 and rc >= eve[1]
    gens = a["generations"]
    assert any(not g["qkd_key_ids"] for g in gens), "no PQC-only generation"
    assert gens[0]["qkd_key_ids"] and gens[-1]["qkd_key_ids"], "not hybrid at start and end"
    assert all(g["kem"] == "ML-KEM-768" and g["x25519"] for g in gens)
    ids = [i for g in gens for i in g["qkd_key_ids"]]
    assert len(ids) == len(set(ids)), "a QKD key was used twice"
    # the fallback keeps traffic flowing: make-before-break, nothing blocked
    t = s["traffic"]
    assert t["sent"] > 2 * 100 * 30 * 0.8 and t["lost"] <= 0.01 * t["sent"], t
    for st in t["streams"].values():
        assert phase(st, "eavesdropper, PQC fallback")["received"] > 0
    assert s["rekey_latency_ms"]["p50"] is not None and s["rekey_latency_ms"]["p50"] < 3000
    assert "ALARM QBER_ABOVE_THRESHOLD" in out and "FALLBACK(PQC-only)" in out


def test_demo_qkd004_binary_framing_keys_the_tunnel(tmp_path):
    """Issue 18 item 5: both gateways take their QKD keys from the KME
    simulator over ETSI GS QKD 004 in the binary framing of ETSI's reference
    interface (one key stream; the JSON binding and both bindings under the
    daemon: host tests). hybrid-required, so a generation only exists with
    a 004 key (its key_IDs are the 004 source's UUIDv8 stream positions);
    nothing crosses the wire in the clear. (qkdgate top against the demo:
    the pqc-fallback test; its 004 view, pool "-": host tests.)"""
    s, out, looks, wire = run_demo_attached(tmp_path, "--qkd", "004", "--policy", "block",
                                            "--duration", "20")
    assert s["config"]["qkd"] == "004"
    assert "ETSI GS QKD 004, binary framing" in out
    for key in ("gw-a/lan", "gw-b/lan"):
        gens = s["tunnels"][key]["generations"]
        assert s["tunnels"][key]["rekeys"] >= 3, key
        assert all(g["qkd_key_ids"] and g["kem"] == "ML-KEM-768" and g["x25519"]
                   for g in gens), (key, gens)
        ids = [i for g in gens for i in g["qkd_key_ids"]]
        assert len(ids) == len(set(ids)), "a QKD key was used twice"
        assert all(uuid.UUID(i).version == 8 for i in ids), ids
    ids_a = {i for g in s["tunnels"]["gw-a/lan"]["generations"] for i in g["qkd_key_ids"]}
    ids_b = {i for g in s["tunnels"]["gw-b/lan"]["generations"] for i in g["qkd_key_ids"]}
    assert ids_a & ids_b, "the two gateways never mixed the same 004 key"
    assert not s["alarms"], s["alarms"]
    t = s["traffic"]
    assert t["sent"] > 2 * 100 * 15 * 0.8 and t["lost"] <= 0.01 * t["sent"], t
    assert wire.cleartext == 0 and wire.esp > 1000, wire


def test_demo_block_policy_and_macsec(tmp_path):
    """Blocked means blocked in the kernel: each stream's "blocked" phase is
    where the demo's kernel watch read no key for that stream's path (its
    SAs at both gateways), not where the first tunnel of any gateway
    reported a block (issue 10: a MACsec frame sent after gw-b/lan blocked
    but before the MACsec SAs went was counted as a leak). A datagram sent
    there and delivered crossed a kernel with no key for it. The run goes
    on until every path has been keyed again for 7 s, however long
    recovery takes on a loaded machine."""
    s, out = run_demo(tmp_path, "--policy", "block", "--macsec", "--duration", "28",
                      "--eavesdrop-at", "6", "--eavesdrop-for", "12", "--after-recovery", "7")
    assert s["config"]["policy"] == "block"
    for key in ("gw-a/lan", "gw-b/lan", "gw-a/link", "gw-b/link"):
        assert s["tunnels"][key]["rekeys"] >= 3, key
        # hybrid-required: every generation that was installed had a QKD key
        assert all(g["qkd_key_ids"] for g in s["tunnels"][key]["generations"]), key
    acts = [(x["gateway"], x["tunnel"], x["action"]) for x in s["policy_actions"]]
    for gw in ("gw-a", "gw-b"):
        for tun in ("lan", "link"):
            assert (gw, tun, "block") in acts and (gw, tun, "recovery") in acts
    assert not any(a == "fallback" for _g, _t, a in acts)
    streams = s["traffic"]["streams"]
    assert set(streams) == {"hA->hB", "hB->hA", "gA->gB (MACsec)"}
    watch = s["traffic"]["kernel_watch"]
    assert watch["errors"] == 0 and watch["reads"] > 100, watch
    for name, st in streams.items():
        assert st["kernel_blocked"], (name, "the kernel never held the path without keys")
        # nothing arrives that was sent while the kernel had no key for it, in
        # any blocked phase (a starved host may block again after recovery)
        for label, row in st["by_phase"].items():
            if label.endswith(", blocked"):
                assert row["received"] == 0, (name, label, st["by_phase"])
        blocked = phase(st, "eavesdropper, blocked")
        assert blocked["sent"] > 50, (name, st["by_phase"])
        before = phase(st, "before eavesdropper")
        assert before["received"] >= 0.98 * before["sent"] > 300, (name, before)
        after = phase(st, "after eavesdropper")
        assert after["received"] > 0.9 * after["sent"] > 500, (name, after)
    assert "BLOCKED" in out


def test_demo_relayed_through_a_compromised_node(tmp_path):
    """Issue 13, the contrast: one QKD path A-M-B, keys relayed through the
    compromised M. The tunnel rekeys in the kernel, and the attacker recorded
    every QKD key the gateways used."""
    topo = Path(__file__).resolve().parents[2] / "docs" / "topologies" / "line-3.yaml"
    s, out = run_demo(tmp_path, "--policy", "block", "--duration", "10", "--topology", str(topo))
    gens = s["tunnels"]["gw-a/lan"]["generations"]
    assert len(gens) >= 2 and all(len(g["qkd_key_ids"]) == 1 for g in gens), gens
    (path,) = s["qkd_network"]["paths"]
    assert path["routes"] == [["KME-A", "KME-M", "KME-B"]] and path["compromised"] == ["KME-M"]
    assert {g["qkd_key_ids"][0] for g in gens} <= set(path["attacker_key_ids"])
    assert "QKD path SAE-A->SAE-B via KME-A-KME-M-KME-B" in out


def test_demo_two_disjoint_paths_one_compromised(tmp_path):
    """Issue 13: gw-a and gw-b key their tunnel from two node-disjoint QKD
    paths (A-M1-B and A-M2-B, keys relayed through M1 and M2; M1 is
    compromised), one key source per path with the rule "all", and rekey in
    the kernel. Every generation mixes one key from each path, and the
    attacker at M1 recorded exactly one of its two QKD inputs: the key of
    path 1, never that of path 2."""
    topo = Path(__file__).resolve().parents[2] / "docs" / "topologies" / "two-paths.yaml"
    s, out = run_demo(tmp_path, "--policy", "block", "--duration", "15", "--topology", str(topo))
    for key in ("gw-a/lan", "gw-b/lan"):
        assert s["tunnels"][key]["rekeys"] >= 3, key
    gens = s["tunnels"]["gw-a/lan"]["generations"]
    assert all(len(g["qkd_key_ids"]) == 2 for g in gens), gens
    p1, p2 = s["qkd_network"]["paths"]
    assert p1["routes"] == [["KME-A", "KME-M1", "KME-B"]], p1
    assert p2["routes"] == [["KME-A", "KME-M2", "KME-B"]], p2
    assert (p1["compromised"], p2["compromised"]) == (["KME-M1"], [])
    known = set(p1["attacker_key_ids"])
    assert p2["attacker_key_ids"] == []
    for g in gens:
        assert len(set(g["qkd_key_ids"]) & known) == 1, (g, sorted(known))
    t = s["traffic"]
    assert t["received"] >= 0.95 * t["sent"] > 1000, t
    assert "QKD path SAE-A1->SAE-B1 via KME-A-KME-M1-KME-B" in out
    assert "compromised KME-M1 holds" in out


def test_demo_terminated_during_setup_cleans_up(tmp_path):
    """SIGTERM (systemd, kill) takes the Ctrl-C path: summary, cleanup, exit 130;
    sent while the daemons, the KME simulator and every namespace exist but
    the first handshake may still run (the hardest moment to clean up)."""
    p = subprocess.Popen([sys.executable, "-m", "qkdgate.gateway.cli.main", "demo", "--where", "host",
                          "--json", str(tmp_path / "s.json")], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 240
    for line in p.stdout:
        seen.append(line)
        if "waiting for the first generation" in line or time.monotonic() > deadline:
            break
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=120)
    assert p.returncode == 130, "".join(seen) + rest
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["interrupted"] is True and s["cleanup"]["namespaces_left"] == []
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"qd{s['config']['namespaces_tag']}-" not in left


def test_demo_key_service(tmp_path):
    """issue 22 item 5: with --key-service two applications (APP-A in gA's
    namespace, APP-B in gB's) fetch keys through both north-bound APIs all
    run long -- ETSI 014 enc_keys at gA + dec_keys at gB, SKIP new-key at gA
    + key-by-ID at gB through stunnel4's TLS-PSK -- while the eavesdropper
    comes and goes. Under hybrid-required: keys in the clean phases,
    identical on both sides, every one from a generation with a QKD key;
    while QKD is blocked (the tunnels blocked) refusals and never a key;
    keys again after recovery. A round counts under the phase in which gw-a
    answered; a served key is judged by its own generation's validity
    (keyapps.judge_served), not by that phase. A key gw-b no longer had (fetched after W + skew on a slow
    host) is counted apart; it must say why, and is never a wrong key."""
    # A round per API takes seconds under TCG (SKIP spawns openssl twice), so
    # the run goes on 16 s after recovery: a lab run with 8 s had no ETSI 014
    # round left after recovery (its SKIP round was served).
    s, out = run_demo(tmp_path, "--policy", "block", "--key-service", "--duration", "26",
                      "--eavesdrop-at", "8", "--eavesdrop-for", "10", "--after-recovery", "16")
    ks = s["key_service"]
    assert ks["rounds"] >= 5, ks["rounds"]
    for api in ("etsi014", "skip"):
        a = ks["apis"][api]
        by = a["by_phase"]
        assert a["mismatch"] == 0 and a["errors"] == 0, (api, a)
        for x in ks["attempts"]:
            if x["api"] == api and x["outcome"] == "fetch_refused":
                assert x["fetch_status"] == 400 and "expired" in x["reason"], x
        assert all(r["without_qkd"] == 0 and r["single_source"] == 0 for r in by.values()), by
        blocked = [r for p, r in by.items() if p.endswith(", blocked")]
        assert blocked, (api, "no round while the tunnels were blocked", by)
        assert sum(r["refused"] for r in blocked) > 0, (api, by)
        clean = [by.get(p, {}).get("served", 0) for p in ("before eavesdropper",
                                                          "after eavesdropper")]
        assert clean[1] > 0 and sum(clean) >= 2, (api, by)
        assert a["statuses"].get("503", 0) > 0, a["statuses"]
    # Each served key is judged by its own generation (issue 10): gw-a
    # decided between asking and answering, and that generation was then
    # switched to, within its hard lifetime, not blocked, with a QKD key
    # (hybrid-required), and gw-b had installed it before the fetch. A key
    # may be answered in a phase labelled blocked (one gateway's old
    # generation expired while the successor it came from was installed);
    # a key from a generation past its validity fails here.
    from qkdgate.gateway.demo.keyapps import judge_served
    gens = ks["generations"]
    assert any(w["gateway"] == "gw-a" and w["qkd"] for w in gens), gens
    served = [x for x in ks["attempts"] if x["outcome"] == "served"]
    assert served and all(isinstance(x["generation"], int) for x in served), served
    assert judge_served(ks) == [] and ks["served_outside_generation"] == [], \
        (judge_served(ks), gens)
    # the first rounds come before the eavesdropper (each API's first round
    # may be slow on a loaded host, so at least one of the two)
    assert sum(ks["apis"][api]["by_phase"].get("before eavesdropper", {}).get("served", 0)
               for api in ("etsi014", "skip")) > 0, ks["apis"]
    assert "key service etsi014: served" in out and "key service skip: served" in out
