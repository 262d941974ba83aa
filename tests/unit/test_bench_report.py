"""The benchmark table's ratios: taken within each round, then the median over rounds."""

from __future__ import annotations

import pytest

from benchmarks.report import TableRow, build_rows, spread_line
from benchmarks.scenarios import Results, Sample

COLUMNS = ["sidelink", "haproxy", "nginx", "direct"]


def run(per_round: list[dict[str, float | None]], metric: str = "rps") -> Results:
    """Results of scenario h2_m100 over rounds; a target whose value is None gave an error
    that round (a sample without values), and one left out was not measured at all."""
    results = Results()
    for number, values in enumerate(per_round, 1):
        results.round = number
        for target, value in values.items():
            sample = Sample(errors={"h2load_failed": 1}) if value is None else Sample()
            if value is not None:
                sample.values[metric] = value
            results.add("h2_m100", target, sample)
    results.round = 0
    return results


def row(results: Results, metric: str) -> TableRow:
    rows = build_rows(results, COLUMNS, no_tcp=set(), failed=set(), bulk="1 GiB")
    [found] = [r for r in rows if r.spec.scenario == "h2_m100" and r.spec.metric == metric]
    return found


def test_the_ratio_is_the_median_of_the_ratios_within_rounds() -> None:
    # The host's speed drifts: in round 2 HAProxy ran on a fast minute, sidelink on a slow
    # one. Within rounds sidelink is 0.8x, 0.6x and 0.8x; the columns' medians (96 and
    # 150) would say 0.64x.
    results = run(
        [
            {"sidelink": 80.0, "haproxy": 100.0, "nginx": 160.0},
            {"sidelink": 96.0, "haproxy": 160.0, "nginx": 96.0},
            {"sidelink": 120.0, "haproxy": 150.0, "nginx": 120.0},
        ]
    )
    found = row(results, "rps")
    assert found.values["sidelink"] == 96.0
    assert found.values["haproxy"] == 150.0
    assert found.by_round["haproxy"] == pytest.approx([0.8, 0.6, 0.8])
    assert found.ratios["haproxy"] == pytest.approx(0.8)
    assert found.by_round["nginx"] == pytest.approx([0.5, 1.0, 1.0])
    assert found.ratios["nginx"] == pytest.approx(1.0)
    line = spread_line([found], "h2_m100", "rps")
    assert "sidelink ÷ haproxy by round 0.80x 0.60x 0.80x" in line
    assert "sidelink ÷ nginx by round 0.50x 1.00x 1.00x" in line


def test_a_round_either_side_failed_in_is_left_out() -> None:
    results = run(
        [
            {"sidelink": 90.0, "haproxy": 100.0},
            {"sidelink": None, "haproxy": 100.0},
            {"sidelink": 50.0, "haproxy": None},
            {"sidelink": 70.0, "haproxy": 100.0},
        ]
    )
    found = row(results, "rps")
    assert found.by_round["haproxy"] == pytest.approx([0.9, 0.7])
    assert found.ratios["haproxy"] == pytest.approx(0.8)


def test_a_figure_made_of_several_measures_is_divided_whole() -> None:
    # Added latency is the proxy's p50 less direct's: no round has a sample of it.
    results = Results()
    results.round = 1
    for target, p50 in (("sidelink", 300.0), ("haproxy", 200.0), ("direct", 100.0)):
        results.add("http_one_conn", target, Sample(values={"p50_us": p50}))
    rows = build_rows(results, COLUMNS, no_tcp=set(), failed=set(), bulk="1 GiB")
    [added] = [r for r in rows if r.spec.metric == "added_p50_us"]
    assert added.by_round["haproxy"] == []
    assert added.ratios["haproxy"] == pytest.approx(2.0)
