"""Route resolution: a requested model string becomes an ordered list of candidates, by policy."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from feather_grpc.config import ModelConfig
from feather_grpc.engine.errors import ModelNotFound

POLICIES = ("first", "roundrobin", "cheapest", "fastest", "weighted")


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
    ) -> None:
        self._default_policy = default_policy
        self._latency = latency
        self._rng = rng or random.Random()
        self._counters: dict[str, itertools.count[int]] = {}
        self._by_name: dict[str, list[RouteCandidate]] = {}
        self._by_provider_model: dict[tuple[str, str], RouteCandidate] = {}
        for m in models:
            c = RouteCandidate(m.provider, m)
            self._by_provider_model[(m.provider, m.name)] = c
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

    def order(self, requested: str, candidates: list[RouteCandidate], policy: str = "") -> list[RouteCandidate]:
        """Candidates in the order they should be tried. Ties keep configuration order."""
        policy = policy or self._default_policy
        if len(candidates) < 2 or policy == "first":
            return candidates
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
            return sorted(candidates, key=lambda c: self._latency.get(c.key) or -1.0)
        if policy == "weighted":
            shuffled = list(candidates)
            self._rng.shuffle(shuffled)
            return shuffled
        return candidates
