"""ETSI GS QKD 004 QoS decoding: a KME may send a partial qos object; the
missing fields take the defaults (a slots dataclass once made that fail)."""

import pytest

from qkdgate.adapters.etsi004 import QoS
from qkdgate.errors import KeySourceProtocolError


def test_partial_qos_takes_defaults():
    q = QoS.from_json({"key_chunk_size": 64})
    assert q.key_chunk_size == 64
    assert q.to_json() == {**QoS().to_json(), "key_chunk_size": 64}


@pytest.mark.parametrize("bad", [{"timeout": -1}, {"ttl": True}, {"jitter": "1"},
                                 {"metadata_mimetype": 7}, []])
def test_bad_qos_fields_are_the_kmes_fault(bad):
    with pytest.raises(KeySourceProtocolError):
        QoS.from_json(bad)
