"""``qkdgate check-config FILE``: validate a configuration without running.

Theory of operation: loads the file exactly as the daemon would
(:func:`qkdgate.gateway.config.model.load_config`, including every cross-check).
On success it prints a short summary, or with ``--json`` the parsed
configuration (which holds no secrets: those are file paths), and exits 0.
A :class:`~qkdgate.errors.ConfigError` propagates to ``cli.main``, which
prints its single line on stderr and exits 2. ``--check-files`` also checks
that the referenced files exist and that secret files are not readable by
group or others, which is useful on the target machine, not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command module stays light to import (cli/main.py)
    from qkdgate.gateway.config.model import Config
    from qkdgate.interfaces import IPAddress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="configuration file (YAML); - for stdin")
    parser.add_argument("--json", action="store_true",
                        help="print the parsed configuration as JSON (no secrets)")
    parser.add_argument("--check-files", action="store_true",
                        help="also check that referenced files exist and secret files "
                             "are private (mode 0600 or stricter)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    from qkdgate.gateway.config.model import load_config, parse_config
    from qkdgate.gateway.config.validate import warnings

    if args.file == "-":
        # relative paths in a piped config resolve against the current folder
        cfg = parse_config(sys.stdin.read(), "<stdin>", base_dir=os.getcwd())
    else:
        cfg = load_config(args.file)
    if args.check_files:
        check_files(cfg)
    notes = warnings(cfg)
    try:
        if args.json:
            json.dump(cfg.to_dict(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif not args.quiet:
            print(summary(cfg, args.file))
        sys.stdout.flush()
    except BrokenPipeError:  # `check-config ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if not args.quiet:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
    return 0


def _via(qkd: Any) -> str:
    names = [s.key_source for s in qkd.source_list]
    if not qkd.multi:
        return names[0] if names else "?"
    rule = "all of" if qkd.rule == "all" else f"{qkd.required} of"
    return f"{rule} {' + '.join(names)}"


def summary(cfg: Config, filename: str) -> str:
    g = cfg.gateway
    lines = [f"{filename}: OK",
             f"gateway {g.name}: {g.kem_suite.value} + X25519, profile {g.profile.value}, "
             f"listening on {_hostport(g.listen.address, g.listen.port)}/udp",
             f"{_n(len(cfg.peers), 'peer')}: "
             + ", ".join(f"{p.name} ({_hostport(p.address, p.port)}"
                         + (f", QKD via {_via(p.qkd)} as {p.qkd.role.value})" if p.qkd
                            else ", no QKD)") for p in cfg.peers),
             f"{_n(len(cfg.key_sources), 'key source')}"
             + (": " + ", ".join(f"{k.name} ({k.kind})" for k in cfg.key_sources)
                if cfg.key_sources else ""),
             f"{_n(len(cfg.tunnels), 'tunnel')}"
             + (": " + ", ".join(f"{t.name} ({t.type.value} to {t.peer}, {t.policy.value})"
                                 for t in cfg.tunnels) if cfg.tunnels else "")]
    policies = sorted({t.policy.value for t in cfg.tunnels})
    if policies:
        lines.append("policies: " + ", ".join(policies))
    return "\n".join(lines)


def check_files(cfg: Config) -> None:
    """Referenced files exist; secret files are private regular files; pinned
    identity files hold a public identity."""
    from qkdgate.gateway.config.model import IDENTITY_PREFIX
    g = cfg.gateway
    wanted: list[tuple[str, str, bool]] = [("gateway.identity", g.identity, True)]
    for i, p in enumerate(cfg.peers):
        wanted += [(f"peers[{i}].identities[{j}]", f, False) for j, f in enumerate(p.identities)]
        if p.psk_file:
            wanted.append((f"peers[{i}].psk_file", p.psk_file, True))
    tls_owners = [(f"key_sources[{i}].tls", k.tls) for i, k in enumerate(cfg.key_sources)]
    tls_owners.append(("telemetry.mqtt.tls", cfg.telemetry.mqtt.tls))
    for at, tls in tls_owners:
        if tls is None:
            continue
        for name, secret in (("cert", False), ("key", True), ("ca", False)):
            if getattr(tls, name):
                wanted.append((f"{at}.{name}", getattr(tls, name), secret))
    if cfg.telemetry.mqtt.password_file:
        wanted.append(("telemetry.mqtt.password_file", cfg.telemetry.mqtt.password_file, True))
    for at, path, secret in wanted:
        if path.startswith(IDENTITY_PREFIX):
            continue  # an inline pinned identity, already parsed by validate()
        try:
            st = os.lstat(path) if secret else os.stat(path)
        except OSError as exc:
            raise cfg.error(at, f"cannot use file: {exc.strerror}", expected="a readable file",
                            found=f"'{path}'") from None
        if secret and stat.S_ISLNK(st.st_mode):
            # the daemon opens secrets with O_NOFOLLOW, so a symlink would fail at start
            raise cfg.error(at, "secret file is a symbolic link", expected="a regular file",
                            found=f"a link to '{os.readlink(path)}'")
        if not stat.S_ISREG(st.st_mode):
            raise cfg.error(at, "not a regular file", expected="a file", found=f"'{path}'")
        if secret and st.st_mode & 0o077:
            raise cfg.error(at, "secret file is readable by group or others",
                            expected="mode 0600 or stricter",
                            found=f"mode {stat.S_IMODE(st.st_mode):04o}")
        if ".identities[" in at:
            _check_pinned_file(cfg, at, path)


def _check_pinned_file(cfg: Config, at: str, path: str) -> None:
    """A pinned identity file must hold one public identity string."""
    from qkdgate.errors import ConfigError
    from qkdgate.gateway.protocol.identity import PeerIdentity
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read(65536)
    except (OSError, UnicodeDecodeError) as exc:
        raise cfg.error(at, f"cannot read pinned identity: {exc}", expected="a readable file",
                        found=f"'{path}'") from None
    try:
        PeerIdentity.from_string(text)
    except ConfigError as exc:
        raise cfg.error(at, f"{path}: {exc.reason}", expected=exc.expected,
                        found=exc.found) from None


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _hostport(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if getattr(addr, "version", 4) == 6 else f"{addr}:{port}"
