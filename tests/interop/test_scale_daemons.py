"""Two real daemons (real protocol, identities and key schedule, the
recording kernel fakes) with 4,096 IPsec tunnels on ONE peer: one exchange
keys them all, and every SA key one side installs outbound is the key the
other installs inbound (issue 19 item 2: no 64-tunnel cap)."""

import asyncio
import time

from scale_pair import write_scale_pair

from qkdgate.gateway.daemon.daemon import Daemon
from qkdgate.gateway.daemon.sdnotify import SdNotifier
from qkdgate.testing.fakes import RecordingIpsecBackend


async def test_4096_tunnels_on_one_peer_establish_with_one_exchange(tmp_path):
    n = 4096
    cfg_a, cfg_b, _, _ = write_scale_pair(tmp_path, n)
    kernels = [RecordingIpsecBackend(), RecordingIpsecBackend()]
    ds = [Daemon(cfg, ipsec_backend=k, notifier=SdNotifier({}),
                 control_path=str(tmp_path / f"{i}.sock"))
          for i, (cfg, k) in enumerate(zip((cfg_a, cfg_b), kernels, strict=True))]
    tasks = [asyncio.create_task(d.run()) for d in ds]
    try:
        await asyncio.wait_for(asyncio.gather(*(d.ready.wait() for d in ds)), 120)
        t0 = time.perf_counter()
        while not all(t.active for d in ds for t in d.tunnels.tunnels.values()):
            assert time.perf_counter() - t0 < 120, "not every tunnel got a generation"
            await asyncio.sleep(0.05)
        took = time.perf_counter() - t0
        gens = {t.active.number for d in ds for t in d.tunnels.tunnels.values()}
        assert gens == {1}                       # one exchange keyed all 4,096
        pairs = 0
        for src, dst in ((kernels[0], kernels[1]), (kernels[1], kernels[0])):
            ins = {(sa.sa_id.dst, sa.sa_id.spi): sa for sa in dst.sas.values()
                   if sa.direction == "in"}
            for sa in src.sas.values():
                if sa.direction == "out":
                    assert sa.spec.key.reveal() == ins[(sa.sa_id.dst, sa.sa_id.spi)].spec.key.reveal()
                    pairs += 1
        assert pairs == 2 * n
        print(f"4096 tunnels: established {took:.2f} s after both daemons were ready")
    finally:
        for d in ds:
            d.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)
