"""Fixtures for the interop tests: the KME simulator on loopback with real
HTTPS and mutual TLS, a fake clock for the link model, and clients."""

from __future__ import annotations

import pytest

from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.kmesim.server import KmeSimulator


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory):
    # one PKI for the whole run: certificate generation is the slow part
    return tmp_path_factory.mktemp("kmesim")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def sim(state_dir, clock):
    async with KmeSimulator.start(state_dir, now=clock, prefill=1000, max_key_count=5000) as s:
        yield s


async def _no_sleep(_delay: float) -> None:
    return None


@pytest.fixture
def make_source(sim):
    made = []

    def make(sae_id: str, **options) -> Etsi014KeySource:
        settings = sim.credentials(sae_id).settings(**options)
        src = Etsi014KeySource(settings, sleep=_no_sleep)
        made.append(src)
        return src
    return make
    # closed by the async finaliser below


@pytest.fixture
async def master(make_source):
    src = make_source("SAE-A")
    yield src
    await src.close()


@pytest.fixture
async def slave(make_source):
    src = make_source("SAE-B")
    yield src
    await src.close()
