"""Demo PKI for the KME simulator: one CA, a certificate per KME and SAE.

Theory of operation: on first run :func:`ensure_pki` creates, in the state
directory (never in the source tree), a demo CA and ECDSA P-256
certificates: KMEs get serverAuth certificates naming their KME ID (CN and
SAN) and the loopback names they listen on; SAEs get clientAuth
certificates whose CN is the SAE ID (how the simulator learns who calls,
ETSI GS QKD 014 5.1). A second, untrusted "rogue" CA signs certificates for
the wrong-certificate fault and tests. Later runs reuse what exists, so a
curl command printed once keeps working. Private keys are written 0600.
These are demo credentials: docs/qkd.md says what to use in production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DNS_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Credential:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Pki:
    dir: Path
    ca: Path
    rogue_ca: Path

    def kme(self, kme_id: str) -> Credential:
        return Credential(self.dir / f"kme-{kme_id}.pem", self.dir / f"kme-{kme_id}.key")

    def sae(self, sae_id: str) -> Credential:
        return Credential(self.dir / f"sae-{sae_id}.pem", self.dir / f"sae-{sae_id}.key")

    def rogue(self, name: str) -> Credential:
        """A certificate for ``name`` signed by the untrusted rogue CA."""
        return Credential(self.dir / f"rogue-{name}.pem", self.dir / f"rogue-{name}.key")


def _safe(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
        raise ValueError(f"ID {name!r} is not usable as a file name (letters, digits, _.:-)")
    return name


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load(cred: Credential) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cred.cert.read_bytes())
    key = serialization.load_pem_private_key(cred.key.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{cred.key}: not an EC private key")
    return cert, key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qkdgate demo"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_ca(cred: Credential, cn: str, now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(cn)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(cred.key, key)
    cred.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_leaf(cred: Credential, cn: str, issuer: Credential, *, server: bool,
               now: dt.datetime, client: bool = False) -> None:
    ca_cert, ca_key = _load(issuer)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    if _DNS_LABEL.match(cn):
        sans.append(x509.DNSName(cn))
    if server:
        sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.IPAddress(ipaddress.ip_address("::1"))]
    eku = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client or not server:
        eku.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=825))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                            False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(cred.key, key)
    cred.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_pki(state_dir: str | Path, kme_ids: list[str], sae_ids: list[str],
               rogue: tuple[str, ...] = (), *, kme_client: bool = False) -> Pki:
    """Create (or reuse) the CA and the certificates for these IDs under
    ``state_dir/pki``; ``rogue`` names get certificates from the rogue CA.
    ``kme_client``: KME certificates serve as TLS clients too (KME to KME)."""
    d = Path(state_dir) / "pki"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki = Pki(d, d / "ca.pem", d / "rogue-ca.pem")
    now = dt.datetime.now(dt.UTC)
    ca = Credential(pki.ca, d / "ca.key")
    rogue_ca = Credential(pki.rogue_ca, d / "rogue-ca.key")
    for cred, cn in ((ca, "qkdgate demo CA"), (rogue_ca, "untrusted rogue CA")):
        if not (cred.cert.exists() and cred.key.exists()):
            _make_ca(cred, cn, now)
    for kme_id in kme_ids:
        c = pki.kme(_safe(kme_id))
        if not (c.cert.exists() and c.key.exists()):
            _make_leaf(c, kme_id, ca, server=True, client=kme_client, now=now)
    for sae_id in sae_ids:
        c = pki.sae(_safe(sae_id))
        if not (c.cert.exists() and c.key.exists()):
            _make_leaf(c, sae_id, ca, server=False, now=now)
    for name in rogue:
        c = pki.rogue(_safe(name))
        if not (c.cert.exists() and c.key.exists()):
            # usable both ways: as a fake KME and as an impostor SAE
            _make_leaf(c, name, rogue_ca, server=True, client=True, now=now)
    return pki
