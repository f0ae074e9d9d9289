"""``qkdgate run`` with the in-memory kernel fakes, for tests only.

The shipped ``qkdgate run`` always enforces in the kernel (issue 9: no
shipped command without kernel enforcement); this test entry point hands the
recording fakes from ``qkdgate.testing`` to the same :func:`run` through its
constructor arguments. Usage (as tests/interop/test_daemon_cli.py does)::

    python tests/interop/run_fake_kernel.py -c FILE [run options]
"""

from __future__ import annotations

import argparse
import sys

from qkdgate.gateway.cli import run
from qkdgate.gateway.cli.main import run_command
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run_fake_kernel")
    run.add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("run", lambda: run.run(args, ipsec_backend=RecordingIpsecBackend(),
                                               macsec_backend=RecordingMacsecBackend()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
