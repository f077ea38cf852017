"""Rates from cumulative counters: deltas over NVML's own timestamps, wraps and resets."""

from __future__ import annotations

import pytest

from collector.counters import CounterRates

S = 1_000_000_000


def test_first_read_has_no_rate_then_delta_over_source_time() -> None:
    rates = CounterRates()
    assert rates.update("k", 1000, 10 * S) is None
    assert rates.update("k", 3000, 12 * S) == pytest.approx(1000.0)  # 2000 over 2 s, not over agent time


def test_wrap_of_a_32_bit_counter_gives_the_true_delta() -> None:
    rates = CounterRates()
    top = (1 << 32) - 100
    rates.update("k", top, 0, width_bits=32)
    assert rates.update("k", 400, S, width_bits=32) == pytest.approx(500.0)
    assert rates.wraps == 1


def test_reset_yields_missing_and_rebaselines() -> None:
    rates = CounterRates()
    rates.update("k", 5_000_000, 0)
    assert rates.update("k", 10, S) is None  # driver reload: not a 64-bit wrap
    assert rates.resets == 1
    assert rates.update("k", 110, 2 * S) == pytest.approx(100.0)


def test_unrefreshed_timestamp_keeps_the_older_baseline() -> None:
    rates = CounterRates()
    rates.update("k", 0, 0)
    assert rates.update("k", 0, 0) is None  # same NVML timestamp: no new information
    assert rates.update("k", 300, 3 * S) == pytest.approx(100.0)


def test_forget_drops_a_gpus_counters() -> None:
    rates = CounterRates()
    rates.update((3, 197, 0), 10, 0)
    rates.update((4, 197, 0), 10, 0)
    rates.forget(3)
    assert rates.update((3, 197, 0), 20, S) is None
    assert rates.update((4, 197, 0), 20, S) == pytest.approx(10.0)
