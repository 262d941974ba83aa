"""The per-request metric work: the histogram's bucket, the request counts by method and
status, and the :status read off an HTTP/2 response head (each done per request, and
written for speed rather than with bisect, tuple keys and int())."""

from __future__ import annotations

from bisect import bisect_left

from hypothesis import given
from hypothesis import strategies as st
from ngh2 import NeverIndexedHeader

from proxy.http.h2 import _status
from proxy.metrics import LATENCY_BUCKETS, Histogram, RouteStats


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_each_value_lands_in_the_bucket_bisect_finds(values: list[float]) -> None:
    histogram = Histogram()
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    for value in values:
        histogram.observe(value)
        expected[bisect_left(LATENCY_BUCKETS, value)] += 1
    assert histogram.counts == expected
    assert histogram.observations() == len(values)


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    histogram = Histogram()
    histogram.observe(LATENCY_BUCKETS[0])
    histogram.observe(LATENCY_BUCKETS[-1] * 2)  # above every bound: +Inf
    assert histogram.counts[0] == 1
    assert histogram.counts[-1] == 1


def test_requests_are_counted_by_method_and_status() -> None:
    stats = RouteStats("r")
    for method, code in [(b"GET", 200), (b"GET", 200), (b"POST", 200), (b"GET", 503)]:
        stats.count_request(method, code)
    assert stats.requests == {(b"GET", 200): 2, (b"POST", 200): 1, (b"GET", 503): 1}


def test_status_is_read_from_its_three_digits() -> None:
    assert _status([(b":status", b"200"), (b"server", b"x")]) == 200
    assert _status([(b":status", b"599")]) == 599
    assert _status([(b"x-a", b"1"), (b":status", b"404")]) == 404
    assert _status([NeverIndexedHeader(b":status", b"302")]) == 302
    assert _status([(b"x-a", b"1")]) == 0
