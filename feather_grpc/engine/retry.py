"""Backoff between attempts: exponential with full jitter, capped; Retry-After wins exactly."""

from __future__ import annotations

import random
from dataclasses import dataclass

from feather_grpc.config import RetryConfig
from feather_grpc.core.types import RetryOverride


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    base_ms: int
    max_ms: int

    @classmethod
    def of(cls, configured: RetryConfig, override: RetryOverride | None) -> RetryPolicy:
        if override is None:
            return cls(configured.max_attempts, configured.base_ms, configured.max_ms)
        return cls(
            override.max_attempts if override.max_attempts is not None else configured.max_attempts,
            override.base_ms if override.base_ms is not None else configured.base_ms,
            override.max_ms if override.max_ms is not None else configured.max_ms,
        )

    def delay_s(self, failed_attempts: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Wait before the next attempt, after `failed_attempts` (>= 1) failures.

        Retry-After, when the upstream sent one, is honoured exactly: jitter never shortens it.
        Otherwise full jitter in [0, min(max, base * 2^(n-1))], which never exceeds the cap.
        """
        if retry_after_s is not None:
            return max(retry_after_s, 0.0)
        ceiling_ms = min(self.max_ms, self.base_ms * (2 ** (failed_attempts - 1)))
        return rng.uniform(0, ceiling_ms) / 1000.0
