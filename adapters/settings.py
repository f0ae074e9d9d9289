"""Key-source settings as the adapters read them.

Theory of operation: the gateway's config loader (gateway/config/model.py) turns
a ``key_sources:`` YAML entry into its own dataclass; tests and third-party
code may pass a plain mapping. :func:`source_settings` accepts either (an
object with attributes or a mapping with the same names) and returns one
validated :class:`SourceSettings`, so adapters never depend on the config
module and every error names the entry (``key_sources[kme-a].tls.cert``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from qkdgate.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: str
    key: str
    ca: str


@dataclass(frozen=True, slots=True)
class SourceSettings:
    name: str
    kind: str
    url: str
    tls: TlsFiles | None
    kme_id: str | None = None
    timeout: float = 5.0
    retries: int = 3
    options: Mapping[str, object] = field(default_factory=dict)
    binding: str | None = None      # ETSI 004 wire binding (docs/qkd.md); None: the default

    def where(self, key: str) -> str:
        return f"key_sources[{self.name}].{key}"


def to_float(value: object) -> float:
    """``float(value)`` for what YAML or a caller may give (int, float, str);
    TypeError for anything else, ValueError for a string that is no number."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, not {type(value).__name__}")
    return float(value)


def to_int(value: object) -> int:
    """``int(value)`` for int, float or str; TypeError for anything else."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"expected an integer, not {type(value).__name__}")
    return int(value)


def _get(obj: object, name: str, default: object = None) -> object:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def source_settings(settings: object, kind: str | None = None) -> SourceSettings:
    """Normalise and validate a key-source entry (mapping or dataclass)."""
    if isinstance(settings, SourceSettings):
        return settings
    name = str(_get(settings, "name", "") or "unnamed")
    where = f"key_sources[{name}]"
    url = _get(settings, "url")
    if not isinstance(url, str) or not url:
        raise ConfigError("missing KME URL", path=f"{where}.url")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        # ETSI GS QKD 014 5.1: HTTPS only; a plain-HTTP KME would hand key
        # material to anyone on the path.
        raise ConfigError("KME URL must be https://host[:port]", path=f"{where}.url", found=url)
    tls_obj = _get(settings, "tls")
    tls = None
    if tls_obj is not None:
        files = {k: _get(tls_obj, k) for k in ("cert", "key", "ca")}
        for k, v in files.items():
            if not isinstance(v, (str, bytes)) and v is not None and not hasattr(v, "__fspath__"):
                raise ConfigError("expected a file path", path=f"{where}.tls.{k}", found=repr(v))
            if not v:
                why = ("a CA for the KME is required: the system trust store would accept "
                       "a certificate from any public CA" if k == "ca" else "missing file")
                raise ConfigError(why, path=f"{where}.tls.{k}")
        tls = TlsFiles(*(str(files[k]) for k in ("cert", "key", "ca")))
    timeout = _get(settings, "timeout", 5.0)
    retries = _get(settings, "retries", 3)
    try:
        timeout = to_float(timeout)
        retries = to_int(retries)
    except (TypeError, ValueError):
        raise ConfigError("timeout must be a number and retries an integer",
                          path=f"{where}.timeout") from None
    if not 0 < timeout <= 300:
        raise ConfigError("timeout out of range", path=f"{where}.timeout",
                          expected="0 < seconds <= 300", found=str(timeout))
    if not 0 <= retries <= 10:
        raise ConfigError("retries out of range", path=f"{where}.retries",
                          expected="0..10", found=str(retries))
    options = _get(settings, "options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError("options must be a mapping", path=f"{where}.options")
    kme_id = _get(settings, "kme_id")
    binding = _get(settings, "binding")
    if binding is not None and not isinstance(binding, str):
        raise ConfigError("binding must be a string", path=f"{where}.binding")
    return SourceSettings(name=name, kind=str(kind or _get(settings, "kind", "etsi014")),
                          url=url.rstrip("/"), tls=tls,
                          kme_id=str(kme_id) if kme_id else None,
                          timeout=timeout, retries=retries, options=dict(options),
                          binding=binding)
