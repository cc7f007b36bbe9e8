"""Money is integer nano-dollars: conversion from configured decimals and per-call cost are exact."""

from __future__ import annotations

from decimal import Decimal

import pytest

from feather_grpc.core.pricing import Price, usd_to_nanos_per_million
from feather_grpc.core.types import Usage


def test_conversion_is_exact_for_per_1k_and_per_1m() -> None:
    assert usd_to_nanos_per_million(Decimal("0.03"), 1_000) == 30_000_000_000
    assert usd_to_nanos_per_million(Decimal("0.075"), 1_000_000) == 75_000_000
    assert usd_to_nanos_per_million(Decimal("0.0000375"), 1_000) == 37_500_000  # 37.5 nano-USD per token
    with pytest.raises(ValueError):
        usd_to_nanos_per_million(Decimal("1e-20"), 1_000)
    with pytest.raises(ValueError):
        usd_to_nanos_per_million(Decimal("-1"), 1_000)


def test_cost_is_tokens_times_price_with_cache_rates() -> None:
    price = Price(input=3_000_000_000, output=15_000_000_000, cached_input=300_000_000, cache_write=3_750_000_000)
    usage = Usage(input_tokens=1_000, output_tokens=500, cached_input_tokens=200, cache_write_tokens=100)
    # uncached 700 x 3 + cached 200 x 0.3 + written 100 x 3.75 + output 500 x 15 nano-USD
    assert price.cost_nanos(usage) == 700 * 3_000 + 200 * 300 + 100 * 3_750 + 500 * 15_000


def test_fractional_nanos_round_half_up_once_per_call() -> None:
    price = Price(input=37_500_000, output=0, cached_input=37_500_000, cache_write=37_500_000)
    assert price.cost_nanos(Usage(input_tokens=1)) == 38  # 37.5 -> 38
    assert price.cost_nanos(Usage(input_tokens=3)) == 113  # 112.5 -> 113, not 3 x 38
