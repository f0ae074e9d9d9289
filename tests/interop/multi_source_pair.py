"""The daemon pair of test_two_daemons keyed from several key sources
(issue 13 item 2): gw-a is master on every source, gw-b slave; source i
is the SAE pair ``saes[i]`` on the KME whose credentials ``creds[i](sae)``
gives. One source (``len(saes) == 1``) writes the single-source form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon_pair import write_pair
from test_two_daemons import Pair

from qkdgate.gateway.config.model import load_config
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend


class _As:
    """A simulator whose SAE-A / SAE-B credentials are another SAE pair's."""

    def __init__(self, creds: Any, a: str, b: str) -> None:
        self._creds, self._map = creds, {"SAE-A": a, "SAE-B": b}

    def credentials(self, sae: str) -> Any:
        return self._creds(self._map[sae])


def multi_source_pair(tmp_path: Path, creds: list[Any], saes: list[tuple[str, str]],
                      rule: str = "all", **kw: Any) -> Pair:
    a0, b0 = saes[0]
    write_pair(tmp_path, kme=_As(creds[0], a0, b0), **kw)
    for name, master in (("gw-a", True), ("gw-b", False)):
        path = tmp_path / f"{name}.yaml"
        text = path.read_text()
        role = "master" if master else "slave"
        old = (f"      key_source: kme\n      role: {role}\n"
               f"      local_sae_id: {'SAE-A' if master else 'SAE-B'}\n"
               f"      peer_sae_id: {'SAE-B' if master else 'SAE-A'}")
        assert old in text
        entries, extra = [], []
        for i, (sa, sb) in enumerate(saes):
            me, peer = (sa, sb) if master else (sb, sa)
            ks = "kme" if i == 0 else f"kme{i + 1}"
            entries.append(f"        - {{key_source: {ks}, local_sae_id: {me}, "
                           f"peer_sae_id: {peer}}}\n")
            if i:
                c = creds[i](me)
                extra.append(f"  - name: {ks}\n    kind: etsi014\n    url: {c.url}\n"
                             f"    kme_id: {c.kme_id}\n    timeout: 2s\n    retries: 1\n"
                             f"    tls: {{cert: {c.cert}, key: {c.key}, ca: {c.ca}}}\n")
        if len(saes) == 1:
            new = (f"      key_source: kme\n      role: {role}\n"
                   f"      local_sae_id: {a0 if master else b0}\n"
                   f"      peer_sae_id: {b0 if master else a0}")
        else:
            new = (f"      role: {role}\n      rule: {rule}\n      sources:\n"
                   + "".join(entries).rstrip("\n"))
        text = text.replace(old, new).replace("tunnels:\n", "".join(extra) + "tunnels:\n", 1)
        path.write_text(text)
    p = Pair.__new__(Pair)
    p.path_a, p.path_b = str(tmp_path / "gw-a.yaml"), str(tmp_path / "gw-b.yaml")
    p.cfg_a, p.cfg_b = load_config(p.path_a), load_config(p.path_b)
    p.be_a, p.be_b = RecordingIpsecBackend(), RecordingIpsecBackend()
    p.mb_a, p.mb_b = RecordingMacsecBackend(), RecordingMacsecBackend()
    p.events_a, p.events_b = [], []
    p.a, p.b = p.daemon("a"), p.daemon("b")
    return p
