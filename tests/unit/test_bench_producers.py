"""The throughput bench's producers (`--producers K`): every job produced exactly once, and the
producers' figures read as one producer's."""

from __future__ import annotations

import pytest

from bench.stack import combined, shares


@pytest.mark.parametrize(("n", "producers"), [(2000, 1), (2000, 2), (5, 3), (2, 4), (0, 2)])
def test_shares_cover_every_job_once(n, producers):
    split = shares(n, producers)
    assert len(split) == producers
    produced = [i for count, offset in split for i in range(offset, offset + count)]
    assert produced == list(range(n))
    counts = [count for count, _ in split]
    assert max(counts) - min(counts) <= 1


def test_a_producer_count_below_one_is_refused():
    with pytest.raises(ValueError, match="at least one producer"):
        shares(10, 0)


def test_reports_combine_over_the_span_of_all_producers():
    reports = [
        {"n": 1000, "seconds": 4.0, "rate": 250.0, "first_wall": 100.0, "cpu_seconds": 2.0},
        {"n": 1000, "seconds": 5.0, "rate": 200.0, "first_wall": 101.0, "cpu_seconds": 2.5},
    ]
    assert combined(reports) == {
        "n": 2000,
        "seconds": 6.0,  # from the first start (100) to the last end (106)
        "rate": pytest.approx(2000 / 6.0),
        "first_wall": 100.0,
        "cpu_seconds": 4.5,
    }


def test_one_report_combines_to_itself():
    report = {"n": 10, "seconds": 2.0, "rate": 5.0, "first_wall": 7.0, "cpu_seconds": 1.0}
    assert combined([report]) == report


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_the_command_refuses_a_producer_count_below_one_before_it_starts(value, capsys):
    import argparse

    from bench import throughput

    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--producers", value])
    assert "--producers" in capsys.readouterr().err
    assert parser.parse_args(["--producers", "2"]).producers == 2
