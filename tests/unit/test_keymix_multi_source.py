"""The combiner with several QKD key sources (docs/keymix.md 4.5): each key's
source and length are bound, the order is the configuration order, and the
single-source FixedInfo is unchanged."""

import pytest

from qkdgate.errors import LocalProtocolError
from qkdgate.keymix.combiner import HybridInputs, combine, fixed_info
from qkdgate.keymix.secret import SecretBytes

IDS = ("2d9c0b4e-5a37-4b5e-9a3e-3f1e4c2b7a10", "7f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2910")
TH = bytes(range(48))
Q = bytes(range(96))       # a 32-byte and a 64-byte key, concatenated


def inputs(sources, qkd=Q, ids=IDS):
    return HybridInputs("ML-KEM-768", SecretBytes(b"k" * 32), SecretBytes(b"x" * 32),
                        SecretBytes(qkd), ids, TH, sources)


def secret(sources, **kw):
    return combine(inputs(sources, **kw)).secret.reveal()


def test_each_keys_length_is_bound_not_only_their_sum():
    assert secret(((0, 32), (1, 64))) != secret(((0, 64), (1, 32)))


def test_which_sources_contributed_is_bound():
    assert secret(((0, 32), (1, 64))) != secret(((0, 32), (2, 64)))
    assert secret(((0, 32), (1, 64))) != secret(((1, 32), (2, 64)))


def test_sourced_and_single_source_differ_for_the_same_bytes():
    single = HybridInputs("ML-KEM-768", SecretBytes(b"k" * 32), SecretBytes(b"x" * 32),
                          SecretBytes(Q), IDS, TH)
    assert combine(single).secret.reveal() != secret(((0, 32), (1, 64)))
    # byte for byte: presence 0x07 -> 0x0f, then u8 index || u16 length per key before lp16(TH)
    fs, fi = fixed_info(single), fixed_info(inputs(((0, 32), (1, 64))))
    at = 2 + len(combine(single).root_label) + 2 + len("session secret")
    assert fs[at] == 0x07
    tail = 2 + len(TH)
    assert fi == fs[:at] + b"\x0f" + fs[at + 1:-tail] + bytes.fromhex("000020" "010040") \
        + fs[-tail:]


def test_provenance_names_each_keys_source():
    s = combine(inputs(((0, 32), (2, 64))))
    assert s.provenance.qkd_sources == (0, 2) and s.provenance.qkd_key_ids == IDS
    assert "#0:" + IDS[0] in str(s.provenance) and "#2:" + IDS[1] in str(s.provenance)


@pytest.mark.parametrize("sources", [
    ((1, 32), (0, 64)),          # order is configuration order
    ((0, 32), (0, 64)),          # one key per source
    ((0, 48), (1, 64)),          # lengths must add up to the QKD key
    ((0, 8), (1, 88)),           # every key at least 16 bytes
    ((0, 32),),                  # one (index, length) per key_ID
    ((0, 32), (16, 64)),         # index within 0..15
])
def test_inconsistent_sources_are_refused(sources):
    with pytest.raises(LocalProtocolError):
        combine(inputs(sources))
