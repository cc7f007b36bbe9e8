"""The ground floor: shared types, errors, results, the usage record, pricing, the token estimate, breaker
math, the cache key, and the interfaces (ledger, limiter, budgets, circuits, cache, upstream HTTP) that the
floors above implement or use. Nothing here imports from the floors above (see the import-linter contracts
in pyproject.toml)."""
