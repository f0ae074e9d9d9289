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

There is no way to run this command without kernel enforcement: the
in-memory kernel fakes live in ``qkdgate.testing``, which nothing shipped
imports; tests pass them to :func:`run` (``ipsec_backend=``,
``macsec_backend=``) from their own entry point
(tests/interop/run_fake_kernel.py).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="configuration file (see docs/config.md)")
    p.add_argument("--teardown-on-exit", action="store_true",
                   help="on exit remove every SA and policy (default: keep blocking)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override telemetry.log.level")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="override telemetry.log.format")


def run(args: argparse.Namespace, *, ipsec_backend: object = None,
        macsec_backend: object = None) -> int:
    """Run the daemon; the backends default to the kernel's (XFRM, MACsec)."""
    import asyncio
    import logging

    from qkdgate.gateway.config.model import load_config
    from qkdgate.gateway.config.validate import warnings
    from qkdgate.gateway.daemon.daemon import Daemon
    from qkdgate.gateway.telemetry.logs import configure_logging
    from qkdgate.keymix.secret import disable_core_dumps

    cfg = load_config(args.config)          # ConfigError -> exit 2, nothing touched
    logcfg = cfg.telemetry.log
    configure_logging(args.log_level or logcfg.level, args.log_format or logcfg.format)
    log = logging.getLogger("qkdgate.daemon")
    for note in warnings(cfg):              # what `qkdgate check-config` would say
        log.warning("config: %s", note)
    dumps = disable_core_dumps()
    if dumps.ok:
        log.info("core dumps disabled (PR_SET_DUMPABLE 0, RLIMIT_CORE 0)")
    else:
        log.warning("core dumps only partly disabled: %s", dumps.detail)

    async def main() -> None:
        daemon = Daemon(cfg, config_path=args.config, ipsec_backend=ipsec_backend,
                        macsec_backend=macsec_backend, teardown_on_exit=args.teardown_on_exit)
        daemon.install_signal_handlers()
        await daemon.run()

    asyncio.run(main())
    return 0
