"""Gateway identities: hybrid ML-DSA + Ed25519 signing keys, pinned by peers.

Theory of operation: a gateway proves who it is in every exchange with TWO
signatures over the same message, one ML-DSA (FIPS 204) and one Ed25519
(RFC 8032). A verifier accepts only if both verify, so an attacker must
break both a lattice and an elliptic-curve scheme (the "AND" hybrid: a
forgery of either alone is useless). Profiles:

* ``mldsa65-ed25519`` (default, NIST category 3, pairs with ML-KEM-768);
* ``mldsa87-ed25519`` (CNSA 2.0 profile, category 5, pairs with ML-KEM-1024).

The private file (``qkdgate keygen``) is JSON holding the two 32-byte seeds
(FIPS 204 3.6.3 ML-DSA.KeyGen seed xi, RFC 8032 5.1.5 private key); it must
be mode 0600 and owned by the reading user, or loading refuses it. Reading
and writing the file is ``gateway/config/identity_files.py``'s job: this
module parses (``from_json``) and does no I/O. The
public identity is one string a peer pins in its configuration::

    qkdgate-id1:<profile>:<base64url(ed25519_pk || mldsa_pk), no padding>

Its :attr:`PeerIdentity.key_id` (first 8 bytes of SHA-256 over the profile
and both keys) is carried in signed messages so a verifier that pins two
identities (rollover) knows which one to check without trying both.

Signatures are domain separated: ML-DSA gets the FIPS 204 5.2 context string
``b"qkdgate/1 " + context`` and Ed25519 signs the same string followed by a
zero byte and the message, so a signature made for one purpose never
verifies for another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, SupportsIndex

from qkdgate.errors import AuthenticationFailed, ConfigError, CryptoUnavailable
from qkdgate.keymix.secret import SecretBytes

PUBLIC_PREFIX = "qkdgate-id1"
FILE_FORMAT = "qkdgate-identity"
FILE_VERSION = 1
ED25519_SIG = 64
ED25519_PK = 32


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    mldsa: str              # pyca class suffix
    mldsa_pk: int           # FIPS 204 Table 2 sizes
    mldsa_sig: int

    @property
    def signature_size(self) -> int:
        return ED25519_SIG + self.mldsa_sig


PROFILES: dict[str, Profile] = {
    "mldsa65-ed25519": Profile("mldsa65-ed25519", "65", 1952, 3309),
    "mldsa87-ed25519": Profile("mldsa87-ed25519", "87", 2592, 4627),
}
DEFAULT_PROFILE = "mldsa65-ed25519"
PROFILE_ALIASES = {"default": "mldsa65-ed25519", "cnsa2": "mldsa87-ed25519"}


def get_profile(name: str) -> Profile:
    name = PROFILE_ALIASES.get(name, name)
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError("unknown identity profile", expected=", ".join(
            list(PROFILES) + list(PROFILE_ALIASES)), found=repr(name)) from None


def _mldsa(profile: Profile) -> tuple[Any, Any]:
    try:
        from cryptography.hazmat.primitives.asymmetric import mldsa
    except ImportError as exc:  # cryptography < 47
        raise CryptoUnavailable(f"ML-DSA needs pyca/cryptography >= 47: {exc}") from None
    return (getattr(mldsa, f"MLDSA{profile.mldsa}PrivateKey"),
            getattr(mldsa, f"MLDSA{profile.mldsa}PublicKey"))


def _ed25519() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    return Ed25519PrivateKey, Ed25519PublicKey


def _ctx(context: bytes) -> bytes:
    ctx = b"qkdgate/1 " + context
    if len(ctx) > 255:  # FIPS 204 5.2: |ctx| <= 255
        raise ValueError("signature context too long")
    return ctx


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PeerIdentity:
    """A pinned public identity: verifies hybrid signatures."""

    __slots__ = ("_ed", "_ml", "ed25519_public", "key_id", "mldsa_public", "name", "profile")

    def __init__(self, profile: str, ed25519_public: bytes, mldsa_public: bytes,
                 name: str = "") -> None:
        self.profile = get_profile(profile)
        if len(ed25519_public) != ED25519_PK or len(mldsa_public) != self.profile.mldsa_pk:
            raise ConfigError("public identity has the wrong key sizes for its profile",
                              expected=f"{ED25519_PK}+{self.profile.mldsa_pk} bytes",
                              found=f"{len(ed25519_public)}+{len(mldsa_public)}")
        self.ed25519_public = bytes(ed25519_public)
        self.mldsa_public = bytes(mldsa_public)
        self.name = name
        self.key_id = hashlib.sha256(self.profile.name.encode() + b"\0" + self.ed25519_public
                                     + self.mldsa_public).digest()[:8]
        try:
            self._ed = _ed25519()[1].from_public_bytes(self.ed25519_public)
            self._ml = _mldsa(self.profile)[1].from_public_bytes(self.mldsa_public)
        except ValueError:
            raise ConfigError("public identity holds an invalid key") from None

    # --- text form -------------------------------------------------------
    def to_string(self) -> str:
        return f"{PUBLIC_PREFIX}:{self.profile.name}:" + _b64e(self.ed25519_public
                                                              + self.mldsa_public)

    @classmethod
    def from_string(cls, text: str, name: str = "") -> PeerIdentity:
        """Parse a pinned identity string; ConfigError says what is wrong."""
        if not isinstance(text, str):
            raise ConfigError("public identity must be a string", found=type(text).__name__)
        parts = text.strip().split(":")
        if len(parts) != 3 or parts[0] != PUBLIC_PREFIX:
            raise ConfigError("not a qkdgate public identity",
                              expected=f"{PUBLIC_PREFIX}:<profile>:<base64url>",
                              found=repr(text[:40]))
        profile = get_profile(parts[1])
        try:
            raw = _b64d(parts[2])
        except (binascii.Error, ValueError):
            raise ConfigError("public identity is not valid base64url") from None
        if len(raw) != ED25519_PK + profile.mldsa_pk:
            raise ConfigError("public identity has the wrong length",
                              expected=f"{ED25519_PK + profile.mldsa_pk} bytes",
                              found=f"{len(raw)} bytes")
        return cls(profile.name, raw[:ED25519_PK], raw[ED25519_PK:], name)

    def fingerprint(self) -> str:
        """Short human-comparable form, e.g. for ``keygen`` output and logs."""
        return "SHA256:" + _b64e(hashlib.sha256(self.to_string().encode()).digest())

    # --- verification ------------------------------------------------------
    def verify_ed25519(self, message: bytes, signature: bytes, context: bytes) -> None:
        """The cheap half alone (used as the INIT pre-check, never as the
        authentication of a peer)."""
        from cryptography.exceptions import InvalidSignature
        if len(signature) != ED25519_SIG:
            raise AuthenticationFailed("Ed25519 signature has the wrong length")
        try:
            self._ed.verify(bytes(signature), _ctx(context) + b"\0" + message)
        except InvalidSignature:
            raise AuthenticationFailed("Ed25519 signature does not verify") from None

    def verify(self, message: bytes, signature: bytes, context: bytes) -> None:
        """Raise AuthenticationFailed unless BOTH signatures verify."""
        from cryptography.exceptions import InvalidSignature
        if len(signature) != self.profile.signature_size:
            raise AuthenticationFailed(
                f"hybrid signature is {len(signature)} bytes, expected "
                f"{self.profile.signature_size} for {self.profile.name}")
        ed_ok = ml_ok = True
        try:
            self._ed.verify(bytes(signature[:ED25519_SIG]), _ctx(context) + b"\0" + message)
        except InvalidSignature:
            ed_ok = False
        try:  # always run both: timing does not reveal which half failed
            self._ml.verify(bytes(signature[ED25519_SIG:]), message, _ctx(context))
        except InvalidSignature:
            ml_ok = False
        if not (ed_ok and ml_ok):
            raise AuthenticationFailed("hybrid signature does not verify")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerIdentity) and self.key_id == other.key_id

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:
        return f"<PeerIdentity {self.name or '?'} {self.profile.name} {self.key_id.hex()}>"


class LocalIdentity:
    """Our own identity: signs with both keys. Seeds never print."""

    __slots__ = ("_ed", "_ed_seed", "_ml", "_ml_seed", "name", "profile", "public")

    def __init__(self, profile: str, ed25519_seed: SecretBytes, mldsa_seed: SecretBytes,
                 name: str = "") -> None:
        self.profile = get_profile(profile)
        if len(ed25519_seed) != 32 or len(mldsa_seed) != 32:
            raise ConfigError("identity seeds must be 32 bytes each")
        self.name = name
        self._ed_seed, self._ml_seed = ed25519_seed, mldsa_seed
        self._ed = _ed25519()[0].from_private_bytes(ed25519_seed.reveal())
        self._ml = _mldsa(self.profile)[0].from_seed_bytes(mldsa_seed.reveal())
        self.public = PeerIdentity(self.profile.name, self._ed.public_key().public_bytes_raw(),
                                   self._ml.public_key().public_bytes_raw(), name)

    @classmethod
    def generate(cls, profile: str = DEFAULT_PROFILE, name: str = "",
                 rng: Callable[[int], bytes] = os.urandom) -> LocalIdentity:
        return cls(profile, SecretBytes(rng(32)), SecretBytes(rng(32)), name)

    @property
    def key_id(self) -> bytes:
        return self.public.key_id

    def sign(self, message: bytes, context: bytes) -> bytes:
        """Ed25519 signature (64 bytes) followed by the ML-DSA signature."""
        ed: bytes = self._ed.sign(_ctx(context) + b"\0" + message)
        ml: bytes = self._ml.sign(message, _ctx(context))
        return ed + ml

    def sign_ed25519(self, message: bytes, context: bytes) -> bytes:
        sig: bytes = self._ed.sign(_ctx(context) + b"\0" + message)
        return sig

    # --- file form -------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "format": FILE_FORMAT, "version": FILE_VERSION, "profile": self.profile.name,
            "name": self.name, "ed25519_seed": _b64e(self._ed_seed.reveal()),
            "mldsa_seed": _b64e(self._ml_seed.reveal()), "public": self.public.to_string(),
        }, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, file: str | None = None) -> LocalIdentity:
        def bad(msg: str, **kw: Any) -> ConfigError:
            return ConfigError(msg, file=file, **kw)
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise bad(f"identity file is not JSON ({exc.__class__.__name__})") from None
        if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
            raise bad("not a qkdgate identity file", path="format", expected=FILE_FORMAT)
        if doc.get("version") != FILE_VERSION:
            raise bad("unsupported identity file version", path="version",
                      expected=str(FILE_VERSION), found=repr(doc.get("version")))
        unknown = set(doc) - {"format", "version", "profile", "name", "ed25519_seed",
                              "mldsa_seed", "public"}
        if unknown:
            raise bad("unknown fields in identity file", found=", ".join(sorted(unknown)))
        seeds = []
        for field in ("ed25519_seed", "mldsa_seed"):
            try:
                value = doc.get(field)
                if not isinstance(value, str):
                    raise ValueError(field)
                raw = _b64d(value)
            except (binascii.Error, ValueError):
                raise bad("seed is not base64url", path=field) from None
            if len(raw) != 32:
                raise bad("seed must be 32 bytes", path=field, found=f"{len(raw)} bytes")
            seeds.append(SecretBytes(raw))
        name = doc.get("name", "")
        if not isinstance(name, str):
            raise bad("name must be a string", path="name")
        ident = cls(str(doc.get("profile")), seeds[0], seeds[1], name)
        if "public" in doc and doc["public"] != ident.public.to_string():
            raise bad("public identity does not match the seeds (file corrupted?)",
                      path="public")
        return ident

    def __repr__(self) -> str:
        return f"<LocalIdentity {self.name or '?'} {self.profile.name} {self.key_id.hex()}>"

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("identities cannot be pickled")


def select_identity(pinned: Sequence[PeerIdentity], key_id: bytes) -> PeerIdentity:
    """The pinned identity a signed message names, or AuthenticationFailed."""
    for ident in pinned:
        if ident.key_id == key_id:
            return ident
    raise AuthenticationFailed(f"signer key id {bytes(key_id).hex()} is not pinned")


__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "LocalIdentity",
    "PeerIdentity",
    "Profile",
    "get_profile",
    "select_identity",
]
