"""Every SA a batch installs is read back and checked (SPI, AEAD, key and
ICV length, reqid) in one multi-get; an SA the kernel holds differently is
that op's error and is removed again, the others stand."""

import errno
import ipaddress

from test_netlink_layout import Recorder

from qkdgate.errors import TunnelError
from qkdgate.interfaces import InstallSa, SaId, SaSpec
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels import xfrm_msg as m
from qkdgate.tunnels.xfrm import XfrmBackend

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
SPI = 0xC0000123          # what Recorder's GETSA answer holds: reqid 7, GCM, 288/128 bits


def backend():
    rec = Recorder()
    return XfrmBackend(channel=rec, registry=None, verify=True), rec   # type: ignore[arg-type]


def install(reqid=7, icv=128, key=36):
    return InstallSa(SaId(A, B, SPI), SaSpec(key=SecretBytes(bytes(key)), reqid=reqid,
                                             icv_bits=icv), inbound=False)


def test_an_sa_read_back_as_installed_passes():
    be, rec = backend()
    assert be.apply([install()]) == [None]
    assert [t for t, _p, _d in rec.sent] == [m.XFRM_MSG_NEWSA, m.XFRM_MSG_GETSA]


def test_each_difference_is_named_and_the_sa_removed():
    for kwargs, named in ((dict(reqid=8), "reqid 7"), (dict(icv=96), "ICV 128 bits"),
                          (dict(key=20), "key length 288 bits")):
        be, rec = backend()
        (err,) = be.apply([install(**kwargs)])
        assert isinstance(err, TunnelError) and err.errno == errno.EIO, kwargs
        assert f"SA {SPI:#x} read back with" in str(err) and named in str(err), str(err)
        assert rec.sent[-1][0] == m.XFRM_MSG_DELSA          # not left keyed
