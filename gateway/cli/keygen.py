"""``qkdgate keygen``: create a gateway identity (ML-DSA + Ed25519).

Theory of operation: writes the private identity file with mode 0600 (created
that way, never widened later) and prints the public identity string that
peers pin in their configuration, plus its fingerprint for reading over the
phone. ``--pub FILE`` also writes the public string to a file; ``--json``
prints one JSON object instead of text. Rolling an identity over: generate a
new one, add its public string to every peer's pins next to the old one,
switch this gateway to the new file, then remove the old pin.
"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="FILE",
                   help="private identity file to create (mode 0600)")
    p.add_argument("--show", metavar="FILE",
                   help="print the public identity of an existing private file instead")
    p.add_argument("--profile", default="default",
                   help="default (ML-DSA-65 + Ed25519) or cnsa2 (ML-DSA-87 + Ed25519)")
    p.add_argument("--name", default="", help="gateway name recorded in the file")
    p.add_argument("--pub", metavar="FILE", help="also write the public identity here")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from qkdgate.errors import ConfigError
    from qkdgate.gateway.config.identity_files import load_local_identity, save_local_identity
    from qkdgate.gateway.protocol.identity import LocalIdentity, get_profile

    if args.show:
        ident = load_local_identity(args.show)
        profile = ident.profile
        path = args.show
    elif args.output:
        profile = get_profile(args.profile)
        ident = LocalIdentity.generate(profile.name, name=args.name)
        save_local_identity(ident, args.output, overwrite=args.force)
        path = args.output
    else:
        raise ConfigError("say where to write the identity (-o FILE), or --show FILE")
    public = ident.public.to_string()
    if args.pub:
        try:
            with open(args.pub, "w", encoding="ascii") as fh:
                fh.write(public + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write public identity: {exc.strerror}",
                              file=args.pub) from None
    info = {"private_file": os.path.abspath(path), "profile": profile.name,
            "name": ident.name, "key_id": ident.key_id.hex(),
            "fingerprint": ident.public.fingerprint(), "public": public}
    if args.pub:
        info["public_file"] = os.path.abspath(args.pub)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        if not args.show:
            print(f"# private identity written to {info['private_file']} (mode 0600)")
        print(f"# profile {profile.name}, key id {info['key_id']}")
        print(f"# fingerprint {info['fingerprint']}")
        print("# pin this on the peer (peers: ... identities: [ ... ]):")
        print(public)
    return 0
