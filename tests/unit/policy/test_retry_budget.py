"""The retry budget (proxy/policy/retry_budget.py): a share of active requests, with a floor."""

from proxy.policy.retry_budget import RetryBudget


def test_the_retry_budget_is_a_share_of_active_requests_with_a_floor() -> None:
    budget = RetryBudget(20.0, 3)
    budget.active = 100
    budget.retrying = 19
    assert budget.has_room()
    budget.retrying = 20
    assert not budget.has_room()
    budget.active, budget.retrying = 2, 2
    assert budget.has_room()  # the floor: min_retry_concurrency
    budget.retrying = 3
    assert not budget.has_room()


def test_a_reload_changes_the_limits_and_keeps_the_counts() -> None:
    budget = RetryBudget(20.0, 3)
    budget.active, budget.retrying = 100, 19
    budget.reconfigure(10.0, 3)
    assert (budget.active, budget.retrying) == (100, 19)
    assert not budget.has_room()
