"""Name/alias resolution and policy ordering."""

from __future__ import annotations

import random

import pytest

from feather_grpc.config import ModelConfig, RouteConfig
from feather_grpc.core.errors import ModelNotFound
from feather_grpc.core.pricing import Price
from feather_grpc.engine.routing import LatencyTracker, Router


def _m(provider: str, name: str, aliases: tuple[str, ...], price: int | None) -> ModelConfig:
    p = None if price is None else Price(price, price, price, price)
    return ModelConfig(provider, name, aliases, p, ())


MODELS = [
    _m("openai", "gpt-4o", ("smart",), 100),
    _m("anthropic", "claude", ("smart", "fast"), 50),
    _m("local", "llama", ("smart",), None),
    _m("openai", "gpt-4o-mini", ("fast",), 10),
]


def test_resolution_by_name_alias_provider_slash_model_and_pin() -> None:
    r = Router(MODELS, "first", LatencyTracker())
    assert [c.key for c in r.resolve("gpt-4o")] == ["openai:gpt-4o"]
    assert [c.key for c in r.resolve("smart")] == ["openai:gpt-4o", "anthropic:claude", "local:llama"]
    assert [c.key for c in r.resolve("fast", provider="openai")] == ["openai:gpt-4o-mini"]
    assert [c.key for c in r.resolve("anthropic/fast")] == ["anthropic:claude"]
    with pytest.raises(ModelNotFound):
        r.resolve("fast", provider="local")
    with pytest.raises(ModelNotFound):
        r.resolve("nope")


def test_cheapest_never_prefers_unpriced_and_roundrobin_rotates_per_alias() -> None:
    r = Router(MODELS, "first", LatencyTracker())
    smart = r.resolve("smart")
    assert [c.key for c in r.order("smart", smart, "cheapest")] == ["anthropic:claude", "openai:gpt-4o", "local:llama"]
    firsts = [r.order("smart", smart, "roundrobin")[0].key for _ in range(4)]
    assert firsts == ["openai:gpt-4o", "anthropic:claude", "local:llama", "openai:gpt-4o"]
    fast = r.resolve("fast")
    assert r.order("fast", fast, "roundrobin")[0].key == "anthropic:claude"  # its own counter


class _Dice(random.Random):
    """random() always returns `roll`, so exploration is decided by the test."""

    def __init__(self, roll: float) -> None:
        super().__init__(0)
        self.roll = roll

    def random(self) -> float:
        return self.roll


def test_fastest_measures_unmeasured_first_then_lowest_average() -> None:
    latency = LatencyTracker()
    r = Router(MODELS, "fastest", latency, _Dice(0.99))
    smart = r.resolve("smart")
    latency.observe("openai:gpt-4o", 300)
    latency.observe("anthropic:claude", 100)
    assert [c.key for c in r.order("smart", smart)] == ["local:llama", "anthropic:claude", "openai:gpt-4o"]


def test_fastest_sometimes_explores_a_slower_candidate() -> None:
    latency = LatencyTracker()
    r = Router(MODELS, "fastest", latency, _Dice(0.0))  # below the exploration share: explore
    smart = r.resolve("smart")
    for c in smart:
        latency.observe(c.key, {"openai:gpt-4o": 300, "anthropic:claude": 100, "local:llama": 200}[c.key])
    assert r.order("smart", smart)[0].key != "anthropic:claude"


def test_weighted_follows_weights_and_route_policy_overrides_global() -> None:
    models = [_m("a", "x", ("w",), 1), _m("b", "y", ("w",), 1)]
    models = [
        ModelConfig(m.provider, m.name, m.aliases, m.price, (), weight)
        for m, weight in zip(models, (3, 1), strict=True)
    ]
    r = Router(models, "first", LatencyTracker(), random.Random(7), {"w": RouteConfig(policy="weighted")})
    firsts = [r.order("w", r.resolve("w"))[0].provider for _ in range(4000)]
    share = firsts.count("a") / len(firsts)
    assert 0.70 < share < 0.80  # 3:1 weights -> 75%


def test_plan_appends_configured_fallbacks_once() -> None:
    r = Router(MODELS, "first", LatencyTracker(), routes={"fast": RouteConfig(fallbacks=("smart",))})
    assert [c.key for c in r.plan("fast")] == ["anthropic:claude", "openai:gpt-4o-mini", "openai:gpt-4o", "local:llama"]
