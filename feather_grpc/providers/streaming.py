"""The one SSE streaming skeleton every adapter that streams Server-Sent Events runs (openai and
openai-compatible, azure-openai, anthropic, gemini/vertex, the Responses API): send, classify a non-2xx,
read events to the wire format's end marker within `maxStreamEventBytes`, keep the connection when the
body's end follows soon, and release the response before the last events.

The adapter brings only what differs: how to send (`send`), what an event means (`handle`), when the stream
is over (`done`), what ends it (`finish`), and for formats a server may answer without streaming, how to
read the whole reply (`replay`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

import orjson

from feather_grpc.core.http_client import HttpError, UpstreamResponse
from feather_grpc.core.types import (
    ProviderResponse,
    StreamEvent,
    StreamFinish,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
)
from feather_grpc.providers.base import SHAPE_ERRORS, parse_sse, read_events
from feather_grpc.providers.http import bad_response, classify_transport_error, error_from_response, stream_cut
from feather_grpc.providers.sse import SSEEvent, SSEParser

__all__ = ["stream_sse"]


async def stream_sse(
    name: str,
    api_key: str,
    send: Callable[[], Awaitable[UpstreamResponse]],
    handle: Callable[[SSEEvent], list[StreamEvent]],
    done: Callable[[], bool],
    finish: Callable[[], list[StreamEvent]],
    *,
    end: str,
    max_event_bytes: int,
    read_to_end: bool = False,
    replay: Callable[[object], ProviderResponse] | None = None,
    max_response_bytes: int | None = None,
) -> AsyncGenerator[StreamEvent, None]:
    """One streaming call's events.

    `send` sends the request (a `ProviderError` it raises passes through). The SSE body's events go to
    `handle` until `done()`, which must hold when the body ends, else the stream was cut ("ended without
    `end`"); `read_to_end`: the stream ends with the body (its last event says so), so events are read to
    the end of it. `finish()` gives the last events, yielded once the response is released (a consumer
    that stops at `StreamFinish` without closing the iterator holds no connection).

    `replay`: a 2xx `application/json` reply (a server or proxy that ignored `stream: true`) is read whole
    (at most `max_response_bytes`), parsed by it, and replayed as deltas and its finish instead.
    """
    started = False
    final: list[StreamEvent] | None = None
    try:
        resp = await send()
        # The request body is not needed once sent, and `send` (a closure holding it) would otherwise live as
        # long as the stream: orjson's bytes take ~4 KB however short the body, per held stream.
        del send
        try:
            if resp.status >= 300:
                raise await error_from_response(name, resp, api_key)
            started = True
            if replay is not None and resp.content_type == "application/json":
                try:
                    doc = orjson.loads(await resp.read(max_response_bytes))
                except ValueError:
                    raise bad_response(name, "body is not JSON") from None
                try:
                    full = replay(doc)
                except SHAPE_ERRORS:
                    raise bad_response(name, "the reply is not in the API's shape") from None
                for out in _deltas(full):
                    yield out
                # Without usage the engine estimates, and says so.
                final = [StreamFinish(full.finish_reason, None if full.usage_estimated else full.usage, full.upstream)]
            else:
                parser = SSEParser(max_event_bytes)
                until: Callable[[], bool] = _never if read_to_end else done
                async for chunk in resp:
                    events, error = read_events(name, parse_sse(parser, chunk, name), handle, until)
                    for out in events:
                        yield out
                    if error is not None:
                        raise error
                    if not read_to_end and done():
                        break
                if not done():
                    raise stream_cut(name, f"ended without {end}")
                # The terminating chunk may still be on its way: keep the connection if it comes soon.
                resp.release_after_end()
        finally:
            # Read to the end, the connection is already back in the pool and this is a no-op; otherwise
            # (an error, aclose() or cancellation) it is closed, never pooled.
            resp.close()
    except HttpError as exc:
        raise classify_transport_error(name, exc, streaming=started, api_key=api_key) from exc
    try:
        tail = finish() if final is None else final
    except SHAPE_ERRORS:  # what the stream said, read at its end (its usage...), is not in the API's shape
        raise bad_response(name, "the stream's end is not in the API's shape") from None
    for out in tail:
        yield out


def _never() -> bool:
    return False


def _deltas(full: ProviderResponse) -> list[StreamEvent]:
    """A whole reply as the deltas a stream of it would have carried."""
    out: list[StreamEvent] = [
        ThinkingDelta(i, t.text, t.signature, t.redacted_data) for i, t in enumerate(full.thinking)
    ]
    if full.content:
        out.append(TextDelta(full.content))
    out.extend(ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(full.tool_calls))
    return out
