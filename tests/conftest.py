"""Suite-wide fixtures.

``no_logged_exceptions`` (autouse): a test fails if, while it ran, anything
logged an exception with its traceback (an ERROR record with ``exc_info``:
``log.exception``, the asyncio loop's "Task exception was never retrieved"
and callback errors), because the daemon logs a traceback exactly where a bug
was caught and failed closed (issue 9 item 2). A test that provokes such a
bug on purpose says so with ``@pytest.mark.expect_logged_exception``.
"""

from __future__ import annotations

import gc
import logging

import pytest


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record not in self.records:
            self.records.append(record)


@pytest.fixture(autouse=True)
def no_logged_exceptions(request: pytest.FixtureRequest):
    collector = _Collector()
    # The qkdgate tree does not propagate once configure_logging ran, so
    # listen on it as well as on the root (asyncio logs there).
    loggers = [logging.getLogger(), logging.getLogger("qkdgate")]
    for lg in loggers:
        lg.addHandler(collector)
    try:
        yield collector
        gc.collect()     # a task that died unawaited is reported when it is collected
    finally:
        for lg in loggers:
            lg.removeHandler(collector)
    if collector.records and request.node.get_closest_marker("expect_logged_exception") is None:
        lines = [f"{r.name}: {r.getMessage()} ({r.exc_info[0].__name__ if r.exc_info and r.exc_info[0] else '?'})"
                 for r in collector.records]
        pytest.fail("exception(s) logged during the test (mark it expect_logged_exception "
                    "if that is the point):\n  " + "\n  ".join(lines), pytrace=False)
