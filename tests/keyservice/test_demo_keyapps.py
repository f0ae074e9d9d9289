"""`qkdgate demo --key-service` on this host: the generated key-service
sections pass check-config with times that stop keys before the tunnel
blocks, and the demo's two applications (gateway/demo/keyapps.py) against
two real key-service runners (ETSI 014 over mutual TLS, SKIP through
stunnel4), each in its own network namespace as in the demo: identical keys
while a hybrid generation serves, refusals (never a key) while the newest
generation lacks QKD, keys again after. The real demo is
tests/kernel/test_demo.py::test_demo_key_service."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qkdgate.gateway.cli import main as cli
from qkdgate.gateway.config.model import load_config
from qkdgate.gateway.demo import keyapps
from qkdgate.gateway.demo.config import KmeEndpoint, Timers, write_configs, write_identities
from qkdgate.gateway.demo.net import LoopThread
from qkdgate.gateway.demo.report import render_html
from qkdgate.gateway.demo.view import render
from qkdgate.keyservice.runner import KeyServiceRunner, SkipListener
from qkdgate.keyservice.service import KeyService
from qkdgate.keyservice.settings import PoolSpec, ServiceTimes
from tests.keyservice.helpers import session


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-ks")
    return folder, keyapps.prepare(folder)


@pytest.mark.parametrize("policy", ["hybrid-required", "pqc-fallback"])
def test_generated_key_service_sections_pass_check_config(files, policy, capsys):
    from qkdgate.adapters.kmesim.pki import ensure_pki
    folder, ks = files
    pki = ensure_pki(folder / "kme", ["KME-A", "KME-B"], ["SAE-A", "SAE-B"], ())
    if not (folder / "gw-a.identity").exists():
        write_identities(folder)
    eps = [KmeEndpoint(f"https://127.0.0.1:{port}", kme, str(pki.sae(sae).cert),
                       str(pki.sae(sae).key), str(pki.ca))
           for port, kme, sae in ((40001, "KME-A", "SAE-A"), (40002, "KME-B", "SAE-B"))]
    timers = Timers.for_interval(3)
    extras = (keyapps.yaml_section("a", ks, policy=policy, interval=3),
              keyapps.yaml_section("b", ks, policy=policy, interval=3))
    pa, pb = write_configs(folder, *eps, policy="pqc-fallback", timers=timers, extras=extras)
    for path in (pa, pb):
        assert cli.main(["check-config", "--check-files", path]) == 0, capsys.readouterr()
    a, b = load_config(pa).key_service, load_config(pb).key_service
    assert a is not None and b is not None
    (pa_pool,), (pb_pool,) = a.pools, b.pools
    assert (pa_pool.name, pa_pool.local_sae, pa_pool.remote_sae, pa_pool.peer) == \
        (pb_pool.name, pb_pool.remote_sae, pb_pool.local_sae, "gw-b")
    assert pa_pool.policy.value == policy
    # keys stop (lifetime - T after confirmation) before the tunnel's hard lifetime
    # blocks it, so a blocked phase never serves; W + skew still fits in T
    assert pa_pool.lifetime - a.serve_margin < timers.hard
    assert a.dec_window + a.clock_skew <= a.serve_margin
    for gw in ("gw-a", "gw-b"):
        psk = ks.psk[gw]
        assert psk.file.stat().st_mode & 0o777 == 0o600 and len(bytes.fromhex(psk.key_hex)) == 32
    assert ks.psk["gw-a"].key_hex != ks.psk["gw-b"].key_hex


def test_vm_argv_carries_key_service():
    from qkdgate.gateway.demo import command as demo
    a = cli.build_parser().parse_args(["demo", "--key-service", "--policy", "block"])
    inner = cli.build_parser().parse_args(["demo", *demo.vm_argv(a, "/o/s.json", "/o/d.log")])
    assert inner.key_service is True and demo.options(inner).key_service is True


# ------------------------------------------------- the applications, for real

needs = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("stunnel4") and shutil.which("openssl")),
    reason="needs root (network namespaces), stunnel4 and openssl")


def _netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


@needs
def test_two_applications_get_identical_keys_refusals_then_keys_again(files, tmp_path):
    folder, ks = files
    tag = f"qkt{os.getpid() % 100000}"
    names = {"gw-a": f"{tag}-a", "gw-b": f"{tag}-b"}
    times = ServiceTimes(serve_margin=30.0, dec_window=20.0, clock_skew=5.0)
    services = {
        "gw-a": KeyService([PoolSpec(keyapps.POOL, "gw-b", keyapps.APP_A, keyapps.APP_B)],
                           times, kme_id="qkdgate-gw-a"),
        "gw-b": KeyService([PoolSpec(keyapps.POOL, "gw-a", keyapps.APP_B, keyapps.APP_A)],
                           times, kme_id="qkdgate-gw-b")}
    loops: dict[str, LoopThread] = {}
    runners: dict[str, KeyServiceRunner] = {}
    apps = None
    phase = ["clean"]
    try:
        for gw, ns in names.items():
            _netns(ns)
            loops[gw] = LoopThread(ns, f"ks-{gw}").start()
            cert, key = ks.server[gw]
            local = keyapps.APP_A if gw == "gw-a" else keyapps.APP_B
            runners[gw] = KeyServiceRunner(
                services[gw], host="127.0.0.1", port=keyapps.ETSI014_PORT, cert=str(cert),
                key=str(key), ca=str(ks.ca), state_dir=tmp_path / gw,
                skip=[SkipListener(local, f"127.0.0.1:{keyapps.SKIP_PORT}",
                                   str(ks.psk[gw].file))],
                clock=lambda: 1.0)
            loops[gw].call(runners[gw].start(), timeout=60)

        def rekey(generation: int, qkd: bool) -> None:
            # the protocol's order (tests/keyservice/helpers.py Pair.rekey), on
            # each gateway's own loop, as its daemon would
            a, b = runners["gw-a"], runners["gw-b"]

            async def keyed(r: KeyServiceRunner, peer: str, role: str) -> None:
                r.generation_keyed(peer, generation, session(generation, qkd=qkd), role, 1.0)

            async def confirmed(r: KeyServiceRunner, peer: str) -> None:
                r.generation_confirmed(peer, generation, 1.0)
            loops["gw-a"].call(keyed(a, "gw-b", "initiator"))
            loops["gw-b"].call(keyed(b, "gw-a", "responder"))
            loops["gw-b"].call(confirmed(b, "gw-a"))
            loops["gw-a"].call(confirmed(a, "gw-b"))

        apps = keyapps.KeyApps(ks, names["gw-a"], names["gw-b"], lambda: phase[0],
                               lambda: 0.0).start_loops()
        rekey(1, qkd=True)
        assert [apps.round(api) for api in keyapps.APIS * 3] == ["served"] * 6
        phase[0] = "eavesdropper, blocked"
        rekey(2, qkd=False)          # hybrid-required: the newest generation has no QKD
        assert [apps.round(api) for api in keyapps.APIS * 2] == ["refused"] * 4
        phase[0] = "after eavesdropper"
        rekey(3, qkd=True)
        assert [apps.round(api) for api in keyapps.APIS * 2] == ["served"] * 4
        s = apps.summary()
    finally:
        if apps is not None:
            apps.stop()
        for gw, r in runners.items():
            loops[gw].call(r.close(), timeout=30)
        for lt in loops.values():
            lt.stop()
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)
    for api in keyapps.APIS:
        by = s["apis"][api]["by_phase"]
        assert by["clean"]["served"] == 3 and by["clean"]["without_qkd"] == 0
        blocked = by["eavesdropper, blocked"]
        assert blocked["served"] == 0 and blocked["refused"] == 2
        assert by["after eavesdropper"]["served"] == 2
        assert s["apis"][api]["mismatch"] == 0 and s["apis"][api]["fetch_refused"] == 0
        assert s["apis"][api]["statuses"]["503"] == 2
        assert "policy hybrid-required refuses" in s["apis"][api]["last_refusal"]
    # what the view, the final lines and the report make of it; no key in any
    snap = {"t": 1.0, "key_service": apps.view()}
    text = render(snap)
    assert "key service etsi014: served 5 refused 2" in text
    assert "key service skip: served 5 refused 2" in text
    page = render_html({"key_service": s}, {})
    assert "Key service (ETSI 014 and SKIP)" in page and "eavesdropper, blocked" in page
    assert all(len(a["key_ID"] or "") <= 8 for a in s["attempts"])
    assert Path(ks.psk["gw-a"].file).exists()


def test_live_dashboard_shows_the_key_service_table():
    import io

    from rich.console import Console

    from qkdgate.gateway.demo.view import dashboard_view
    from qkdgate.gateway.telemetry.dashboard import Dashboard
    snap = {"t": 3.0, "key_service": {
        "etsi014": {"served": 7, "refused": 2, "fetch_refused": 0, "mismatch": 0,
                    "last": "503 no key: generation 4 no longer serves"},
        "skip": {"served": 5, "refused": 1, "fetch_refused": 1, "mismatch": 0, "last": ""}}}
    dash = Dashboard("qkdgate demo")
    dash.update(dashboard_view(snap))
    console = Console(record=True, width=160, file=io.StringIO(), color_system=None)
    console.print(dash.render())
    text = console.export_text()
    assert "key service" in text and "503 no key: generation 4 no longer serves" in text
    cells = {ln.split()[0]: ln.split()[1:4] for ln in text.splitlines()
             if ln.split()[:1] in (["etsi014"], ["skip"])}
    assert cells["etsi014"][:3] == ["7", "2", "0"], text     # served, refused, mismatch
    assert cells["skip"][:3] == ["5", "1", "1"], text         # a fetch refusal counts as bad
    # without --key-service the table is absent
    dash2 = Dashboard("qkdgate demo")
    dash2.update(dashboard_view({"t": 3.0}))
    console.print(dash2.render())
    assert console.export_text().count("key service") == 0
