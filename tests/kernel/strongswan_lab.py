"""Real strongSwan (Debian's charon 5.9.8) in the lab's gateway namespaces.

One charon per namespace, each with its own strongswan.conf (the
``STRONGSWAN_CONF`` environment variable libstrongswan reads), its own vici
socket (``charon.plugins.vici.socket``) and a private tmpfs on /run
(``unshare -m``): charon's pid file is compiled in as /var/run/charon.pid, so
two daemons on one root would refuse each other. Nothing is started through
systemd and no unit is enabled (lab/setup.sh masks Debian's units).

The IKE_SA authenticates with a PSK (loaded over vici as type IKE; a lab
secret, not a key qkdgate makes) and ``ppk_required``: every IKE_SA mixes
in a PPK (RFC 8784) or is refused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kernel_lab import GA, GB, LAN_A, LAN_B

from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.consumer import ConsumerKey
from qkdgate.tunnels.events import KeyInputs
from qkdgate.tunnels.strongswan import StrongswanConsumer, StrongswanSpec
from qkdgate.tunnels.strongswan_conf import read_connection
from qkdgate.tunnels.strongswan_vici import ViciClient

CHARON = "/usr/lib/ipsec/charon"

STRONGSWAN_CONF = """\
# written by tests/kernel/strongswan_lab.py for one lab gateway
charon {{
    load_modular = yes
    install_routes = no
    install_virtual_ip = no
    # make-before-break is what qkdgate's consumer does by hand (initiate,
    # then terminate the old IKE_SA); charon's own reauth is never used
    make_before_break = yes
    # vici initiate must create a new IKE_SA (authenticated with the new
    # PPK), not add a CHILD_SA to the running one (docs/consumers.md)
    reuse_ikesa = no
    # the lab VM is slow (TCG, shared cores): a first IKE exchange can take
    # seconds, so retransmit patiently (about 25 s in all)
    retransmit_timeout = 2.0
    retransmit_tries = 4
    plugins {{
        include /etc/strongswan.d/charon/*.conf
        vici {{
            socket = unix://{vici}
        }}
    }}
    filelog {{
        lab {{
            path = {log}
            time_format = %T
            # line by line: the gap test reads the log while charon runs
            flush_line = yes
            default = 1
            ike = 2
            cfg = 2
        }}
    }}
    syslog {{
        daemon {{
            default = -1
        }}
    }}
}}
include /etc/strongswan.d/*.conf
"""

LAB_PSK = b"qkdgate-lab-ike-psk-not-a-secret-0123456789"

# The swanctl.conf docs/consumers.md shows, verbatim with the lab's
# addresses (tests/unit/test_strongswan_docs.py keeps the two equal): one
# connection whose CHILD_SA traps (fail closed), PSK authentication as the
# classical leg, no rekey or reauth timers of charon's own (qkdgate
# re-authenticates), ppk_required. The lab adds a probe connection.
DOCUMENTED = """\
connections {
    qkd-ab {
        version = 2
        local_addrs = @LOCAL@
        remote_addrs = @REMOTE@
        proposals = aes256gcm16-prfsha384-x25519
        rekey_time = 0
        reauth_time = 0
        unique = never
        ppk_required = yes
        local {
            auth = psk
            id = @LOCAL@
        }
        remote {
            auth = psk
            id = @REMOTE@
        }
        children {
            lan {
                local_ts = @LOCAL_TS@
                remote_ts = @REMOTE_TS@
                esp_proposals = aes256gcm16
                rekey_time = 0
                start_action = trap
                close_action = none
                dpd_action = none
            }
        }
    }
}
"""

# the lab's probe: a second connection between the same gateways (own
# identities, so the responder selects it) that takes the same PPK ids
PROBE = """\
connections {
    probe {
        version = 2
        local_addrs = @LOCAL@
        remote_addrs = @REMOTE@
        proposals = aes256gcm16-prfsha384-x25519
        unique = never
        ppk_required = yes
        local {
            auth = psk
            id = probe-@LOCAL@
        }
        remote {
            auth = psk
            id = probe-@REMOTE@
        }
        children {
            probe {
                local_ts = @PROBE_LOCAL_TS@
                remote_ts = @PROBE_REMOTE_TS@
                esp_proposals = aes256gcm16
                start_action = trap
            }
        }
    }
}

secrets {
    ike-lab {
        id-a = @LOCAL@
        id-b = @REMOTE@
        id-c = probe-@LOCAL@
        id-d = probe-@REMOTE@
        secret = "qkdgate-lab-ike-psk-not-a-secret-0123456789"
    }
}
"""
SWANCTL_CONF = DOCUMENTED + PROBE


def write_swanctl(path: Path, local: str, remote: str, local_ts: str, remote_ts: str,
                  probe_local: str, probe_remote: str) -> Path:
    text = SWANCTL_CONF
    for k, v in (("@LOCAL_TS@", local_ts), ("@REMOTE_TS@", remote_ts),
                 ("@PROBE_LOCAL_TS@", probe_local), ("@PROBE_REMOTE_TS@", probe_remote),
                 ("@LOCAL@", local), ("@REMOTE@", remote)):
        text = text.replace(k, v)
    path.write_text(text)
    return path


def swanctl_load_all(conf: Path, vici: str) -> None:
    """What an operator runs: ``swanctl --load-all`` (connections and the IKE PSK)."""
    r = subprocess.run(["swanctl", "--load-all", "--noprompt", "--file", str(conf),
                        "--uri", f"unix://{vici}"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"swanctl --load-all failed: {r.stdout} {r.stderr}")


def conn_body(local: str, remote: str, local_ts: str, remote_ts: str,
              child: str = "lan") -> dict[str, Any]:
    """The connection docs/consumers.md shows as swanctl.conf (same keys)."""
    return {
        "version": "2",
        "local_addrs": local,
        "remote_addrs": remote,
        "proposals": "aes256gcm16-prfsha384-x25519",
        "rekey_time": "0",
        "reauth_time": "0",
        "dpd_delay": "0",
        # the consumer keeps two IKE_SAs of this connection during a rotation
        "unique": "never",
        "local": {"auth": "psk", "id": local},
        "remote": {"auth": "psk", "id": remote},
        "children": {child: {
            "local_ts": local_ts, "remote_ts": remote_ts, "mode": "tunnel",
            "esp_proposals": "aes256gcm16", "rekey_time": "0",
            "start_action": "none", "dpd_action": "none", "close_action": "none"}},
    }


class Charon:
    """One charon in ``netns``; ``vici`` is its socket path."""

    def __init__(self, netns: str, workdir: Path, name: str) -> None:
        self.netns, self.name = netns, name
        workdir.mkdir(parents=True, exist_ok=True)
        self.vici = str(workdir / f"{name}.vici")
        self.log = workdir / f"{name}.log"
        self.conf = workdir / f"{name}-strongswan.conf"
        self.conf.write_text(STRONGSWAN_CONF.format(vici=self.vici, log=self.log))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Charon:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.vici)
        env = {**os.environ, "STRONGSWAN_CONF": str(self.conf)}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "-m", "sh", "-c",
             f"mount -t tmpfs tmpfs /run && exec {CHARON}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.vici):
            if self.proc.poll() is not None:
                raise RuntimeError(f"charon {self.name} exited {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"charon {self.name}: no vici socket after {timeout}s")
            time.sleep(0.05)
        return self

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def keep_log(self, tag: str) -> None:
        """Copy the log where the host sees it (lab/run.sh's LAB_OUT)."""
        out = os.environ.get("LAB_OUT")
        if out and self.log.exists():
            with contextlib.suppress(OSError):
                Path(out, f"{tag}-{self.name}.log").write_bytes(self.log.read_bytes())

    def stop(self) -> None:
        if self.proc is None:
            return
        # sh exec'd charon: the Popen pid is charon's after ip netns exec /
        # unshare exec'd too (they all exec)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


# ---------------------------------------------------------- the two gateways

CONN, CHILD, TID = "qkd-ab", "lan", "sw-ab"
PROBE_A, PROBE_B = "10.1.9.0/24", "10.2.9.0/24"


class Side:
    """One gateway: its charon, swanctl.conf, consumer and a vici client."""

    def __init__(self, charon: Charon, conf, consumer: StrongswanConsumer) -> None:
        self.charon, self.conf, self.c = charon, conf, consumer
        self.v = ViciClient(charon.vici)


@pytest.fixture
def gateways(topo, tmp_path, request):
    a = Charon(topo.gA, tmp_path, "gA")
    b = Charon(topo.gB, tmp_path, "gB")
    sides = []
    try:
        for ch, me, peer, lt, rt, pl, pr in ((a, GA, GB, LAN_A, LAN_B, PROBE_A, PROBE_B),
                                             (b, GB, GA, LAN_B, LAN_A, PROBE_B, PROBE_A)):
            ch.start()
            conf = write_swanctl(tmp_path / f"{ch.name}-swanctl.conf", str(me), str(peer),
                                 str(lt), str(rt), pl, pr)
            swanctl_load_all(conf, ch.vici)
            spec = StrongswanSpec(TID, CONN, CHILD, read_connection(str(conf), CONN),
                                  vici_socket=ch.vici, timeout_ms=40000)
            # the consumer's block policies go into charon's namespace
            sides.append(Side(ch, conf, StrongswanConsumer(spec, netns=ch.netns)))
        yield sides
    finally:
        for s in sides:
            s.v.close()
        for c in (a, b):
            c.stop()
            c.keep_log(request.node.name)
        # charon's trap policies leave larval (SPI 0) states after a block: the
        # session's clean-up lists SAs by id, so flush what charon left here
        for ns in (topo.gA, topo.gB):
            for what in ("state", "policy"):
                subprocess.run(["ip", "-n", ns, "xfrm", what, "flush"], check=False)
        print("--- gA charon log (tail)\n" + a.log_tail(15))


def key(g: int, role: str, secret: bytes) -> ConsumerKey:
    return ConsumerKey(TID, "strongswan", g, SecretBytes(secret), KeyInputs("ML-KEM-768", True),
                       role, time.monotonic())
