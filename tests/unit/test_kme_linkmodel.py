"""The simulator's QKD link model: rates against the shared summary's
evaluated figures, bursts, the pool cap, and the eavesdropper alarm."""

import pytest

from qkdgate.adapters.kmesim.linkmodel import (
    ALARM_LINK_DOWN,
    ALARM_QBER,
    REALISTIC,
    LinkParams,
    QkdLink,
    secret_key_rate,
)


@pytest.mark.parametrize("km,expected_bps", [
    (10, 17e6), (50, 2.7e6), (100, 270e3), (150, 23e3),
])
def test_asymptotic_rates_match_the_summary(km, expected_bps):
    # /work/shared/specs/qkd-link-model.md "Evaluated": InGaAs, 1 GHz, eta_det 0.25,
    # eta_bob 0.5, e_d 1.5 %. Within 10 %: the summary rounds and does not give f.
    skr, qber = secret_key_rate(LinkParams(distance_km=km))
    assert skr == pytest.approx(expected_bps, rel=0.1)
    assert 0.01 < qber < 0.03


def test_no_key_at_200_km_and_qber_alarm():
    skr, qber = secret_key_rate(LinkParams(distance_km=200))
    assert skr == 0.0
    link = QkdLink("A", "B", LinkParams(distance_km=200))
    assert ALARM_QBER in link.alarms()   # too much loss: an alarm, not silence


def test_realistic_default_is_about_one_megabit_at_10_km():
    skr, _ = secret_key_rate(REALISTIC)
    assert 0.5e6 < skr < 2e6


def test_snspd_reaches_further_than_ingaas():
    # lower dark counts and higher efficiency: key where InGaAs has none
    assert secret_key_rate(LinkParams(detector="ingaas", distance_km=200))[0] == 0
    assert secret_key_rate(LinkParams(detector="snspd", distance_km=200))[0] > 1000


def test_key_arrives_in_blocks_and_is_capped():
    p = LinkParams(eta_fk=1.0, block_bits=1 << 20)
    link = QkdLink("A", "B", p, key_size=256, max_key_count=10000)
    skr, _ = link.rate()
    dt = (p.block_bits * 0.9) / skr
    assert link.advance(dt) == 0                 # less than a block: nothing yet
    assert link.advance(2 * dt) == p.block_bits  # then a whole block at once
    link.advance(1000.0)
    assert link.stored_bits == link.capacity_bits == 10000 * 256


def test_eavesdropper_stops_production_and_raises_alarm():
    link = QkdLink("A", "B", LinkParams(block_bits=1024), key_size=256)
    link.fill(10)
    link.eve_fraction = 0.5                       # +12.5 % QBER
    _, qber = link.rate()
    assert qber > link.params.qber_threshold
    assert link.alarms() == [ALARM_QBER]
    assert link.advance(100.0) == 0
    assert not link.take(256)                     # no delivery from a compromised link
    link.eve_fraction = 0.0
    assert link.take(256)


def test_small_eavesdropper_raises_qber_below_threshold():
    base = secret_key_rate(REALISTIC)[1]
    _, q = secret_key_rate(REALISTIC, eve_fraction=0.1)
    assert q == pytest.approx(base + 0.025, abs=1e-3)


def test_link_down_and_take_is_all_or_nothing():
    link = QkdLink("A", "B", key_size=256)
    link.fill(2)
    assert not link.take(3 * 256) and link.stored_keys() == 2
    link.up = False
    assert link.alarms() == [ALARM_LINK_DOWN] and not link.take(256)
