"""SyncFeatherClient: the blocking facade, same methods and options as FeatherClient, and its SyncChatStream."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import grpc

from . import channel as ch
from .client import DEFAULT_TIMEOUT, ClientSettings, closed_error
from .errors import FeatherError
from .gen.feather.v1 import feather_service_pb2 as pb
from .gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from .options import ChatOptions, Messages, UsageOptions, chat_options, usage_options
from .results import ChatResult, StreamAssembler, TokenUsage

__all__ = ["SyncChatStream", "SyncFeatherClient"]


class SyncFeatherClient:
    """Blocking client; see FeatherClient for the options. Use it in a `with` block or call `close()`; after
    `close()`, calls raise FeatherError (CANCELLED, "the client is closed")."""

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
        self.settings = s = ClientSettings(
            address,
            api_key=api_key,
            timeout=timeout,
            tls=tls,
            retry=retry,
            channel_options=channel_options,
            metadata=metadata,
        )
        if s.credentials is None:
            self._channel = grpc.insecure_channel(s.target, options=s.options)
        else:
            self._channel = grpc.secure_channel(s.target, s.credentials, options=s.options)
        self._stub = pb_grpc.FeatherServiceStub(self._channel)
        self._closed = False

    @property
    def stub(self) -> pb_grpc.FeatherServiceStub:
        """The generated stub on this client's channel, for anything the facade does not cover."""
        if self._closed:
            raise closed_error()
        return self._stub

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @chat_options
    def chat(self, messages: Messages, options: ChatOptions) -> ChatResult:
        """One complete reply; see FeatherClient.chat."""
        request = pb.ChatRequest(**options.request_fields(messages))
        try:
            reply = self.stub.Chat(request, **self.settings.call_options(options.timeout, options.metadata))
        except grpc.RpcError as e:
            raise FeatherError.from_rpc_error(e) from None
        return ChatResult.from_proto(reply)

    @chat_options
    def stream_chat(self, messages: Messages, options: ChatOptions) -> SyncChatStream:
        """The reply as it is generated: `for text in stream`, then `stream.usage`, `stream.result`..."""
        request = pb.StreamChatRequest(**options.request_fields(messages))
        call_options = self.settings.call_options(options.timeout, options.metadata)
        return SyncChatStream(self.stub.StreamChat(request, **call_options), request)

    @usage_options
    def usage(self, options: UsageOptions) -> pb.UsageResponse:
        """Ledger totals, grouped; see FeatherClient.usage."""
        request = options.request()
        try:
            reply: pb.UsageResponse = self.stub.Usage(
                request, **self.settings.call_options(options.timeout, options.metadata)
            )
        except grpc.RpcError as e:
            raise FeatherError.from_rpc_error(e) from None
        return reply

    def list_models(
        self,
        *,
        provider: str = "",
        timeout: timedelta | float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> list[pb.ModelInfo]:
        """Routable models in configuration order, with aliases, prices and circuit state."""
        try:
            reply = self.stub.ListModels(
                pb.ListModelsRequest(provider=provider), **self.settings.call_options(timeout, metadata)
            )
        except grpc.RpcError as e:
            raise FeatherError.from_rpc_error(e) from None
        return list(reply.models)


class SyncChatStream:
    """An iterator of text deltas; when it ends, the summary is on the stream (see ChatStream)."""

    def __init__(self, call: Any, request: pb.StreamChatRequest) -> None:
        self._call = call
        self._request = request
        self._events = StreamAssembler()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            while True:
                try:
                    event = next(self._call)
                except StopIteration:
                    if self._events.end is None:
                        raise FeatherError(grpc.StatusCode.UNKNOWN, "the stream closed without its end event") from None
                    raise
                text = self._events.feed(event)
                if text is not None:
                    return text
        except grpc.RpcError as e:
            raise FeatherError.from_rpc_error(e) from None

    def cancel(self) -> None:
        """Stops the stream (the gateway still bills what was generated)."""
        if not self._call.done():
            self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()

    @property
    def done(self) -> bool:
        return self._events.end is not None

    @property
    def result(self) -> ChatResult:
        return self._events.result()

    @property
    def text(self) -> str:
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
