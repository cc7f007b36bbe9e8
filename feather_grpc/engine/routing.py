"""Route resolution: a requested model string becomes an ordered list of candidates, by policy."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from feather_grpc.config import ModelConfig, RouteConfig
from feather_grpc.core.errors import ModelNotFound

POLICIES = ("first", "roundrobin", "cheapest", "fastest", "weighted")
# Share of `fastest` calls sent to a random other candidate, so a recovered or slowed provider gets
# measured again instead of being judged forever on old numbers.
FASTEST_EXPLORATION = 0.05


@dataclass(frozen=True, slots=True)
class RouteCandidate:
    """One provider:model pair a call may be sent to."""

    provider: str
    model: ModelConfig

    @property
    def key(self) -> str:
        return f"{self.provider}:{self.model.name}"


class LatencyTracker:
    """Decaying average of measured latency per provider:model (for the `fastest` policy)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._ms: dict[str, float] = {}

    def observe(self, key: str, ms: float) -> None:
        old = self._ms.get(key)
        self._ms[key] = ms if old is None else old + self._alpha * (ms - old)

    def get(self, key: str) -> float | None:
        return self._ms.get(key)


class Router:
    """Resolves names and aliases once per request against indexes built at start."""

    def __init__(
        self,
        models: Sequence[ModelConfig],
        default_policy: str,
        latency: LatencyTracker,
        rng: random.Random | None = None,
        routes: dict[str, RouteConfig] | None = None,
    ) -> None:
        self._default_policy = default_policy
        self._latency = latency
        self._rng = rng or random.Random()
        self.routes = routes or {}
        self._counters: dict[str, itertools.count[int]] = {}
        self._by_name: dict[str, list[RouteCandidate]] = {}
        for m in models:
            c = RouteCandidate(m.provider, m)
            for key in (m.name, *m.aliases):
                bucket = self._by_name.setdefault(key, [])
                if c not in bucket:
                    bucket.append(c)
        self._providers = {m.provider for m in models}

    def resolve(self, model: str, provider: str = "") -> list[RouteCandidate]:
        """Candidates for `model` (name, alias or `provider/model`), optionally pinned to `provider`."""
        if not provider and "/" in model:
            head, _, tail = model.partition("/")
            if head in self._providers:
                provider, model = head, tail
        found = self._by_name.get(model, [])
        if provider:
            found = [c for c in found if c.provider == provider]
        if not found:
            raise ModelNotFound(model, provider)
        return found

    def plan(self, requested: str, provider: str = "", policy: str = "") -> list[RouteCandidate]:
        """Every candidate to try, in order: the name's own (by policy), then its configured fallbacks."""
        name = requested.partition("/")[2] if "/" in requested and not provider else requested
        route = self.routes.get(requested) or self.routes.get(name)
        ordered = self.order(requested, self.resolve(requested, provider), policy)
        if route is None or not route.fallbacks:
            return ordered
        seen = {c.key for c in ordered}
        for fallback in route.fallbacks:
            for c in self.order(fallback, self.resolve(fallback), policy):
                if c.key not in seen:
                    seen.add(c.key)
                    ordered.append(c)
        return ordered

    def order(self, requested: str, candidates: list[RouteCandidate], policy: str = "") -> list[RouteCandidate]:
        """Candidates in the order they should be tried: request policy, else the name's, else the global one.
        Ties keep configuration order."""
        route = self.routes.get(requested)
        policy = policy or (route.policy if route else "") or self._default_policy
        if len(candidates) < 2 or policy == "first":
            return list(candidates)
        if policy == "roundrobin":
            counter = self._counters.setdefault(requested, itertools.count())
            start = next(counter) % len(candidates)
            return candidates[start:] + candidates[:start]
        if policy == "cheapest":
            # Unpriced models sort after every priced one: they never win on price.
            return sorted(
                candidates, key=lambda c: (c.model.price is None, c.model.price.sort_key if c.model.price else 0)
            )
        if policy == "fastest":
            # Unmeasured candidates first so each gets measured; then lowest decaying average.
            ordered = sorted(candidates, key=lambda c: self._latency.get(c.key) or -1.0)
            if self._rng.random() < FASTEST_EXPLORATION:
                explored = ordered.pop(self._rng.randrange(1, len(ordered)))
                ordered.insert(0, explored)
            return ordered
        if policy == "weighted":
            # Weighted sampling without replacement (Efraimidis-Spirakis); weight 0 only as a last resort.
            def draw(c: RouteCandidate) -> float:
                return self._rng.random() ** (1.0 / c.model.weight) if c.model.weight > 0 else -1.0

            return sorted(candidates, key=draw, reverse=True)
        return list(candidates)
