"""Exact call pricing: integer nano-dollars, never floats.

Prices are held as integer nano-USD per million tokens, converted once from the configured decimal
text, so a configured price is exact down to 1e-15 USD per token. A call's cost is the exact sum of
tokens x price, rounded once (half up) to a whole nano-dollar.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from feather_grpc.core.types import Usage

NANOS_PER_USD = 1_000_000_000
_PER_MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """Nano-USD per million tokens (per million requests for `web_search`). Cached reads and cache writes
    default to the input price, audio to the text price; web searches cost nothing unless configured."""

    input: int
    output: int
    cached_input: int
    cache_write: int
    web_search: int = 0
    cache_write_1h: int | None = None  # writes with a 1-hour TTL; None: the cache-write price
    audio_input: int | None = None  # uncached audio input tokens; None: the input price
    audio_output: int | None = None  # audio output tokens; None: the output price

    def cost_nanos(self, usage: Usage) -> int:
        uncached = max(usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens, 0)
        long_writes = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
        audio_in = min(usage.audio_input_tokens, uncached)  # audio read from a cache is a cache read
        audio_out = min(usage.audio_output_tokens, usage.output_tokens)
        scaled = (
            (uncached - audio_in) * self.input
            + audio_in * (self.input if self.audio_input is None else self.audio_input)
            + usage.cached_input_tokens * self.cached_input
            + (usage.cache_write_tokens - long_writes) * self.cache_write
            + long_writes * (self.cache_write if self.cache_write_1h is None else self.cache_write_1h)
            + (usage.output_tokens - audio_out) * self.output
            + audio_out * (self.output if self.audio_output is None else self.audio_output)
            + usage.web_search_requests * self.web_search
        )
        return (scaled + _PER_MILLION // 2) // _PER_MILLION

    @property
    def sort_key(self) -> int:
        """What `cheapest` compares: input + output price."""
        return self.input + self.output


def usd_to_nanos_per_million(usd: Decimal, per_tokens: int) -> int:
    """Converts a USD price per `per_tokens` tokens to nano-USD per million tokens, exactly.

    Raises ValueError when the price is negative or finer than the integer unit can hold.
    """
    if not usd.is_finite() or usd < 0:
        raise ValueError("must be a finite, non-negative number")
    scaled = usd * NANOS_PER_USD * _PER_MILLION / per_tokens
    if scaled != scaled.to_integral_value():
        raise ValueError("has more precision than 1e-15 USD per token")
    return int(scaled)
