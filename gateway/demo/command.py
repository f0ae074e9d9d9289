"""``qkdgate demo``: two gateways, two hosts, the KME simulator, live.

Theory of operation: the demo needs a kernel with ESP + rfc4106(gcm(aes))
(and MACsec for ``--macsec``). :func:`probe_kernel` tries exactly what the
demo will do, in a throw-away namespace: add an XFRM state with GCM, and a
macsec link on a veth. When the kernel can, the demo runs here
(:mod:`qkdgate.gateway.demo.run`). When it cannot, :func:`decide` says so
in one line and the demo re-runs itself inside the kernel lab VM
(``lab/setup.sh`` + ``lab/run.sh``: Debian's distro kernel under QEMU),
which streams the VM's output live; the JSON summary is written to the
VM's shared output directory and copied back to ``--json``. When the lab
cannot be used either, the error names what is missing.

Top-level imports stay light: ``qkdgate --help`` imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdgate.errors import ConfigError, QkdgateError

LAB_HOME = "/var/lib/qkdgate-lab"
GCM_KEY = "0x" + "11" * 36        # 256-bit AES key + 32-bit salt (RFC 4106 8.1), probe only


@dataclass
class KernelSupport:
    esp: bool = False
    gcm: bool = False
    macsec: bool = False
    problems: list[str] = field(default_factory=list)

    def missing(self, macsec: bool) -> list[str]:
        out = [] if self.esp else ["ESP"]
        if self.esp and not self.gcm:
            out.append("rfc4106(gcm(aes))")
        if macsec and not self.macsec:
            out.append("MACsec")
        return out


Runner = Callable[[Sequence[str], str], Any]


def _run(cmd: Sequence[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), input=stdin, text=True, capture_output=True)


def probe_kernel(runner: Runner = _run, tag: str | None = None) -> KernelSupport:
    """Try ESP/GCM and MACsec in a throw-away namespace (removed afterwards)."""
    ns = f"qd{tag or os.urandom(3).hex()}-probe"
    ks = KernelSupport()
    r = runner(["ip", "netns", "add", ns], "")
    if r.returncode:
        ks.problems.append(f"cannot create a network namespace: {r.stderr.strip()}")
        return ks
    try:
        state = ["ip", "-n", ns, "xfrm", "state", "add", "src", "10.0.0.1", "dst", "10.0.0.2",
                 "proto", "esp", "spi", "0x100", "reqid", "1", "mode", "tunnel"]
        r = runner([*state, "aead", "rfc4106(gcm(aes))", GCM_KEY, "128"], "")
        if r.returncode == 0:
            ks.esp = ks.gcm = True
        else:
            ks.problems.append(f"ESP with rfc4106(gcm(aes)): {r.stderr.strip()}")
            r2 = runner([*state[:-4], "spi", "0x101", "reqid", "1", "mode", "tunnel", "enc",
                                      "cbc(aes)", "0x" + "22" * 16, "auth", "hmac(sha256)",
                                      "0x" + "33" * 32], "")
            ks.esp = r2.returncode == 0
        r = runner(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], "")
        if r.returncode:
            ks.problems.append(f"veth: {r.stderr.strip()}")
        else:
            r = runner(["ip", "-n", ns, "link", "add", "link", "p0", "name", "ms0", "type",
                        "macsec", "cipher", "gcm-aes-256", "encrypt", "on"], "")
            ks.macsec = r.returncode == 0
            if r.returncode:
                ks.problems.append(f"MACsec: {r.stderr.strip()}")
    finally:
        runner(["ip", "netns", "del", ns], "")
    return ks


def in_lab_vm(environ: dict[str, str] | None = None) -> bool:
    return bool((environ if environ is not None else os.environ).get("LAB_KVER"))


def decide(where: str, support: KernelSupport, macsec: bool, *, in_vm: bool,
           kernel: str) -> tuple[str, str]:
    """("host" | "vm", one line for the user); raises when neither works."""
    missing = support.missing(macsec)
    if where == "vm" and not in_vm:
        return "vm", "running the demo inside the kernel lab VM (--where vm)"
    if not missing:
        return "host", f"kernel {kernel}: ESP/GCM{'/MACsec' if macsec else ''} available"
    what = "/".join(missing)
    if where == "host" or in_vm:
        detail = "; ".join(support.problems) or "probe failed"
        raise QkdgateError(f"this kernel ({kernel}) lacks {what} ({detail}); load esp4, "
                           f"xfrm_user{', macsec' if 'MACsec' in missing else ''} and an AES-GCM "
                           "implementation, or run with --where vm")
    return "vm", (f"this kernel ({kernel}) lacks {what}: running the demo inside the kernel lab "
                  "VM (Debian's kernel under qemu)")


def source_root() -> Path:
    import qkdgate
    return Path(qkdgate.__file__).resolve().parent.parent


def vm_argv(args: argparse.Namespace, json_path: str, log_path: str,
            report_dir: str = "report") -> list[str]:
    """The same demo, for inside the VM: the host's options plus where the
    summary and the log go (the VM's shared output directory)."""
    out = ["--where", "host", "--json", json_path, "--log-file", log_path,
           "--policy", args.policy,
           "--rekey-interval", f"{args.rekey_interval:g}", "--rate", str(args.rate),
           "--view-interval", f"{args.view_interval:g}", "--eavesdrop-for",
           f"{args.eavesdrop_for:g}", "--eve-fraction", f"{args.eve_fraction:g}"]
    if args.duration is not None:
        out += ["--duration", f"{args.duration:g}"]
    if args.eavesdrop_at is not None:
        out += ["--eavesdrop-at", f"{args.eavesdrop_at:g}"]
    if args.after_recovery:
        out += ["--after-recovery", f"{args.after_recovery:g}"]
    if args.macsec:
        out.append("--macsec")
    if getattr(args, "qkd", "014") != "014":
        out += ["--qkd", args.qkd]
    if getattr(args, "key_service", False):
        out.append("--key-service")
    if getattr(args, "topology", None):
        out += ["--topology", args.topology]
    if args.verbose:
        out.append("--verbose")
    if getattr(args, "report", None):
        out += ["--report", report_dir]
    if getattr(args, "plain", False):
        out.append("--plain")
    return out


def run_in_vm(args: argparse.Namespace, *, root: Path | None = None,
              call: Callable[..., int] = subprocess.call) -> int:
    root = root or source_root()
    setup, run = root / "lab" / "setup.sh", root / "lab" / "run.sh"
    if not (setup.exists() and run.exists()):
        raise QkdgateError(f"the kernel lab (lab/setup.sh, lab/run.sh) is not in {root}: it ships "
                           "with the source checkout; run ./run-demo from a checkout, or use a "
                           "kernel with ESP, rfc4106(gcm(aes)) and MACsec")
    if call(["bash", str(setup)]) != 0:
        raise QkdgateError("the kernel lab could not be set up (lab/setup.sh said why above)")
    lab_home = Path(os.environ.get("LAB_HOME", LAB_HOME))
    out = lab_home / "out" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.json"
    timeout = 3600 * 24 if args.duration is None else int(args.duration) + 900
    env = {**os.environ, "LAB_OUT": str(out), "LAB_TIMEOUT": str(timeout)}
    cmd = ["bash", str(run), "--", sys.executable, "-m", "qkdgate.gateway.cli.main", "demo",
           *vm_argv(args, str(summary), str(out / "demo.log"), str(out / "report"))]
    print("demo: the gateways run inside the VM, so their control sockets (printed below) are "
          "the VM's: qkdgate top cannot attach from this host; run the demo on a kernel with "
          "ESP/GCM (--where host) to attach", flush=True)
    rc = call(cmd, env=env, cwd=str(root))
    if getattr(args, "report", None):
        if (out / "report" / "report.html").exists():
            shutil.copytree(out / "report", args.report, dirs_exist_ok=True)
            print(f"demo: report written to {Path(args.report) / 'report.html'}", flush=True)
        else:
            print(f"demo: the VM wrote no report (lab output in {out})", file=sys.stderr)
    if args.json:
        if summary.exists():
            shutil.copyfile(summary, args.json)
            print(f"demo: summary written to {args.json}", flush=True)
        else:
            print(f"demo: the VM wrote no summary (lab output in {out})", file=sys.stderr)
    print(f"demo: the VM's log is {out / 'demo.log'}", flush=True)
    return rc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="end by itself after SECONDS of traffic (default: until Ctrl-C)")
    p.add_argument("--eavesdrop-at", type=float, metavar="SECONDS",
                   help="put an eavesdropper on the QKD link SECONDS after traffic starts")
    p.add_argument("--eavesdrop-for", type=float, default=15.0, metavar="SECONDS",
                   help="how long the eavesdropper stays (default 15; 0 = until the end)")
    p.add_argument("--after-recovery", type=float, default=0.0, metavar="SECONDS",
                   help="once the eavesdropper has left, run on until every traffic path has "
                        "carried keys in the kernel again for SECONDS (--duration is then a "
                        "minimum; default 0: end at --duration)")
    p.add_argument("--eve-fraction", type=float, default=0.5, metavar="P",
                   help="fraction of photons intercepted (QBER rises ~P*25%%; default 0.5)")
    p.add_argument("--policy", choices=("pqc-fallback", "block", "hybrid-required"),
                   default="pqc-fallback",
                   help="what the tunnels do without QKD keys: fall back to ML-KEM + X25519 "
                        "(default) or block (= hybrid-required)")
    p.add_argument("--macsec", action="store_true", help="also key a MACsec link gA-gB")
    p.add_argument("--topology", metavar="FILE",
                   help="a QKD network for the KME simulator (the kme-sim --topology format, "
                        "e.g. docs/topologies/two-paths.yaml): keys relayed through trusted "
                        "nodes; with pinned routes each gateway takes one key per path (rule "
                        "all); the eavesdropper sits on the file's first link; --qkd 014 only")
    p.add_argument("--qkd", choices=("014", "004", "004-json"), default="014",
                   help="how the gateways get QKD keys from the KME simulator: ETSI GS QKD 014 "
                        "(default), ETSI GS QKD 004 over its binary framing (004; docs/qkd.md), "
                        "or 004 over qkdgate's JSON binding (004-json)")
    p.add_argument("--key-service", action="store_true",
                   help="turn on both gateways' key services; two applications fetch keys "
                        "through ETSI 014 and SKIP and the view counts served and refused keys "
                        "(docs/keyservice.md)")
    p.add_argument("--json", metavar="FILE", help="write the run's summary as JSON")
    p.add_argument("--report", metavar="DIR",
                   help="write a run report: report.html (self-contained, opens offline), "
                        "PNG figures and summary.json")
    p.add_argument("--plain", action="store_true",
                   help="line output even on a terminal (no live dashboard)")
    p.add_argument("--rekey-interval", type=float, default=3.0, metavar="SECONDS",
                   help="rekey every SECONDS (default 3)")
    p.add_argument("--rate", type=int, default=100, metavar="N",
                   help="datagrams per second each way (default 100)")
    p.add_argument("--view-interval", type=float, default=2.0, metavar="SECONDS",
                   help="print the status block every SECONDS (default 2)")
    p.add_argument("--where", choices=("auto", "host", "vm"), default="auto",
                   help="run on this kernel, in the lab VM, or decide by probing (default)")
    p.add_argument("--verbose", action="store_true", help="debug logs in the run's log file")
    p.add_argument("--remove-leftovers", action="store_true",
                   help="delete the namespaces of demo runs that were killed (qd<tag>-*) and exit; "
                        "do not use while another demo runs")
    p.add_argument("--log-file", metavar="FILE",
                   help="the daemons' and simulator's log (default: in the run's temporary "
                        "state directory, removed at the end)")


