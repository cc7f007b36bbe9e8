"""Local stand-ins for the services Feather talks to; `sim.upstream` simulates the LLM providers.

Names are re-exported lazily so `python -m sim.upstream` does not import its own module twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.upstream import (
        ANTHROPIC_PATH,
        OPENAI_PATH,
        RecordedRequest,
        Reply,
        SimToolCall,
        SimUsage,
        UpstreamSimulator,
        default_usage,
    )

__all__ = [
    "ANTHROPIC_PATH",
    "OPENAI_PATH",
    "RecordedRequest",
    "Reply",
    "SimToolCall",
    "SimUsage",
    "UpstreamSimulator",
    "default_usage",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sim import upstream

        return getattr(upstream, name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
