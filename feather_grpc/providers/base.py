"""The contract every provider adapter fulfils, and the settings it is built from."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from feather_grpc.engine.errors import ProviderError
from feather_grpc.engine.types import ChatRequest, ProviderResponse, StreamEvent, TextDelta
from feather_grpc.providers.sse import SSEEvent


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """What an adapter needs from configuration. `api_key` comes from the environment or a secret file."""

    name: str  # the provider's name in the config, e.g. "openai"
    type: str  # "openai" | "anthropic" | "openai-compatible" | "mock"
    base_url: str
    api_key: str = field(default="", repr=False)  # never printed
    extra_headers: tuple[tuple[str, str], ...] = ()


class Provider(Protocol):
    """One upstream. Calls raise `feather_grpc.engine.errors.ProviderError` on failure.

    Timeouts and deadlines are the caller's job (the engine wraps calls in `asyncio.timeout`); an adapter
    must let `CancelledError` through untouched and release the HTTP connection when cancelled.
    """

    settings: ProviderSettings

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        """One non-streaming call. `model` is the upstream model id."""
        ...

    def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """One streaming call: deltas, then exactly one `StreamFinish` (unless it raises).

        Closing the iterator early (`aclose()`, or cancellation) closes the upstream connection at once.
        """
        ...

    async def aclose(self) -> None:
        """Release anything the adapter owns (the shared HTTP session is closed by its owner)."""
        ...


def coalesce(events: list[StreamEvent]) -> list[StreamEvent]:
    """The events of one network read, with each run of text deltas joined into one delta.

    Every delta becomes a gRPC message, which costs the gateway ~60-80 us of CPU whatever its size; an
    upstream that sends several events at once (a burst after a pause, a fast server) would pay that per
    event. Only what has already arrived is joined: nothing waits for more text.
    """
    if len(events) < 2:
        return events
    out: list[StreamEvent] = []
    run: list[str] = []
    for event in events:
        if isinstance(event, TextDelta):
            run.append(event.content)
            continue
        if run:
            out.append(TextDelta("".join(run)))
            run = []
        out.append(event)
    if run:
        out.append(TextDelta("".join(run)))
    return out


def read_events(
    sse: list[SSEEvent], handle: Callable[[SSEEvent], list[StreamEvent]], done: Callable[[], bool]
) -> tuple[list[StreamEvent], ProviderError | None]:
    """The stream events of one network read's SSE events (text runs joined, see `coalesce`), up to the
    end of the stream, and the error event that cut them short, if any: the caller yields the events
    first, then raises the error."""
    batch: list[StreamEvent] = []
    try:
        for event in sse:
            batch += handle(event)
            if done():
                break
    except ProviderError as e:
        return coalesce(batch), e
    return coalesce(batch), None
