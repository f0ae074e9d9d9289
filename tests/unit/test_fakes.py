"""The recording fakes enforce the rules the real KME and kernel enforce,
so protocol tests that pass against them mean something."""

import errno
import ipaddress

import pytest

from qkdgate.errors import KeyNotFound, KeySourceAuthError, KeyUnavailable, TunnelError
from qkdgate.interfaces import MacsecLinkSpec, MacsecSaSpec, SaId, SaSpec
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.fakes import FakeQkdLink, RecordingIpsecBackend, RecordingMacsecBackend

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")


async def test_master_and_slave_get_identical_keys_once():
    link = FakeQkdLink("sae-a", "sae-b")
    master, slave = link.source("sae-a"), link.source("sae-b")
    keys = await master.get_new_keys("sae-b", number=2)
    got = await slave.get_keys_by_id("sae-a", [k.key_id for k in keys])
    assert [k.key for k in got] == [k.key for k in keys]
    with pytest.raises(KeyNotFound):  # ETSI 014: removed once delivered
        await slave.get_keys_by_id("sae-a", [keys[0].key_id])


async def test_only_named_slave_and_link_up():
    link = FakeQkdLink("sae-a", "sae-b")
    with pytest.raises(KeySourceAuthError):
        await link.source("sae-b").get_new_keys("sae-a")
    link.down = True
    with pytest.raises(KeyUnavailable):
        await link.source("sae-a").get_new_keys("sae-b")


def test_ipsec_fake_rejects_duplicates_and_wrong_key_length():
    be = RecordingIpsecBackend()
    sa = SaId(A, B, 0x1000)
    be.install_inbound(sa, SaSpec(key=SecretBytes(bytes(36)), reqid=1))
    with pytest.raises(TunnelError) as e:
        be.install_inbound(sa, SaSpec(key=SecretBytes(bytes(36)), reqid=1))
    assert e.value.errno == errno.EEXIST and "EEXIST" in str(e.value)
    with pytest.raises(TunnelError):
        be.install_outbound(SaId(A, B, 0x1001), SaSpec(key=SecretBytes(bytes(32)), reqid=1))
    be.remove_sa(sa)
    with pytest.raises(TunnelError) as e:
        be.remove_sa(sa)
    assert e.value.errno == errno.ESRCH


def test_macsec_fake_refuses_to_delete_active_sa():
    be = RecordingMacsecBackend()
    be.create_link(MacsecLinkSpec("ms0", "eth0"))
    be.add_tx_sa("ms0", MacsecSaSpec(an=0, key=SecretBytes(bytes(32)), keyid=bytes(16)))
    with pytest.raises(TunnelError) as e:
        be.remove_tx_sa("ms0", 0)
    assert e.value.errno == errno.EBUSY
    be.set_tx_sa_active("ms0", 0, False)
    be.remove_tx_sa("ms0", 0)


def test_parameter_objects_validate():
    with pytest.raises(ValueError):
        SaId(A, B, 0x10)  # RFC 4303: SPIs 1-255 are reserved
    with pytest.raises(ValueError):
        SaId(A, ipaddress.ip_address("2001:db8::1"), 0x1000)
    with pytest.raises(ValueError):
        MacsecSaSpec(an=4, key=SecretBytes(bytes(32)), keyid=bytes(16))
