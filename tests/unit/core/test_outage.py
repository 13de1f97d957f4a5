"""One WARNING per outage, one INFO when it ends."""

from __future__ import annotations

import logging

import pytest

from proxy.core.outage import OutageLog


def test_a_run_of_failures_is_logged_once_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = OutageLog(logging.getLogger("t"), "TTL touches")
    with caplog.at_level(logging.INFO, logger="t"):
        log.succeeded()  # nothing to report while it works
        for n in range(5):
            log.failed(f"boom {n}")
        assert log.down
        log.succeeded()
        log.failed("again")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "TTL touches failing (logged once until it works again): boom 0"),
        ("INFO", "TTL touches works again after 5 failures"),
        ("WARNING", "TTL touches failing (logged once until it works again): again"),
    ]
