"""Operations costs: what the durable journal adds to a rekey, and what
telemetry costs the daemon's event loop.

    .venv/bin/python bench/ops.py [--dir /var/lib/qkdgate-bench] [--rekeys 300]

Prints:
* journal: per-rekey latency of reserve_qkd_keys + record_generation (two
  fsynced appends) on the given directory's file system, p50/p99, and
  without fsync for comparison; compaction time at 10,000 records;
* telemetry: publish_event() calls per second with no broker (queue full,
  dropping) and, if ``mosquitto`` is installed, events per second delivered
  through a local broker at QoS 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid

from qkdgate.gateway.daemon.journal import Journal
from qkdgate.gateway.telemetry.mqtt import MqttOptions, Telemetry


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def bench_journal(folder: str, rekeys: int, fsync: bool) -> list[float]:
    d = tempfile.mkdtemp(dir=folder)
    try:
        with Journal.open(d, fsync=fsync, compact_after=0) as j:
            out = []
            for g in range(1, rekeys + 1):
                t0 = time.perf_counter()
                j.reserve_qkd_keys("t", g, [str(uuid.uuid4())])
                j.record_generation("t", g)
                out.append(time.perf_counter() - t0)
            return out
    finally:
        shutil.rmtree(d)


def bench_compaction(folder: str) -> float:
    d = tempfile.mkdtemp(dir=folder)
    try:
        with Journal.open(d, compact_after=0, fsync=False) as j:
            for g in range(1, 5001):
                j.reserve_qkd_keys("t", g, [str(uuid.uuid4())])
                j.record_generation("t", g)
            j._fsync = True
            t0 = time.perf_counter()
            j.compact()
            return time.perf_counter() - t0
    finally:
        shutil.rmtree(d)


async def bench_publish_no_broker(n: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tel = Telemetry(MqttOptions(port=port, backoff_initial=10), "bench")
    task = asyncio.create_task(tel.run())
    ev = {"event": "rekey_done", "tunnel": "t", "generation": 1,
          "inputs": {"kem": "ML-KEM-768", "x25519": True, "qkd_key_ids": [str(uuid.uuid4())]},
          "latency_ms": 12.5}
    t0 = time.perf_counter()
    for _ in range(n):
        tel.publish_event(ev)
    dt = time.perf_counter() - t0
    await tel.close(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return n / dt


async def bench_broker(n: int, folder: str) -> float | None:
    if not shutil.which("mosquitto"):
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(folder, "bench-mosquitto.conf")
    with open(conf, "w") as f:
        user = "user root\n" if os.geteuid() == 0 else ""
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}")
    proc = subprocess.Popen(["mosquitto", "-c", conf], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        tel = Telemetry(MqttOptions(port=port, queue_size=n + 10), "bench")
        task = asyncio.create_task(tel.run())
        while not tel.stats.connected:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        for g in range(n):
            tel.publish_event({"event": "rekey_done", "tunnel": "t", "generation": g})
        while tel.pending():
            await asyncio.sleep(0.001)
        dt = time.perf_counter() - t0
        await tel.close()
        await task
        return n / dt
    finally:
        proc.terminate()
        proc.wait(5)
        os.unlink(conf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp",  # noqa: S108  a disk-backed default, not a temp file
                    help="file system to measure the journal on")
    ap.add_argument("--rekeys", type=int, default=300)
    args = ap.parse_args()
    for fsync in (True, False):
        xs = bench_journal(args.dir, args.rekeys, fsync)
        print(f"journal per rekey ({'fsync' if fsync else 'no fsync'}, {args.dir}): "
              f"p50 {statistics.median(xs) * 1e3:.3f} ms, p99 {pct(xs, 99) * 1e3:.3f} ms")
    print(f"journal compaction of 10,000 records: {bench_compaction(args.dir) * 1e3:.1f} ms")
    rate = asyncio.run(bench_publish_no_broker(100_000))
    print(f"telemetry publish_event, no broker (dropping): {rate:,.0f} events/s")
    rate = asyncio.run(bench_broker(5_000, args.dir))
    if rate is None:
        print("telemetry through mosquitto: skipped (mosquitto not installed)")
    else:
        print(f"telemetry through a local mosquitto, QoS 1: {rate:,.0f} events/s")


if __name__ == "__main__":
    main()
