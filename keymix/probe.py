"""``qkdgate probe``: which crypto this machine can do, and why not.

Theory of operation: the daemon calls :func:`probe` at start-up and refuses
to run a configured suite that is unavailable (fail closed); operators run
``qkdgate probe`` to see the same report. Every check actually exercises the
primitive (a key pair and one encapsulation/decapsulation round trip), so a
backend that imports but does not work is reported as unavailable, with the
exception text as the reason. Nothing here touches the network: liboqs is
only imported once its shared library has been found on disk.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEFAULT_SUITE = ("ML-KEM-768", "X25519", "HKDF-SHA384")


def _try(fn: Any) -> dict[str, Any]:
    try:
        detail = fn()
    except Exception as exc:  # noqa: BLE001  any failure is "unavailable" with its reason
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {"available": True, **(detail or {})}


def _kem_check(name: str) -> dict[str, Any]:
    from qkdgate.keymix.kem import get_kem

    kem = get_kem(name)
    priv, pub = kem.generate_keypair()
    ct, ss = kem.encapsulate(pub)
    if kem.decapsulate(priv, ct) != ss:
        raise RuntimeError("encapsulation round trip gave different secrets")
    return {"backend": getattr(kem, "backend", "?"), "public_key": kem.public_key_size,
            "ciphertext": kem.ciphertext_size, "shared_secret": kem.shared_secret_size}


def _x25519_check() -> dict[str, Any]:
    from qkdgate.keymix.classical import x25519_keypair, x25519_shared

    a, pa = x25519_keypair()
    b, pb = x25519_keypair()
    if x25519_shared(a, pb) != x25519_shared(b, pa):
        raise RuntimeError("X25519 exchange gave different secrets")
    return {"backend": "pyca/cryptography"}


def _hkdf_check() -> dict[str, Any]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    # The combiner and schedule need HKDF over SHA-384; check the call works.
    HKDF(algorithm=hashes.SHA384(), length=48, salt=b"s", info=b"i").derive(b"k" * 32)
    return {"backend": "pyca/cryptography"}


def _liboqs() -> dict[str, Any]:
    from qkdgate.keymix.kem import LIBOQS_PREFIX, available_kems, liboqs_status

    ok, why = liboqs_status()
    if not ok:
        return {"available": False, "reason": why}
    names = [n.removeprefix(LIBOQS_PREFIX) for n in available_kems()
             if n.startswith(LIBOQS_PREFIX)]
    return {"available": True, "detail": why, "kems": names}


# The report is JSON (``qkdgate probe --json``).
Json = None | bool | int | float | str | list["Json"] | dict[str, "Json"]


def probe() -> dict[str, Json]:
    """A JSON-able report: ``{"openssl", "kems": {name: {...}}, "x25519",
    "hkdf_sha384", "liboqs", "default_suite_ok", "unavailable": [reasons]}``."""
    return _report()


def _report() -> dict[str, Any]:
    from cryptography import __version__ as pyca_version
    from cryptography.hazmat.backends.openssl.backend import backend

    report: dict[str, Any] = {
        "pyca_cryptography": pyca_version,
        "openssl": backend.openssl_version_text(),
        "kems": {name: _try(lambda n=name: _kem_check(n))
                 for name in ("ML-KEM-768", "ML-KEM-1024")},
        "x25519": _try(_x25519_check),
        "hkdf_sha384": _try(_hkdf_check),
        "liboqs": _liboqs(),
    }
    unavailable = [f"{n}: {r['reason']}" for n, r in report["kems"].items() if not r["available"]]
    for key in ("x25519", "hkdf_sha384", "liboqs"):
        if not report[key]["available"]:
            unavailable.append(f"{key}: {report[key]['reason']}")
    report["unavailable"] = unavailable
    report["default_suite_ok"] = (report["kems"]["ML-KEM-768"]["available"]
                                  and report["x25519"]["available"]
                                  and report["hkdf_sha384"]["available"])
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _line(name: str, r: dict[str, Any]) -> str:
    if r["available"]:
        extra = r.get("backend") or r.get("detail") or ""
        if "public_key" in r:
            extra += f"; pk {r['public_key']} B, ct {r['ciphertext']} B, ss {r['shared_secret']} B"
        return f"  {name:<14} available   {extra}"
    return f"  {name:<14} UNAVAILABLE {r['reason']}"


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the default suite (ML-KEM-768 + X25519 + HKDF-SHA384) works, else 1."""
    report = _report()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"pyca/cryptography {report['pyca_cryptography']}, {report['openssl']}")
        for name, r in report["kems"].items():
            print(_line(name, r))
        print(_line("X25519", report["x25519"]))
        print(_line("HKDF-SHA384", report["hkdf_sha384"]))
        lo = report["liboqs"]
        print(_line("liboqs", lo) + (f"; KEMs: {', '.join(lo['kems'])}" if lo.get("kems") else ""))
        print("default suite " + " + ".join(DEFAULT_SUITE) + ": "
              + ("OK" if report["default_suite_ok"] else "UNAVAILABLE"))
    return 0 if report["default_suite_ok"] else 1