def check_args(a: argparse.Namespace) -> None:
    if a.duration is not None and a.duration <= 0:
        raise ConfigError(f"--duration must be positive, not {a.duration:g}")
    if a.eavesdrop_at is not None:
        if a.eavesdrop_at < 0:
            raise ConfigError("--eavesdrop-at must not be negative")
        if a.duration is not None and a.eavesdrop_at >= a.duration:
            raise ConfigError(f"--eavesdrop-at {a.eavesdrop_at:g} is not within --duration "
                              f"{a.duration:g}")
    if a.eavesdrop_for < 0:
        raise ConfigError("--eavesdrop-for must not be negative")
    if a.after_recovery < 0:
        raise ConfigError("--after-recovery must not be negative")
    if not 0 < a.eve_fraction <= 1:
        raise ConfigError("--eve-fraction must be in (0, 1]")
    if a.rekey_interval < 1:
        raise ConfigError("--rekey-interval must be at least 1 s")
    if not 1 <= a.rate <= 5000:
        raise ConfigError("--rate must be between 1 and 5000 datagrams/s")
    if a.view_interval < 0.5:
        raise ConfigError("--view-interval must be at least 0.5 s")
    if getattr(a, "topology", None):
        if getattr(a, "qkd", "014") != "014":
            raise ConfigError("--topology relays ETSI 014 keys: use it with --qkd 014")
        from qkdgate.gateway.config.topology import load_topology
        from qkdgate.gateway.demo.config import topology_pairs
        a.topology = os.path.abspath(a.topology)    # the lab VM sees the host's / as is
        topology_pairs(load_topology(a.topology))


