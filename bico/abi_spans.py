"""GLM's blank-span sampler: Poisson span lengths, placed with no two spans overlapping or touching.

GLM (Du et al., ACL 2022, section 2.1) draws span lengths from Poisson(3) restricted to 1..39 until at
least 15% of the tokens are covered, then places the spans at random. `bico.abi` builds its training
examples from these spans. (BICO's own word-span schedule, which lets spans touch, is in `bico.masking`.)
"""

from __future__ import annotations

import math
import random


DEFAULT_MASK_RATIO = 0.15
DEFAULT_POISSON_LAMBDA = 3.0
DEFAULT_MAX_SPAN = 39


def span_length_distribution(
    poisson_lambda: float = DEFAULT_POISSON_LAMBDA, max_span: int = DEFAULT_MAX_SPAN
) -> list[float]:
    """P(span length = k) for k = 1..`max_span`: the Poisson pmf restricted to that range and renormalised.

    This is GLM's own sampler (it renormalises the pmf over 1..39 rather than clipping 0 up to 1):
    for lambda = 3 the mean length is 3 / (1 - e^-3) = 3.157.
    """
    log_pmf = [k * math.log(poisson_lambda) - poisson_lambda - math.lgamma(k + 1) for k in range(1, max_span + 1)]
    top = max(log_pmf)
    weights = [math.exp(value - top) for value in log_pmf]
    total = sum(weights)
    return [weight / total for weight in weights]


def check_sampler_args(mask_ratio: float, poisson_lambda: float, max_span: int) -> None:
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"`mask_ratio` must be in (0, 1], got {mask_ratio}.")
    if not poisson_lambda > 0.0:
        raise ValueError(f"`poisson_lambda` must be > 0, got {poisson_lambda}.")
    if not (isinstance(max_span, int) and max_span >= 1):
        raise ValueError(f"`max_span` must be an integer >= 1, got {max_span!r}.")


def sample_spans(
    length: int,
    rng: random.Random,
    mask_ratio: float = DEFAULT_MASK_RATIO,
    poisson_lambda: float = DEFAULT_POISSON_LAMBDA,
    max_span: int = DEFAULT_MAX_SPAN,
) -> list[tuple[int, int]]:
    """Draw blank spans over `length` tokens, GLM style.

    Lengths come from `span_length_distribution` until they cover at least
    `ceil(mask_ratio * length)` tokens (at least one). A length that no longer fits (spans plus one
    free token between neighbours) is cut to the room left, so short texts may be covered more
    than `mask_ratio` but never fail. The spans are then placed uniformly among all arrangements in
    which no two overlap or touch.

    Args:
        length (`int`): Number of maskable tokens, >= 0 (0 gives no span).
        rng (`random.Random`): The only source of randomness; the same state gives the same spans.
        mask_ratio (`float`, *optional*, defaults to 0.15): Fraction of tokens to cover, in (0, 1].
        poisson_lambda (`float`, *optional*, defaults to 3.0): Poisson mean before restriction.
        max_span (`int`, *optional*, defaults to 39): Longest span.

    Returns:
        `list[tuple[int, int]]`: Half-open `(start, end)` spans, sorted, `end < next start`.
    """
    check_sampler_args(mask_ratio, poisson_lambda, max_span)
    if length < 0:
        raise ValueError(f"`length` must be >= 0, got {length}.")
    if length == 0:
        return []
    choices = range(1, max_span + 1)
    weights = span_length_distribution(poisson_lambda, max_span)
    target = max(1, math.ceil(mask_ratio * length))
    lengths: list[int] = []
    covered = 0
    while covered < target:
        room = length - covered - len(lengths)  # one free token must separate the new span from the others
        if room < 1:
            break
        span = min(rng.choices(choices, weights=weights)[0], room)
        lengths.append(span)
        covered += span
    rng.shuffle(lengths)  # a span cut to fit is not always the last one
    # Stars and bars: the k spans (each with the separator after it) and `free` loose tokens are
    # k + free units; choosing which units are spans fixes the arrangement.
    k = len(lengths)
    free = length - covered - (k - 1)
    slots = sorted(rng.sample(range(free + k), k))
    spans, offset = [], 0
    for slot, span in zip(slots, lengths):
        start = slot + offset  # slot counts spans and loose tokens before; add the earlier spans' lengths
        spans.append((start, start + span))
        offset += span
    return spans
