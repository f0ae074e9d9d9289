"""The ``qkdgate`` command line.

Theory of operation: each subcommand lives in its own module under
``qkdgate.gateway`` exposing ``add_arguments(parser)`` and ``run(args) -> int``.
This module only builds the parser from :data:`COMMANDS` and converts
qkdgate errors into one clear line on stderr and an exit code (2 for the
operator's mistakes, 1 for everything else); a traceback means a bug.
Command modules keep their top-level imports light so ``--help`` is fast,
and :func:`main` imports only the module of the command it runs (the others
are listed by name and help line), so ``qkdgate run`` does not load the demo,
the KME simulator or the dashboard before READY=1 (issue 19).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from qkdgate import __version__
from qkdgate.errors import ConfigError, QkdgateError

# (name, module, one-line help). A command whose module is not present in
# this build is left out of the parser when its module is imported (the
# full parser, or that command run); the others are listed unchecked.
COMMANDS: list[tuple[str, str, str]] = [
    ("run", "qkdgate.gateway.cli.run", "run the gateway daemon"),
    ("status", "qkdgate.gateway.cli.status", "show tunnels, generations and key inputs"),
    ("top", "qkdgate.gateway.cli.top", "live dashboard of a running daemon"),
    ("rekey", "qkdgate.gateway.cli.rekey", "rekey a tunnel now"),
    ("ha-notify", "qkdgate.gateway.cli.ha_notify",
     "tell the daemon its HA role (keepalived notify script)"),
    ("keygen", "qkdgate.gateway.cli.keygen", "create a gateway identity (ML-DSA + Ed25519)"),
    ("check-config", "qkdgate.gateway.cli.check_config", "validate a configuration file"),
    ("kme-sim", "qkdgate.gateway.cli.kme_sim", "run the ETSI QKD 014/004 KME simulator"),
    ("failsafe", "qkdgate.tunnels.failsafe", "block all protected traffic (for ExecStopPost)"),
    ("demo", "qkdgate.gateway.demo.command", "two-gateway demo with the built-in QKD simulator"),
    ("probe", "qkdgate.keymix.probe", "report which crypto algorithms are available"),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only`` (a command name), only that command's
    module is imported and gets its arguments, the others are bare entries
    that keep ``qkdgate --help``'s list whole."""
    parser = argparse.ArgumentParser(
        prog="qkdgate",
        description="Hybrid post-quantum (ML-KEM + X25519) and QKD (ETSI GS QKD 014/004) "
                    "key agreement for kernel IPsec and MACsec tunnels.")
    parser.add_argument("--version", action="version", version=f"qkdgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname, helptext in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help=helptext, description=helptext)
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and modname.startswith(exc.name):
                continue  # this command is not part of this build yet
            raise
        p = sub.add_parser(name, help=helptext, description=helptext)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the
    top-level options take no value), if it is one of :data:`COMMANDS`."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if any(first == name for name, _, _ in COMMANDS) else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return run_command(args.command, lambda: args._run(args))


def run_command(command: str, fn: Callable[[], int | None]) -> int:
    """Run one subcommand and turn our errors into its exit status: 2 for a
    configuration or usage error, 1 for any other qkdgate error, 130 for ^C."""
    try:
        return int(fn() or 0)
    except ConfigError as exc:
        print(f"qkdgate {command}: {exc}", file=sys.stderr)
        return 2
    except QkdgateError as exc:
        print(f"qkdgate {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