def options(a: argparse.Namespace) -> Any:
    from qkdgate.gateway.demo.run import DemoOptions
    return DemoOptions(duration=a.duration, eavesdrop_at=a.eavesdrop_at,
                       eavesdrop_for=a.eavesdrop_for, eve_fraction=a.eve_fraction,
                       after_recovery=a.after_recovery,
                       policy=a.policy, macsec=a.macsec, rekey_interval=a.rekey_interval,
                       rate=a.rate, view_interval=a.view_interval, verbose=a.verbose,
                       log_file=a.log_file, plain=a.plain, qkd=a.qkd,
                       key_service=getattr(a, "key_service", False),
                       topology=getattr(a, "topology", None))


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if os.geteuid() != 0:
        raise QkdgateError("the demo creates network namespaces and kernel SAs: run it as root "
                           "(./run-demo does the rest)")
    from qkdgate.gateway.demo import net as demo_net
    leftovers = demo_net.list_demo_namespaces()
    if args.remove_leftovers:
        failed = demo_net.remove_namespaces(leftovers)
        print(f"demo: removed {len(leftovers) - len(failed)} namespace(s)"
              + (f"; failed: {'; '.join(failed)}" if failed else ""), flush=True)
        return 1 if failed else 0
    if leftovers:
        print(f"demo: note: {len(leftovers)} namespace(s) of another or a killed demo run exist "
              f"({', '.join(leftovers[:3])}{', ...' if len(leftovers) > 3 else ''}); "
              "this run does not touch them (qkdgate demo --remove-leftovers deletes them)",
              flush=True)
    kernel = os.uname().release
    if args.where == "vm" and not in_lab_vm():
        where, line = "vm", "running the demo inside the kernel lab VM (--where vm)"
    else:
        where, line = decide(args.where, probe_kernel(), args.macsec, in_vm=in_lab_vm(),
                             kernel=kernel)
    print(f"demo: {line}", flush=True)
    if where == "vm":
        return run_in_vm(args)
    return run_here(args)


