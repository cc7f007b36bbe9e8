"""Backoff rules: full jitter never above the cap, Retry-After exact, per-request override."""

from __future__ import annotations

import random

from feather_grpc.config import RetryConfig
from feather_grpc.core.types import RetryOverride
from feather_grpc.engine.retry import RetryPolicy


def test_full_jitter_stays_within_the_exponential_ceiling_and_the_cap() -> None:
    policy = RetryPolicy.of(RetryConfig(), None)
    assert (policy.max_attempts, policy.base_ms, policy.max_ms) == (3, 250, 3000)
    rng = random.Random(1)
    for failed in range(1, 12):
        ceiling = min(3.0, 0.25 * 2 ** (failed - 1))
        delays = [policy.delay_s(failed, None, rng) for _ in range(2000)]
        assert max(delays) <= ceiling
        assert max(delays) > 0.9 * ceiling  # the whole range is used: it is full jitter, not a fixed wait


def test_retry_after_is_honoured_exactly_never_cut_by_jitter() -> None:
    policy = RetryPolicy.of(RetryConfig(), None)
    rng = random.Random(2)
    assert {policy.delay_s(n, 7.5, rng) for n in range(1, 5)} == {7.5}
    assert policy.delay_s(1, 0.0, rng) == 0.0


def test_per_request_override_replaces_only_what_it_sets() -> None:
    policy = RetryPolicy.of(RetryConfig(), RetryOverride(max_attempts=5, max_ms=100))
    assert (policy.max_attempts, policy.base_ms, policy.max_ms) == (5, 250, 100)
    assert max(policy.delay_s(3, None, random.Random(3)) for _ in range(500)) <= 0.1
