"""The gateway configuration: typed, frozen, validated. The only YAML reader.

Theory of operation: :func:`load_config` / :func:`parse_config` compose the
YAML text with ruamel.yaml (YAML 1.2, nodes only) and hand the node tree to
the strict schema walker in :mod:`qkdgate.gateway.config.schema`, which
builds the frozen dataclasses below from their type hints. The walker checks
each value on its own (types, ranges, unknown/duplicate keys, the YAML 1.1
traps); :meth:`Config.validate` then cross-checks values against each other
(references, unique names, address families, lifetimes, reqid ranges).
Both raise :class:`~qkdgate.errors.ConfigError` naming file, line, YAML path,
expected and found, so ``qkdgate check-config`` can print one useful line.

Secrets are never inline: PSKs, TLS keys and passwords are file *paths*,
read by whoever needs them, so a :class:`Config` can be printed, logged or
dumped as JSON (:meth:`Config.to_dict`) without leaking anything.

docs/config.md documents every key; systemd/qkdgate.yaml is a complete
commented example. Other modules should read these dataclasses, never YAML.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.schema import (
    Duration,
    FilePath,
    Length,
    Name,
    PathOrLiteral,
    Pattern,
    Range,
    Walk,
)
from qkdgate.interfaces import IPAddress, IPNetwork, MacsecCipher, Mark, Mode

# The tunnels layer owns the key policy (it enforces it per generation);
# the config names it and re-exports it for its readers.
from qkdgate.tunnels.policy import LEGS, POLICY_LEGS, KeyPolicy  # noqa: F401

Port = Annotated[int, Range(1, 65535)]
Seconds = Annotated[float, Duration, Range(0, gt=True)]
IfName = Annotated[str, Pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}",
                                "a Linux interface name (1-15 letters, digits, '_', '.', '-')")]
Hostname = Annotated[str, Pattern(r"[A-Za-z0-9:.\[\]_-]{1,253}", "a host name or IP address")]
SaeId = Annotated[str, Pattern(r"[^\s/?#]{1,128}", "an SAE ID (no spaces, '/', '?', '#')")]
MqttTopic = Annotated[str, Pattern(r"[^#+/\s][^#+\s]*(?<!/)",
                                   "an MQTT topic prefix without wildcards (+, #), "
                                   "spaces or leading/trailing '/'")]

SUPPORTED_VERSIONS = (1,)
IDENTITY_PREFIX = "qkdgate-id1:"     # qkdgate.gateway.protocol.identity.PUBLIC_PREFIX
# Each tunnel generation uses reqids base .. base+REQID_SPAN-1 (make-before-
# break needs the old and new generation side by side), so tunnels' ranges
# must not overlap.
REQID_SPAN = 16


# ---------------------------------------------------------------- enums

class KemSuite(enum.Enum):
    ML_KEM_768 = "ML-KEM-768"      # FIPS 203, NIST category 3
    ML_KEM_1024 = "ML-KEM-1024"    # FIPS 203, category 5 (CNSA 2.0)


class Profile(enum.Enum):
    DEFAULT = "default"   # ML-DSA-65 + Ed25519 identities
    CNSA2 = "cnsa2"       # ML-KEM-1024 and ML-DSA-87 only-strong parameter sets (CNSA 2.0)


class QkdRole(enum.Enum):
    """ETSI GS QKD 014 5.3 / 5.4: the master SAE requests new keys (enc_keys), the
    slave fetches the same keys by key_ID (dec_keys)."""
    MASTER = "master"
    SLAVE = "slave"


class TunnelType(enum.Enum):
    """The key consumer of a tunnel (docs/consumers.md): ``ipsec`` is the
    XFRM consumer (qkdgate's own ESP SAs), ``macsec`` its own MACsec SAs;
    ``wireguard`` and ``strongswan`` key a data plane someone else runs."""
    IPSEC = "ipsec"
    MACSEC = "macsec"
    WIREGUARD = "wireguard"
    STRONGSWAN = "strongswan"

    @property
    def consumer(self) -> str:
        """The consumer's name in docs/consumers.md (``ipsec`` is ``xfrm``)."""
        return "xfrm" if self is TunnelType.IPSEC else self.value


class IpsecCipher(enum.Enum):
    AES_256_GCM = "aes-256-gcm"                 # RFC 4106, 16-byte ICV
    CHACHA20_POLY1305 = "chacha20-poly1305"     # RFC 7634

    @property
    def aead(self) -> str:
        """The Linux XFRM AEAD algorithm name."""
        return {"aes-256-gcm": "rfc4106(gcm(aes))",
                "chacha20-poly1305": "rfc7539esp(chacha20,poly1305)"}[self.value]

    @property
    def key_bytes(self) -> int:
        """Key length including the 4-byte salt/nonce (RFC 4106 8.1, RFC 7634 2)."""
        return 36


class LogLevel(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


# Key source kinds. The source of truth is qkdgate.adapters.registry (built-in
# kinds plus "qkdgate.key_sources" entry points); this list is the fallback
# when the adapters are not installed.
BUILTIN_KEY_SOURCE_KINDS = ("etsi014", "etsi004", "idq-cerberis-xgr", "toshiba")
KIND_NEEDS_URL = ("etsi014", "etsi004", "idq-cerberis-xgr", "toshiba")
# ETSI GS QKD 014 5.1: the SAE-KME interface is HTTPS with mutual TLS, so
# these kinds (the ETSI 014 client with a vendor preset) need an https URL
# and a client certificate, key and CA. Value: the default vendor profile
# (qkdgate.adapters.profiles) that options may override.
KIND_NEEDS_MTLS = {"etsi014": "generic", "idq-cerberis-xgr": "idq-cerberis-xgr",
                   "toshiba": "toshiba"}
# Kinds whose KME link must be HTTPS with mutual TLS: the ETSI 014 ones, and
# ETSI 004, whose two bindings (docs/qkd.md) run over the same mutual TLS.
MTLS_KINDS = frozenset(KIND_NEEDS_MTLS) | {"etsi004"}


# ---------------------------------------------------------------- gateway

@dataclass(frozen=True, slots=True)
class Listen:
    """Where the peer protocol listens (UDP)."""
    # Immutable default; all interfaces is the documented default for the peer port.
    address: IPAddress = ipaddress.IPv4Address("0.0.0.0")  # noqa: RUF009, S104
    port: Port = 4600


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    name: Annotated[str, Name]
    identity: Annotated[str, FilePath]
    listen: Listen = field(default_factory=Listen)
    profile: Profile = Profile.DEFAULT
    suite: KemSuite | None = None       # None: ML-KEM-768, or ML-KEM-1024 under cnsa2
    state_dir: Annotated[str, FilePath] = "/var/lib/qkdgate"
    control_socket: Annotated[str, FilePath] = "/run/qkdgate/control.sock"

    _yaml_label = "gateway"

    @property
    def kem_suite(self) -> KemSuite:
        if self.suite is not None:
            return self.suite
        return KemSuite.ML_KEM_1024 if self.profile is Profile.CNSA2 else KemSuite.ML_KEM_768

    @property
    def identity_profile(self) -> str:
        """The hybrid signature profile of identities (qkdgate.gateway.protocol.identity):
        ML-DSA (FIPS 204) AND Ed25519, ML-DSA-87 under cnsa2."""
        return "mldsa87-ed25519" if self.profile is Profile.CNSA2 else "mldsa65-ed25519"


# ---------------------------------------------------------------- peers

@dataclass(frozen=True, slots=True)
class QkdSourceRef:
    """One key source of a peer's QKD input: which KME (``key_sources``
    entry) and which SAE pair on it. Several make a multi-source input."""
    key_source: Annotated[str, Name]
    local_sae_id: SaeId
    peer_sae_id: SaeId
    key_size: Annotated[int, Range(128, 8192)] = 256   # bits; ETSI GS QKD 014 6.2 size

    _yaml_label = "qkd source"


QkdRule = Annotated[str, Pattern(r"all|[0-9]{1,3} of [0-9]{1,3}",
                                 "all, or 'K of N' such as '2 of 3'")]


@dataclass(frozen=True, slots=True)
class PeerQkd:
    """How this gateway gets QKD keys it shares with one peer: one key source
    (``key_source``, ``local_sae_id``, ``peer_sae_id``, ``key_size``) or
    several (``sources`` with a ``rule``, docs/qkd.md "Several key
    sources"); never both. Read them through :attr:`source_list`."""
    role: QkdRole
    key_source: Annotated[str, Name] | None = None
    local_sae_id: SaeId | None = None
    peer_sae_id: SaeId | None = None
    key_size: Annotated[int, Range(128, 8192)] = 256   # bits; ETSI GS QKD 014 6.2 size
    sources: tuple[QkdSourceRef, ...] = ()
    rule: QkdRule = "all"

    _yaml_label = "peer qkd"

    @property
    def source_list(self) -> tuple[QkdSourceRef, ...]:
        """Every key source in configuration order (the order their keys
        are mixed in, docs/keymix.md 4.4); the single-source form as one."""
        if self.sources:
            return self.sources
        if self.key_source is None or self.local_sae_id is None or self.peer_sae_id is None:
            return ()      # refused by validate()
        return (QkdSourceRef(self.key_source, self.local_sae_id, self.peer_sae_id,
                             self.key_size),)

    @property
    def multi(self) -> bool:
        """Configured with ``sources`` (the sourced wire form, docs/protocol.md)."""
        return bool(self.sources)

    @property
    def required(self) -> int:
        """k of the rule: how many sources must deliver (``all``: every one)."""
        n = len(self.source_list)
        if self.rule == "all":
            return n
        return int(self.rule.partition(" of ")[0])


@dataclass(frozen=True, slots=True)
class PeerConfig:
    name: Annotated[str, Name]
    address: IPAddress
    # Each: a file holding the peer's public identity, or the identity string
    # itself ("qkdgate-id1:<profile>:<base64url>", printed by `qkdgate keygen`).
    identities: Annotated[tuple[Annotated[str, PathOrLiteral(IDENTITY_PREFIX)], ...], Length(1, 2)]
    port: Port = 4600
    psk_file: Annotated[str, FilePath] | None = None
    qkd: PeerQkd | None = None

    _yaml_label = "peer"


# ---------------------------------------------------------------- key sources

@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual TLS towards a KME or broker (ETSI GS QKD 014 5.1: HTTPS with
    client certificates). ``ca`` None means the system trust store."""
    cert: Annotated[str, FilePath] | None = None
    key: Annotated[str, FilePath] | None = None
    ca: Annotated[str, FilePath] | None = None

    _yaml_label = "tls"


@dataclass(frozen=True, slots=True)
class KeySourceConfig:
    name: Annotated[str, Name]
    kind: Annotated[str, Name]
    url: Annotated[str, Pattern(r"[a-z][a-z0-9+.-]*://[^\s/]+(/\S*)?",
                                "a URL such as https://kme-a.example:8443")] | None = None
    tls: TlsConfig | None = None
    kme_id: str | None = None
    timeout: Annotated[float, Duration, Range(0, 300, gt=True)] = 5.0
    retries: Annotated[int, Range(0, 10)] = 3
    options: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    # ETSI 004 only: the wire binding (docs/qkd.md "ETSI 004 bindings"); None: etsi-binary
    binding: Annotated[str, Pattern(r"etsi-binary|json", "etsi-binary or json")] | None = None

    _yaml_label = "key source"

    @property
    def worst_wait(self) -> float:
        """The longest a request to this source can take to fail: every
        attempt (the first and ``retries`` more) running to ``timeout``."""
        return self.timeout * (self.retries + 1)


# ---------------------------------------------------------------- tunnels

@dataclass(frozen=True, slots=True)
class MarkConfig:
    value: Annotated[int, Range(0, 0xFFFFFFFF)]
    mask: Annotated[int, Range(1, 0xFFFFFFFF)] = 0xFFFFFFFF

    def to_mark(self) -> Mark:
        return Mark(self.value, self.mask)


@dataclass(frozen=True, slots=True)
class IpsecConfig:
    local_address: IPAddress
    remote_address: IPAddress
    reqid: Annotated[int, Range(1, 0xFFFFFFFF - REQID_SPAN)]
    local_subnets: tuple[IPNetwork, ...] = ()    # empty: host-to-host (transport mode)
    remote_subnets: tuple[IPNetwork, ...] = ()
    mode: Mode = Mode.TUNNEL
    cipher: IpsecCipher = IpsecCipher.AES_256_GCM
    mark: MarkConfig | None = None
    if_id: Annotated[int, Range(1, 0xFFFFFFFF)] | None = None
    replay_window: Annotated[int, Range(0, 4096)] = 1024
    esn: bool = True
    udp_encap: bool = False                      # RFC 3948 ESP-in-UDP, port 4500

    _yaml_label = "ipsec settings"


MacAddress = Annotated[str, Pattern(r"[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}",
                                    "a MAC address such as 02:00:5e:10:00:02")]


@dataclass(frozen=True, slots=True)
class MacsecConfig:
    parent: IfName
    # The peer's SCI names our RX secure channel (IEEE 802.1AE-2018 8.2.1:
    # its MAC address and port): frames from any other SCI are dropped.
    peer_mac: MacAddress
    peer_port: Annotated[int, Range(1, 65535)] | None = None   # None: same as ``port``
    interface: IfName | None = None              # None: "qm-" + the tunnel name, truncated
    cipher: MacsecCipher = MacsecCipher.GCM_AES_XPN_256
    port: Annotated[int, Range(1, 65535)] = 1    # SCI port (IEEE 802.1AE-2018 8.2.1)
    encrypt: bool = True
    # IEEE 802.1AE-2018 10.6.2 replayWindow. Not 0 (strict order): frames
    # that multi-queue NICs or several CPUs reorder by a few would count as
    # late and be dropped (seen in the kernel lab); 32 still refuses replays.
    replay_window: Annotated[int, Range(0, 0xFFFFFFFF)] = 32

    _yaml_label = "macsec settings"


WireguardKey = Annotated[str, Pattern(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=",
                                      "a WireGuard public key: 32 bytes in base64 "
                                      "(44 characters, as `wg pubkey` prints it)")]


@dataclass(frozen=True, slots=True)
class WireguardConfig:
    """One WireGuard peer whose preshared key qkdgate sets (docs/consumers.md)."""

    interface: IfName                      # an existing WireGuard netdevice (wg-quick)
    peer_public_key: WireguardKey
    # Restored when a block ends; a block empties the peer's allowed IPs, so
    # qkdgate must know them without asking the kernel (after a SIGKILL the
    # failsafe has emptied them).
    allowed_ips: Annotated[tuple[IPNetwork, ...], Length(1, 256)]

    _yaml_label = "wireguard settings"


@dataclass(frozen=True, slots=True)
class StrongswanConfig:
    """One swanctl connection whose RFC 8784 PPK qkdgate loads over vici
    (docs/consumers.md, strongSwan section)."""

    connection: Annotated[str, Name]       # the swanctl.conf connection name
    vici_socket: Annotated[str, FilePath] = "/var/run/charon.vici"
    # where qkdgate reads the connection (vici load-conn resends it whole)
    swanctl_conf: Annotated[str, FilePath] = "/etc/swanctl/swanctl.conf"
    # the CHILD_SA the re-authentication initiates (default: the connection's first)
    child: Annotated[str, Name] | None = None

    _yaml_label = "strongswan settings"


@dataclass(frozen=True, slots=True)
class RekeyConfig:
    interval: Annotated[float, Duration, Range(1)] = 60.0
    soft_lifetime: Seconds = 90.0
    hard_lifetime: Seconds = 120.0
    grace: Seconds = 5.0                         # old SA kept after the switch
    max_bytes: Annotated[int, Range(0)] = 0      # 0 = off
    macsec_pn_threshold: Annotated[float, Range(0, 1, gt=True)] = 0.75

    _yaml_label = "rekey settings"


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    name: Annotated[str, Name]
    peer: Annotated[str, Name]
    type: TunnelType
    policy: KeyPolicy = KeyPolicy.HYBRID_REQUIRED
    ipsec: IpsecConfig | None = None
    macsec: MacsecConfig | None = None
    wireguard: WireguardConfig | None = None
    strongswan: StrongswanConfig | None = None
    rekey: RekeyConfig = field(default_factory=RekeyConfig)

    _yaml_label = "tunnel"

    @property
    def macsec_peer_sci(self) -> int | None:
        """The peer's 64-bit SCI: MAC address then port (IEEE 802.1AE-2018 8.2.1)."""
        if self.macsec is None:
            return None
        mac = int(self.macsec.peer_mac.replace("-", ":").replace(":", ""), 16)
        return mac << 16 | (self.macsec.peer_port or self.macsec.port)

    @property
    def macsec_interface(self) -> str | None:
        if self.macsec is None:
            return None
        return self.macsec.interface or ("qm-" + self.name)[:15]


# ---------------------------------------------------------------- telemetry

@dataclass(frozen=True, slots=True)
class MqttConfig:
    enabled: bool = False
    host: Hostname = "127.0.0.1"
    port: Port = 1883
    tls: TlsConfig | None = None
    username: str | None = None
    password_file: Annotated[str, FilePath] | None = None
    topic_prefix: MqttTopic = "qkdgate"
    client_id: str | None = None
    qos: Annotated[int, Range(0, 2)] = 1
    interval: Seconds = 10.0

    _yaml_label = "mqtt settings"


@dataclass(frozen=True, slots=True)
class PrometheusConfig:
    enabled: bool = False
    address: IPAddress = ipaddress.IPv4Address("127.0.0.1")  # noqa: RUF009  immutable value
    port: Port = 9464

    _yaml_label = "prometheus settings"


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.TEXT

    _yaml_label = "log settings"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    log: LogConfig = field(default_factory=LogConfig)

    _yaml_label = "telemetry"


# ---------------------------------------------------------------- high availability

@dataclass(frozen=True, slots=True)
class HaConfig:
    """An active/standby pair per site on keepalived (docs/operations.md,
    "High availability"). keepalived's VRRP elects; its notifications set
    this node's role (``notify_fifo``, or ``qkdgate ha-notify``). ``node``
    names this node's slot in the pair: its epochs are odd on node 1 and
    even on node 2, so the two nodes never share one (docs/protocol.md 10)."""
    node: Annotated[int, Range(1, 2)]
    notify_fifo: Annotated[str, FilePath] | None = None   # keepalived global_defs notify_fifo
    instance: Annotated[str, Pattern(r"[A-Za-z0-9_.-]{1,64}", "a VRRP instance name")] | None \
        = None                          # follow only this vrrp_instance on the FIFO

    _yaml_label = "ha settings"


# ---------------------------------------------------------------- key service

@dataclass(frozen=True, slots=True)
class KeyServicePoolConfig:
    """One key-service pool (docs/keyservice.md 5): the keys of one SAE pair
    across one peer pair. The peer names the same pool with the SAEs swapped."""
    name: Annotated[str, Name]
    peer: Annotated[str, Name]
    local_sae: SaeId
    remote_sae: SaeId
    key_size: Annotated[int, Range(64, 8192)] = 256     # bits; one size per pool
    keys: Annotated[int, Range(2, 1 << 20)] = 1024      # indices per generation
    lifetime: Seconds = 3600.0
    policy: KeyPolicy = KeyPolicy.HYBRID_REQUIRED

    _yaml_label = "key service pool"


class SkipTlsMode(enum.Enum):
    """draft-cisco-skip-02 3 Table 1 (keyservice/skip.py TLS_MODES)."""
    BOTH = "both"
    TLS13 = "tls13"
    TLS12 = "tls12"


@dataclass(frozen=True, slots=True)
class KeyServiceSkipConfig:
    """One SKIP listener: stunnel4 terminates TLS-PSK on address:port for
    one local system (an SAE of the pools)."""
    local_system: SaeId
    port: Port
    psk_file: Annotated[str, FilePath]
    address: IPAddress = ipaddress.IPv4Address("127.0.0.1")  # noqa: RUF009  immutable value
    tls_mode: SkipTlsMode = SkipTlsMode.BOTH

    _yaml_label = "SKIP listener"


@dataclass(frozen=True, slots=True)
class KeyServiceConfig:
    tls: TlsConfig
    pools: Annotated[tuple[KeyServicePoolConfig, ...], Length(1)]
    address: IPAddress = ipaddress.IPv4Address("127.0.0.1")  # noqa: RUF009  immutable value
    port: Port = 8443
    kme_id: str | None = None
    serve_margin: Seconds = 90.0
    dec_window: Seconds = 60.0
    clock_skew: Annotated[float, Duration, Range(0)] = 5.0
    skip: tuple[KeyServiceSkipConfig, ...] = ()
    stunnel: str = "stunnel4"           # the program, found on PATH

    _yaml_label = "key service"


# ---------------------------------------------------------------- root

@dataclass(frozen=True, slots=True)
class Config:
    version: int
    gateway: GatewayConfig
    peers: Annotated[tuple[PeerConfig, ...], Length(1)]
    key_sources: tuple[KeySourceConfig, ...] = ()
    tunnels: tuple[TunnelConfig, ...] = ()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    key_service: KeyServiceConfig | None = None
    ha: HaConfig | None = None
    # Where it came from: for error messages from validate(). Not config.
    _file: str = field(default="<config>", compare=False, repr=False)
    _lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    _yaml_label = "configuration"

    def peer(self, name: str) -> PeerConfig:
        for p in self.peers:
            if p.name == name:
                return p
        raise KeyError(name)

    def key_source(self, name: str) -> KeySourceConfig:
        for k in self.key_sources:
            if k.name == name:
                return k
        raise KeyError(name)

    def tunnel(self, name: str) -> TunnelConfig:
        for t in self.tunnels:
            if t.name == name:
                return t
        raise KeyError(name)

    def tunnels_for(self, peer: str) -> tuple[TunnelConfig, ...]:
        return tuple(t for t in self.tunnels if t.peer == peer)

    def validate(self) -> Config:
        """Cross-check values against each other; raises ConfigError."""
        from qkdgate.gateway.config.validate import validate
        validate(self)
        return self

    def error(self, path: str, message: str, *, expected: str | None = None,
              found: str | None = None) -> ConfigError:
        """A ConfigError at ``path``, with the line the value was read from."""
        line = self._lines.get(path)
        probe = path
        while line is None and probe:
            probe = probe.rpartition(".")[0] if "." in probe else probe.rpartition("[")[0]
            line = self._lines.get(probe)
        return ConfigError(message, file=self._file, line=line, path=path or None,
                           expected=expected, found=found)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the ``check-config --json`` output). Holds no
        secrets: the schema has only paths to secret files."""
        from qkdgate.gateway.config.validate import to_plain
        plain: dict[str, Any] = to_plain(self)
        return plain


# ---------------------------------------------------------------- loading

def parse_config(text: str, filename: str = "<config>", *, base_dir: str | None = None,
                 validate: bool = True) -> Config:
    """Parse YAML ``text`` into a validated :class:`Config`.

    Relative file paths in the config resolve against ``base_dir`` (default:
    the folder of ``filename``)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError
    from ruamel.yaml.reader import ReaderError

    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(filename))
    if "\t" in text:
        # YAML forbids tabs for indentation; the scanner's message is obscure
        for n, line in enumerate(text.splitlines(), 1):
            if line[:len(line) - len(line.lstrip(" \t"))].find("\t") >= 0 and line.strip():
                raise ConfigError("tab character in indentation", file=filename, line=n,
                                  expected="spaces", found="a tab")
    try:
        node = YAML(typ="safe", pure=True).compose(text)
    except RecursionError:
        raise ConfigError("YAML nested too deeply", file=filename,
                          expected="a configuration, not a nesting bomb") from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = str(exc.problem or exc.context or "invalid YAML")
        if exc.problem and exc.context and exc.problem.startswith("but "):
            what = f"{exc.context}, {exc.problem}"
        elif exc.problem and exc.context:
            what += f" ({exc.context}"
            if exc.context_mark is not None and exc.context_mark is not mark:
                what += f" started at line {exc.context_mark.line + 1}"
            what += ")"
        raise ConfigError(f"YAML syntax error: {what}", file=filename,
                          line=mark.line + 1 if mark else None) from None
    except ReaderError as exc:
        pos = exc.position if isinstance(exc.position, int) else 0
        char = exc.character
        code = ord(char) if isinstance(char, str) and len(char) == 1 else char
        raise ConfigError("character not allowed in YAML", file=filename,
                          line=text[:pos].count("\n") + 1, expected="printable text",
                          found=f"U+{code:04X}" if isinstance(code, int) else repr(code)) from None
    except YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"YAML error: {first}", file=filename) from None
    if node is None:
        raise ConfigError("empty configuration", file=filename, line=1,
                          expected="a mapping with version, gateway, peers, ...",
                          found="an empty document")
    walk = Walk(file=filename, base_dir=base_dir)
    if node.id != "mapping":
        from qkdgate.gateway.config.schema import describe
        raise walk.error(node, "", "the top level must be a mapping",
                         expected="a mapping with version, gateway, peers, ...",
                         found=describe(node))
    cfg = walk.dataclass(Config, node, "")
    cfg = _with_source(cfg, filename, walk.lines)
    return cfg.validate() if validate else cfg


def load_config(path: str | os.PathLike[str], *, validate: bool = True) -> Config:
    """Read and parse the configuration file at ``path``."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            raw = fh.read(4 * 1024 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", file=name) from None
    if len(raw) > 4 * 1024 * 1024:
        raise ConfigError("configuration file too large", file=name, expected="at most 4 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError("not UTF-8 text", file=name, line=line,
                          expected="UTF-8", found=f"byte {raw[exc.start]:#04x}") from None
    return parse_config(text, name, validate=validate)


def _with_source(cfg: Config, filename: str, lines: dict[str, int]) -> Config:
    object.__setattr__(cfg, "_file", filename)
    object.__setattr__(cfg, "_lines", dict(lines))
    return cfg