def run_here(args: argparse.Namespace) -> int:
    import atexit

    from qkdgate.gateway.demo.net import Cleanup
    from qkdgate.gateway.demo.run import DemoRun
    cleanup = Cleanup()
    atexit.register(cleanup.run)
    demo = DemoRun(options(args), cleanup=cleanup)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt   # unwinds the main thread into finish()
    old = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    failure: BaseException | None = None
    summary = None
    try:
        try:
            demo.run()
        except KeyboardInterrupt:
            interrupted = True
            print("demo: interrupted, cleaning up", flush=True)
        except Exception as exc:  # noqa: BLE001  reported after cleanup, with the summary so far
            failure = exc
            print(f"demo: failed: {type(exc).__name__}: {exc}; cleaning up", flush=True)
        summary = demo.finish()
    finally:
        cleanup.run()
        signal.signal(signal.SIGTERM, old)
    summary["interrupted"] = interrupted
    summary["error"] = f"{type(failure).__name__}: {failure}" if failure else None
    print(final_lines(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"demo: summary written to {args.json}", flush=True)
    if args.report:
        from qkdgate.gateway.demo.report import write_report
        files = write_report(summary, Path(args.report))
        print(f"demo: report written to {files.html}", flush=True)
    left = summary["cleanup"]["namespaces_left"]
    if left or summary["cleanup"]["errors"]:
        print(f"demo: cleanup incomplete: {left} {summary['cleanup']['errors']}", file=sys.stderr)
        return 1
    if failure is not None:
        if isinstance(failure, QkdgateError):
            raise failure
        raise QkdgateError(f"{type(failure).__name__}: {failure}") from failure
    return 130 if interrupted else 0


def final_lines(s: dict[str, Any]) -> str:
    t = s["traffic"]
    lat = s["rekey_latency_ms"]
    lines = [f"demo: done after {s['duration']:.0f} s: {s['rekeys']} rekeys "
             f"(latency p50 {lat['p50']} ms, p99 {lat['p99']} ms), traffic sent {t['sent']} "
             f"received {t['received']} lost {t['lost']}"]
    for a in s["alarms"]:
        lines.append(f"  alarm at {a['t']:.1f}s: {a['alarm']} on {a['source']}"
                     + (f" (QBER {a['qber']:.1%})" if a.get("qber") is not None else ""))
    for a in s["policy_actions"]:
        lines.append(f"  policy at {a['t']:.1f}s: {a['gateway']}/{a['tunnel']} {a['action']}: "
                     f"{a['detail']}")
    for name, st in t["streams"].items():
        per = ", ".join(f"{p}: {r['lost']}/{r['sent']}" for p, r in st["by_phase"].items())
        lines.append(f"  lost by phase {name}: {per}")
    for api, a in sorted(((s.get("key_service") or {}).get("apis") or {}).items()):
        per = ", ".join(f"{p}: {r['served']} served/{r['refused']} refused"
                        for p, r in a["by_phase"].items())
        lines.append(f"  key service {api}: {per}; mismatches {a['mismatch']}")
    return "\n".join(lines)
