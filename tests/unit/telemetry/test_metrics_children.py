"""Children bound once per label values: the same series ``labels()`` gives, bounded."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from proxy.telemetry import metrics as metrics_module
from proxy.telemetry.metrics import ProxyMetrics


def _value(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_kept_child_is_the_series_labels_would_give() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    bound = metrics.pins_created_for
    assert bound("prompt=v1") is bound("prompt=v1") is metrics.pins_created.labels("prompt=v1")
    bound("prompt=v1").inc()
    metrics.pins_created.labels("prompt=v1").inc()
    bound("prompt=v2").inc(3)
    assert _value(registry, "pinproxy_pins_created_total", {"version_key": "prompt=v1"}) == 2
    assert _value(registry, "pinproxy_pins_created_total", {"version_key": "prompt=v2"}) == 3
    metrics.eval_requests_for("v1", "prompt=v1", "eu").inc()
    assert _value(registry, "pinproxy_eval_requests_total",
                  {"prompt_version": "v1", "version_key": "prompt=v1", "region": "eu"}) == 1
    assert "bound=2" in repr(bound)


def test_the_kept_children_are_bounded_and_stay_right_past_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "MAX_CACHED_SERIES", 3)
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    for i in range(10):
        metrics.pin_tokens_for(f"r{i % 5}").inc()
    assert "bound=" in repr(metrics.pin_tokens_for)
    assert len(metrics.pin_tokens_for._children) <= 3
    for i in range(5):
        assert _value(registry, "pinproxy_pin_tokens_total", {"result": f"r{i}"}) == 2

