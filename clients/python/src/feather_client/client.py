"""FeatherClient: the async (grpc.aio) facade over FeatherService, and its ChatStream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import grpc

from . import channel as ch
from .errors import FeatherError
from .gen.feather.v1 import feather_service_pb2 as pb
from .gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from .options import ChatOptions, Messages, UsageOptions, chat_options, usage_options
from .results import ChatResult, StreamAssembler, TokenUsage

__all__ = ["DEFAULT_TIMEOUT", "ChatStream", "ClientSettings", "FeatherClient"]

DEFAULT_TIMEOUT = timedelta(minutes=2)


def closed_error() -> FeatherError:
    """What a call on a closed client raises (both clients)."""
    return FeatherError(grpc.StatusCode.CANCELLED, "the client is closed")


class ClientSettings:
    """What both clients share: target, per-call metadata and deadlines, channel credentials and options."""

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        api_key: str | None,
        timeout: timedelta | float | None,
        tls: ch.TLS | bool,
        retry: ch.RetryPolicy | None,
        channel_options: Sequence[tuple[str, Any]],
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        self.target = ch.target(address)
        self.timeout = ch.seconds(timeout)
        self.credentials = ch.credentials(tls)
        self.options = ch.channel_options(tls, retry, channel_options)
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata)
        if api_key:
            self.metadata += (("authorization", f"Bearer {api_key}"),)

    def call_options(self, timeout: timedelta | float | None, metadata: Sequence[tuple[str, str]]) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else ch.seconds(timeout),
            "metadata": self.metadata + tuple(metadata),
        }


class FeatherClient:
    """Async client for one Feather gateway, or several balanced round robin.

    ```python
    async with FeatherClient("localhost:50051", api_key=key) as client:
        reply = await client.chat("Say hello", model="fast")
    ```

    Options (keyword-only): `api_key` (sent as `authorization: Bearer <key>`), `timeout` (the default deadline
    of every call, seconds or timedelta; None for none; each method also takes `timeout`), `tls` (True for
    system roots, or a `TLS` for custom roots, mTLS, a server-name override), `retry` (a `RetryPolicy` for
    UNAVAILABLE, or None to never retry), `channel_options` (raw gRPC channel arguments, applied last) and
    `metadata` (sent with every call). The channel is opened on first use, inside the running event loop.
    After `close()`, calls raise FeatherError (CANCELLED, "the client is closed").
    """

    def __init__(
        self,
        address: str | Sequence[str] = "localhost:50051",
        *,
        api_key: str | None = None,
        timeout: timedelta | float | None = DEFAULT_TIMEOUT,
        tls: ch.TLS | bool = False,
        retry: ch.RetryPolicy | None = ch.RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        channel_options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.settings = ClientSettings(
            address,
            api_key=api_key,
            timeout=timeout,
            tls=tls,
            retry=retry,
            channel_options=channel_options,
            metadata=metadata,
        )
        self._channel: Any = None
        self._stub: Any = None
        self._closed = False

    @property
    def stub(self) -> pb_grpc.FeatherServiceAsyncStub:
        """The generated stub on this client's channel, for anything the facade does not cover."""
        if self._closed:
            raise closed_error()
        if self._stub is None:
            s = self.settings
            if s.credentials is None:
                self._channel = grpc.aio.insecure_channel(s.target, options=s.options)
            else:
                self._channel = grpc.aio.secure_channel(s.target, s.credentials, options=s.options)
            self._stub = pb_grpc.FeatherServiceStub(self._channel)
        return self._stub  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @chat_options
    async def chat(self, messages: Messages, options: ChatOptions) -> ChatResult:
        """One complete reply. `messages` is a prompt (one user message) or a conversation (see `user()` etc.)."""
        request = pb.ChatRequest(**options.request_fields(messages))
        try:
            reply = await self.stub.Chat(request, **self.settings.call_options(options.timeout, options.metadata))
        except grpc.RpcError as e:
            raise FeatherError.from_rpc_error(e) from None
        return ChatResult.from_proto(reply)

    @chat_options
    def stream_chat(self, messages: Messages, options: ChatOptions) -> ChatStream:
        """The reply as it is generated: `async for text in stream`, then `stream.usage`, `stream.cost_nanos_usd`,
        `stream.result`... To stop early, leave the loop inside `async with stream:` (or call `await stream.cancel()`):
        that cancels the call at once. See ChatStream for a bare `break`."""
        request = pb.StreamChatRequest(**options.request_fields(messages))
        return ChatStream(self, request, self.settings.call_options(options.timeout, options.metadata))

    @usage_options
    async def usage(self, options: UsageOptions) -> pb.UsageResponse:
        """Ledger totals over `[start, end)` (naive datetimes are UTC), grouped by any of `tenant`, `provider`,
        `model`, `tag` (with `tag_key`), `hour`, `day`, in that order of nesting. Grouped rows come in pages
        of `page_size` (0: the server's default, 1000; at most 2000): pass the reply's `next_page_token` as
        `page_token` for the next one, until it is empty. `total` covers every page."""
        request = options.request()
        try:
            reply: pb.UsageResponse = await self.stub.Usage(
                request, **self.settings.call_options(options.timeout, options.metadata)
            )
        except grpc.RpcError as e:
            raise FeatherError.from_rpc_error(e) from None
        return reply

    async def list_models(
        self,
        *,
        provider: str = "",
        timeout: timedelta | float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> list[pb.ModelInfo]:
        """Routable models in configuration order, with aliases, prices and circuit state."""
        request = pb.ListModelsRequest(provider=provider)
        try:
            reply = await self.stub.ListModels(request, **self.settings.call_options(timeout, metadata))
        except grpc.RpcError as e:
            raise FeatherError.from_rpc_error(e) from None
        return list(reply.models)


class ChatStream:
    """An async iterable of text deltas. When it ends, the reply's summary is on the stream itself:
    `provider`, `model`, `finish_reason`, `usage`, `cost_nanos_usd`, `cost_usd`, `latency`, and the whole
    `result`. Those raise RuntimeError before the end; `provider` and `model` are known from the first event.
    A stream that closes without its `end` event raises FeatherError, never ends quietly.

    Stopping early: the way that is guaranteed to cancel the call (so the gateway stops the upstream and bills
    only what was generated) is to iterate inside `async with stream:` (or `contextlib.aclosing(stream)`, or
    to call `await stream.cancel()`). Python itself calls nothing when a bare `async for ...: break` leaves the
    loop; `async for` here runs an async generator whose `finally` cancels the call, which CPython runs as soon
    as the abandoned iterator is released (at once when nothing else holds it), but that is finalization, not a
    language guarantee.
    """

    def __init__(self, client: FeatherClient, request: pb.StreamChatRequest, call_options: dict[str, Any]) -> None:
        self._client = client
        self._request = request
        self._call_options = call_options
        self._call: Any = None
        self._events = StreamAssembler()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                try:
                    text = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield text
        finally:
            self._cancel()

    async def __anext__(self) -> str:
        if self._call is None:
            self._call = self._client.stub.StreamChat(self._request, **self._call_options)
        try:
            while True:
                event = await self._call.read()
                if event is grpc.aio.EOF:
                    if self._events.end is None:
                        raise FeatherError(grpc.StatusCode.UNKNOWN, "the stream closed without its end event")
                    raise StopAsyncIteration
                text = self._events.feed(event)
                if text is not None:
                    return text
        except grpc.RpcError as e:
            raise FeatherError.from_rpc_error(e) from None

    def _cancel(self) -> None:
        if self._call is not None and not self._call.done():
            self._call.cancel()

    async def cancel(self) -> None:
        """Stops the stream (the gateway still bills what was generated). A no-op once the stream has ended."""
        self._cancel()

    async def aclose(self) -> None:
        """The same as `cancel()`, for `contextlib.aclosing(stream)`."""
        self._cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.cancel()

    @property
    def done(self) -> bool:
        return self._events.end is not None

    @property
    def result(self) -> ChatResult:
        return self._events.result()

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._events.text)

    @property
    def provider(self) -> str:
        return self._events.start.provider if self._events.start else self.result.provider

    @property
    def model(self) -> str:
        return self._events.start.model if self._events.start else self.result.model

    @property
    def request_id(self) -> str:
        return self._events.start.request_id if self._events.start else self._request.request_id

    @property
    def finish_reason(self) -> str:
        return self.result.finish_reason

    @property
    def usage(self) -> TokenUsage:
        return self.result.usage

    @property
    def cost_nanos_usd(self) -> int:
        return self.result.cost_nanos_usd

    @property
    def cost_usd(self) -> Decimal:
        return self.result.cost_usd

    @property
    def latency(self) -> timedelta:
        return self.result.latency
