"""RetryBudget: retries add at most `percent` of a route's requests over the last 10 s,
or `min_per_second` over that window, whichever is more; a refusal is counted."""

from __future__ import annotations

import pytest

from proxy.config import RetryBudgetConfig
from proxy.metrics import RouteStats
from proxy.route import RetryBudget

WINDOW = RetryBudget.WINDOW


class Clock:
    """The route's clock (loop.time in the proxy): it moves on demand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_budget(percent: int = 20, min_per_second: int = 10) -> tuple[RetryBudget, Clock]:
    clock = Clock()
    config = RetryBudgetConfig(percent=percent, min_per_second=min_per_second)
    return RetryBudget(config, RouteStats("app1"), clock), clock


def answer(budget: RetryBudget, requests: int) -> None:
    """Requests answered (what the route's request_duration histogram counts)."""
    for _ in range(requests):
        budget.stats.request_duration.observe(0.01)


def allowed(budget: RetryBudget, attempts: int) -> int:
    return sum(budget.allow() for _ in range(attempts))


def test_defaults_are_the_specs() -> None:
    assert RetryBudgetConfig() == RetryBudgetConfig(percent=20, min_per_second=10)
    assert WINDOW == 10.0


# min_per_second: the floor


def test_without_requests_min_per_second_over_the_window_is_allowed() -> None:
    budget, _ = make_budget(percent=20, min_per_second=10)
    assert allowed(budget, 100) == 100  # 10 a second over 10 s, all at once if need be
    assert not budget.allow()
    assert budget.stats.retry_budget_exhausted == 1


def test_the_floor_comes_back_once_the_retries_leave_the_window() -> None:
    budget, clock = make_budget(percent=20, min_per_second=10)
    assert allowed(budget, 100) == 100
    clock.now = 5.0
    assert not budget.allow()
    clock.now = WINDOW  # exactly 10 s later the retries still count
    assert not budget.allow()
    clock.now = WINDOW + 0.001
    assert allowed(budget, 101) == 100
    assert budget.stats.retry_budget_exhausted == 3


def test_retries_leave_the_window_one_by_one() -> None:
    budget, clock = make_budget(percent=0, min_per_second=1)
    for second in range(10):
        clock.now = float(second)
        assert budget.allow()
    assert not budget.allow()  # 10 in the window: full
    clock.now = 10.5  # the one made at 0 has left, the one at 1 has not
    assert budget.allow()
    assert not budget.allow()
    clock.now = 11.5
    assert budget.allow()
    assert not budget.allow()


def test_no_percent_and_no_floor_allows_no_retry() -> None:
    budget, clock = make_budget(percent=0, min_per_second=0)
    budget.sample(clock.now)
    answer(budget, 1000)
    assert allowed(budget, 5) == 0
    assert budget.stats.retry_budget_exhausted == 5


# percent: a share of the requests


def test_percent_of_the_requests_in_the_window() -> None:
    budget, clock = make_budget(percent=20, min_per_second=0)
    budget.sample(clock.now)
    answer(budget, 1000)
    assert allowed(budget, 250) == 200
    assert budget.stats.retry_budget_exhausted == 50


def test_a_retry_is_counted_as_made_when_it_is_allowed() -> None:
    budget, clock = make_budget(percent=10, min_per_second=0)
    budget.sample(clock.now)
    answer(budget, 100)
    assert allowed(budget, 10) == 10
    assert len(budget.retries) == 10
    assert not budget.allow()
    assert len(budget.retries) == 10  # a refusal is not a retry
    answer(budget, 10)  # more requests, more room: 10% of 110 is 11
    assert budget.allow()
    assert not budget.allow()


@pytest.mark.parametrize(
    ("percent", "min_per_second", "requests", "room"),
    [
        (20, 10, 100, 100),  # 20 of the requests < 100 of the floor
        (20, 10, 1000, 200),  # the share is above the floor
        (50, 10, 1000, 500),
        (100, 0, 30, 30),
        (200, 0, 30, 60),  # percent may exceed 100: more retries than requests
        (20, 0, 5, 1),
    ],
)
def test_the_larger_of_the_share_and_the_floor(
    percent: int, min_per_second: int, requests: int, room: int
) -> None:
    budget, clock = make_budget(percent=percent, min_per_second=min_per_second)
    budget.sample(clock.now)
    answer(budget, requests)
    assert allowed(budget, room + 10) == room
    assert budget.stats.retry_budget_exhausted == 10


def test_a_share_below_one_retry_allows_none() -> None:
    budget, clock = make_budget(percent=20, min_per_second=0)
    budget.sample(clock.now)
    answer(budget, 4)
    assert allowed(budget, 5) == 0


def test_before_the_first_sample_every_answer_so_far_counts() -> None:
    budget, _ = make_budget(percent=20, min_per_second=0)
    answer(budget, 50)
    assert allowed(budget, 20) == 10


# The window slides: the route samples once a second


def test_sample_keeps_one_point_a_second() -> None:
    budget, _ = make_budget()
    budget.sample(0.0)
    for tick in range(1, 10):  # the route ticks every 0.1 s
        budget.sample(tick / 10)
    assert len(budget.samples) == 1
    budget.sample(1.0)
    assert len(budget.samples) == 2
    for second in range(2, 40):
        budget.sample(float(second))
    # Kept: the points no older than the window, so at most WINDOW + 1 of them.
    assert [t for t, _ in budget.samples] == [float(s) for s in range(29, 40)]


def test_only_the_requests_of_the_last_window_count() -> None:
    budget, clock = make_budget(percent=20, min_per_second=0)
    budget.sample(0.0)
    for second in range(1, 21):  # 100 requests a second for 20 s
        clock.now = float(second)
        answer(budget, 100)
        budget.sample(clock.now)
    # 2,000 answered in all, but the window holds the last 1,000: 200 retries, not 400.
    assert allowed(budget, 400) == 200
    assert budget.stats.retry_budget_exhausted == 200


def test_requests_older_than_the_window_give_no_room() -> None:
    budget, clock = make_budget(percent=20, min_per_second=0)
    budget.sample(0.0)
    answer(budget, 1000)
    for second in range(1, 11):
        budget.sample(float(second))
    clock.now = 10.9  # the route's ticker samples again at 11.0
    assert allowed(budget, 10) == 0


def test_once_the_traffic_stops_its_share_leaves_the_window() -> None:
    budget, clock = make_budget(percent=20, min_per_second=1)
    budget.sample(0.0)
    answer(budget, 1000)
    clock.now = 0.5
    assert allowed(budget, 300) == 200
    for second in range(1, 12):  # no request for 11 s
        clock.now = float(second)
        budget.sample(clock.now)
    # The 200 retries have left the window too; what is left is the floor: 1 a second.
    assert allowed(budget, 20) == 10


def test_a_sick_service_sees_at_most_the_share_over_a_long_run() -> None:
    """Every request fails and asks for a retry: retries stay near percent of requests."""
    budget, clock = make_budget(percent=20, min_per_second=1)
    budget.sample(0.0)
    made = 0
    for tenth in range(1, 601):  # 60 s, 10 requests every 0.1 s
        clock.now = tenth / 10
        answer(budget, 10)
        made += allowed(budget, 10)
        budget.sample(clock.now)
    requests = 6000
    assert made <= requests * 0.2 + 1 * 60  # the bound: share plus floor x seconds
    assert made >= requests * 0.15  # and the budget is not starved either
    assert budget.stats.retry_budget_exhausted == requests - made


def test_repr() -> None:
    budget, _ = make_budget(percent=20)
    assert repr(budget) == "<RetryBudget retries=0 percent=20>"
    budget.allow()
    assert repr(budget) == "<RetryBudget retries=1 percent=20>"
