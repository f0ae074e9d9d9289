"""``qkdgate run -c FILE``: run the gateway daemon in the foreground.

Theory of operation: load and validate the configuration (a bad file exits
with status 2 before anything touches the kernel), turn off core dumps
(key material must never reach a disk), configure structured logging, and
run :class:`~qkdgate.gateway.daemon.daemon.Daemon` until SIGTERM/SIGINT. SIGHUP
reloads the file (validated first; a bad file changes nothing).

Exit policy: by default the daemon leaves its blocking policies (and XFRM
SAs, which the kernel expires on their lifetimes) in place, so protected
traffic is dropped rather than sent in clear while it is down; a restart
adopts what it left. ``--teardown-on-exit`` removes every SA and policy
the daemon installed: an explicit choice to stop protecting (and stop
blocking) the traffic.

``--backend recording`` uses the in-memory kernel fakes (demos, CI
without ESP): nothing reaches the kernel, and the daemon says so loudly.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="configuration file (see docs/config.md)")
    p.add_argument("--teardown-on-exit", action="store_true",
                   help="on exit remove every SA and policy (default: keep blocking)")
    p.add_argument("--backend", choices=("kernel", "recording"), default="kernel",
                   help="kernel: XFRM/MACsec netlink (default); recording: in-memory, "
                        "for demos and tests")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override telemetry.log.level")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="override telemetry.log.format")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from qkdgate.gateway.config.model import load_config
    from qkdgate.gateway.daemon.daemon import Daemon
    from qkdgate.gateway.telemetry.metrics import configure_logging
    from qkdgate.keymix.secret import disable_core_dumps

    cfg = load_config(args.config)          # ConfigError -> exit 2, nothing touched
    logcfg = cfg.telemetry.log
    configure_logging(args.log_level or logcfg.level, args.log_format or logcfg.format)
    log = logging.getLogger("qkdgate.daemon")
    dumps = disable_core_dumps()
    if dumps.ok:
        log.info("core dumps disabled (PR_SET_DUMPABLE 0, RLIMIT_CORE 0)")
    else:
        log.warning("core dumps only partly disabled: %s", dumps.detail)
    backend = "recording" if args.backend == "recording" else None
    if backend:
        log.warning("--backend recording: NOTHING is installed in the kernel; traffic is "
                    "not protected by this daemon")

    async def main() -> None:
        daemon = Daemon(cfg, config_path=args.config, ipsec_backend=backend,
                        macsec_backend=backend, teardown_on_exit=args.teardown_on_exit)
        daemon.install_signal_handlers()
        await daemon.run()

    asyncio.run(main())
    return 0
