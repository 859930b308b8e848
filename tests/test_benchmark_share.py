"""The benchmark's share of the GEMM ceiling: each round's row over the ceiling measured in
that round, the median of those ratios, and the ceiling chosen as the probe defines it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from machine_probe import ceiling_of, median_of_ratios  # noqa: E402

BIG, STEP = (1024, 1024, 1024), (64, 512, 1024)


def test_median_of_ratios_pairs_each_round_with_its_own_ceiling():
    # the host slows down 2x in round 2: the row and its ceiling move together, the ratio doesn't
    median, ratios = median_of_ratios([90.0, 45.0, 95.0], [100.0, 50.0, 125.0])
    assert ratios == pytest.approx([0.9, 0.9, 0.76])
    assert median == pytest.approx(0.9)
    # four rounds: the median of 0.8, 0.88, 1.0, 0.9 (a ratio of medians would say 84 / 100)
    median, ratios = median_of_ratios([80.0, 88.0, 50.0, 99.0], [100.0, 100.0, 50.0, 110.0])
    assert median == pytest.approx((0.88 + 0.9) / 2)


def test_median_of_ratios_rejects_unpaired_rounds():
    with pytest.raises(ValueError):
        median_of_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        median_of_ratios([], [])


def test_ceiling_is_the_best_rate_on_at_most_the_rows_cores():
    rates = {1: {STEP: 90e9, BIG: 95e9}, 2: {STEP: 150e9, BIG: 190e9}}
    assert ceiling_of(rates, 1) == (95e9, "1024×1024×1024 on 1 core")
    assert ceiling_of(rates, 2) == (190e9, "1024×1024×1024 on 2 cores")
    # two threads slower than one (a busy host): the ceiling with two cores keeps the one-core rate
    slow = {1: {STEP: 90e9}, 2: {STEP: 60e9}}
    assert ceiling_of(slow, 2) == (90e9, "64×512×1024 on 1 core")
    with pytest.raises(ValueError):
        ceiling_of({2: {STEP: 1e9}}, 1)
