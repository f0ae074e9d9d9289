"""One-tunnel rekey of two real daemons in one process, on the host (issue 19:
why N=1 is slower than strongSwan). No ESP needed: the kernels are the
recording fakes (qkdgate.testing.fakes), the KME simulator is its own
process (``qkdgate kme-sim``), the key sources real ETSI 014 clients.

    .venv/bin/python bench/rekey_n1.py                     # REPS=30 GRACE=50ms
    .venv/bin/py-spy record --rate 250 --format raw -o n1.txt -- .venv/bin/python bench/rekey_n1.py

Per rep: ask gw-a for a rekey (as the control socket does), then time until
both fakes hold the new outbound SA and neither holds the old one (the
completion of bench/vs_strongswan.py). Prints median [min-max].
"""
import asyncio
import contextlib
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))   # daemon_pair: the test configs
from daemon_pair import write_pair  # noqa: E402
from vs_contenders import _banner  # noqa: E402  (bench/ is not a package)
from vs_topology import nets  # noqa: E402

from qkdgate.gateway.config.model import load_config  # noqa: E402
from qkdgate.gateway.daemon.daemon import Daemon  # noqa: E402
from qkdgate.gateway.daemon.sdnotify import SdNotifier  # noqa: E402
from qkdgate.testing.fakes import RecordingIpsecBackend  # noqa: E402

GRACE = os.environ.get("GRACE", "50ms")
REPS = int(os.environ.get("REPS", "30"))


def start_kme(work: Path) -> tuple[subprocess.Popen[bytes], object]:
    """``qkdgate kme-sim`` on loopback; the credentials of SAE-A and SAE-B."""
    with open(work / "kme.log", "w") as log:
        kme = subprocess.Popen([sys.executable, "-m", "qkdgate", "kme-sim", "--state-dir",
                                str(work / "kme"), "--port", "0", "--port-004", "-1",
                                "--admin-port", "-1", "--prefill", "5000"],
                               stdout=subprocess.PIPE, stderr=log)
    banner = _banner(kme, 60)
    creds = {}
    ca = re.search(r"^  demo CA: +(\S+)$", banner, re.M)
    for sae, k in (("SAE-A", "KME-A"), ("SAE-B", "KME-B")):
        url = re.search(rf"^  {k}: (https://\S+) ", banner, re.M)
        c = re.search(rf"^  {sae}: cert (\S+)\n\s+key  (\S+)$", banner, re.M)
        if url is None or c is None or ca is None:
            raise RuntimeError(f"kme-sim banner not understood:\n{banner}")
        creds[sae] = types.SimpleNamespace(url=url.group(1), kme_id=k, cert=c.group(1),
                                           key=c.group(2), ca=ca.group(1), url004=None)
    return kme, types.SimpleNamespace(credentials=lambda s: creds[s])


def outbound(k: RecordingIpsecBackend) -> set[tuple[object, ...]]:
    return {key for key, sa in k.sas.items() if sa.direction == "out"}


async def rekey_and_wait(ds: list[Daemon], ks: list[RecordingIpsecBackend], *, tunnels: int = 1,
                         poll: float = 0.0005, limit: float | None = None) -> float:
    """Ask gw-a for a rekey (one exchange keys all of the peer's tunnels) and
    return the seconds until both fakes hold at least ``tunnels`` new outbound
    SAs and none of the old ones (bench/vs_strongswan.py's completion). The
    fakes have no notifications: they are polled every ``poll`` seconds."""
    old = [outbound(k) for k in ks]
    t0 = time.perf_counter()
    ds[0].rekey("t1")
    while True:
        now = [outbound(k) for k in ks]
        if all(len(x - o) >= tunnels and not x & o for x, o in zip(now, old, strict=True)):
            return time.perf_counter() - t0
        if limit is not None and time.perf_counter() - t0 > limit:
            raise RuntimeError(f"a rekey of {tunnels} tunnel(s) did not complete within {limit} s")
        await asyncio.sleep(poll)


async def rekeys(ds: list[Daemon], ks: list[RecordingIpsecBackend]) -> list[float]:
    took = []
    for _ in range(REPS):
        took.append(await rekey_and_wait(ds, ks))
        await asyncio.sleep(0.2)
    return took


def more_tunnels(text: str, tunnels: int, side_a: bool) -> str:
    """write_pair's config with tunnels t2..tN beside t1: copies of t1's
    block on their own subnets (bench/vs_topology.py's numbering) and reqids."""
    block = re.search(r"^  - name: t1\n(?:    .*\n)+", text, re.M)
    if block is None:
        raise RuntimeError("write_pair's config has no tunnel t1")
    a_net, b_net = ("10.1.0.0/16", "10.2.0.0/16") if side_a else ("10.2.0.0/16", "10.1.0.0/16")
    extra = []
    for i in range(2, tunnels + 1):
        ln, rn = nets(i) if side_a else nets(i)[::-1]
        extra.append(block.group(0).replace("name: t1", f"name: t{i}")
                     .replace(f"[{a_net}]", f"[{ln}]").replace(f"[{b_net}]", f"[{rn}]")
                     .replace("reqid: 100\n", f"reqid: {1000 + 16 * i}\n"))
    return text[:block.end()] + "".join(extra) + text[block.end():]


@contextlib.asynccontextmanager
async def daemon_pair(prefix: str, grace: str, tunnels: int = 1,
                      kernel: type[RecordingIpsecBackend] = RecordingIpsecBackend
                      ) -> AsyncIterator[tuple[list[Daemon], list[RecordingIpsecBackend]]]:
    """Two real daemons in this process, their tunnels (t1..tN on one peer)
    up (each side's generation active), the KME simulator its own process;
    stopped on exit."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    kme, sim = start_kme(work)
    write_pair(work, kme=sim, interval="3600s", soft="7000s", hard="7200s")
    cfgs = []
    for name in ("gw-a.yaml", "gw-b.yaml"):
        text = (work / name).read_text().replace("grace: 500ms", f"grace: {grace}")
        text = more_tunnels(text, tunnels, name == "gw-a.yaml")
        (work / name).write_text(text.replace("level: debug", "level: warning"))
        cfgs.append(load_config(str(work / name)))
    ks = [kernel(time.monotonic), kernel(time.monotonic)]
    ds = [Daemon(c, ipsec_backend=k, notifier=SdNotifier({}),
                 control_path=str(work / f"{i}.sock"))
          for i, (c, k) in enumerate(zip(cfgs, ks, strict=True))]
    tasks = [asyncio.create_task(d.run()) for d in ds]
    logging.getLogger().setLevel(logging.WARNING)
    try:
        await asyncio.wait_for(asyncio.gather(*(d.ready.wait() for d in ds)), 60)
        while not all(t.active for d in ds for t in d.tunnels.tunnels.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        yield ds, ks
    finally:
        for d in ds:
            d.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        kme.terminate()
        kme.wait()


async def main() -> None:
    async with daemon_pair("rekey-n1-", GRACE) as (ds, ks):
        await asyncio.sleep(1.0)
        took = await rekeys(ds, ks)
        print(f"N=1 rekey of two in-process daemons, {REPS} reps, grace {GRACE}: median "
              f"{statistics.median(took) * 1e3:.1f} ms [{min(took) * 1e3:.1f}-"
              f"{max(took) * 1e3:.1f}], host load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
