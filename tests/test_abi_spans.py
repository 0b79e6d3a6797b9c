"""Tests for bico.abi_spans: GLM's span sampler (placement, seeding, length distribution, arguments)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from bico.abi_spans import sample_spans, span_length_distribution


@pytest.mark.parametrize("mask_ratio", [0.15, 0.5])
def test_spans_are_sorted_disjoint_not_touching_and_cover_enough(mask_ratio):
    rng = random.Random(0)
    for length in range(1, 80):
        for _ in range(30):
            spans = sample_spans(length, rng, mask_ratio=mask_ratio)
            assert spans, length
            covered = sum(end - start for start, end in spans)
            assert covered >= min(length, math.ceil(mask_ratio * length)) or covered + len(spans) - 1 == length
            assert spans[0][0] >= 0 and spans[-1][1] <= length
            for start, end in spans:
                assert 1 <= end - start <= 39
            for (_, end), (next_start, _) in zip(spans, spans[1:]):
                assert next_start > end  # at least one unmasked token in between


def test_span_sampler_is_seeded():
    draws = [sample_spans(200, random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    assert sample_spans(200, random.Random(8)) != draws[0]
    assert sample_spans(0, random.Random(0)) == []


def test_sampler_statistics_over_many_draws():
    rng = random.Random(1)
    length, lengths, coverages = 1000, [], []
    for _ in range(1500):
        spans = sample_spans(length, rng)
        lengths += [end - start for start, end in spans]
        coverages.append(sum(end - start for start, end in spans) / length)
    # Poisson(3) restricted to 1..39: mean 3 / (1 - e^-3) = 3.157 (clipping 0 up to 1 would give 3.05).
    expected_mean = sum(k * p for k, p in enumerate(span_length_distribution(3.0, 39), start=1))
    assert expected_mean == pytest.approx(3 / (1 - math.exp(-3)), rel=1e-9)
    assert statistics.mean(lengths) == pytest.approx(expected_mean, abs=0.03)
    frequency_of_one = lengths.count(1) / len(lengths)
    assert frequency_of_one == pytest.approx(3 * math.exp(-3) / (1 - math.exp(-3)), abs=0.01)
    assert min(coverages) >= 0.15
    # Drawing stops at the first span that reaches 15%: the overshoot is a fraction of one span.
    assert 0.15 < statistics.mean(coverages) < 0.155
    assert max(lengths) <= 39


def test_long_spans_are_capped_at_max_span():
    rng = random.Random(2)
    lengths = [end - start for _ in range(200) for start, end in sample_spans(2000, rng, poisson_lambda=40.0)]
    assert max(lengths) == 39
    lengths = [end - start for _ in range(200) for start, end in sample_spans(2000, rng, max_span=5)]
    assert set(lengths) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(mask_ratio=0.0), "`mask_ratio`"), (dict(poisson_lambda=0), "`poisson_lambda`"), (dict(max_span=0), "`max_span`")],
)
def test_sampler_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_spans(10, random.Random(0), **kwargs)
    with pytest.raises(ValueError, match="`length`"):
        sample_spans(-1, random.Random(0))
