"""Hostile KME answers through the whole client: real HTTPS with mutual TLS
to the simulator, whose answer (status, body, content type) Hypothesis
chooses. The client raises only KeySourceError subclasses, never hangs."""

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.errors import KeySourceError

scalars = st.none() | st.booleans() | st.integers(-5, 2**33) | st.text(max_size=30)
json_values = st.recursive(scalars, lambda i: st.lists(i, max_size=3) |
                           st.dictionaries(st.sampled_from(
                               ["keys", "key_ID", "key", "message", "key_size", "details"]) |
                               st.text(max_size=8), i, max_size=4), max_leaves=12)
bodies = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
answers = st.tuples(st.sampled_from([200, 200, 200, 400, 401, 403, 404, 500, 503, 302]),
                    bodies, st.sampled_from(["application/json", "text/html", "text/plain"]))


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("kmesim-fuzz")


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(answer=answers, call=st.sampled_from(["enc", "dec", "status"]))
def test_any_answer_yields_only_key_source_errors(state, answer, call):
    async def scenario():
        async with KmeSimulator.start(state, prefill=5) as sim:
            src = Etsi014KeySource(sim.credentials("SAE-A").settings(retries=1))
            sim.faults["KME-A"].raw = answer
            try:
                if call == "enc":
                    keys = await src.get_new_keys("SAE-B", number=2)
                    assert len(keys) == 2 and all(len(k.key) == 32 for k in keys)
                elif call == "dec":
                    keys = await src.get_keys_by_id("SAE-B", ["bc490419-7d60-487f-adc1-4ddcc177c139"])
                    assert [k.key_id for k in keys] == ["bc490419-7d60-487f-adc1-4ddcc177c139"]
                else:
                    await src.status("SAE-B")
            except KeySourceError:
                pass
            finally:
                await src.close()
    asyncio.run(asyncio.wait_for(scenario(), 30))
