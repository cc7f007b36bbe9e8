"""The options of a call, written once for both clients: ChatOptions (`chat()`, `stream_chat()`) and
UsageOptions (`usage()`).

The methods take them as keyword arguments, exactly as before; `chat_options` and `usage_options` build
the method's signature from the dataclass's fields (for type checkers through a ParamSpec, for `help()`
and IDEs through `__signature__`), so a new option is one field here.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from google.protobuf import struct_pb2, timestamp_pb2

from .gen.feather.v1 import feather_service_pb2 as pb
from .results import GROUP_BY, POLICIES, MessageLike, ToolChoiceLike, ToolLike, _tool_choice, message, tool, user

__all__ = ["ChatOptions", "Messages", "UsageOptions", "chat_options", "usage_options"]

Messages = str | Sequence[MessageLike]  # pb.Message, or as OpenAI writes it: {"role": "user", "content": ...}


def new_request_id() -> str:
    """A UUIDv7 (RFC 9562) as 32 hex digits, the form of the ids the gateway makes: Unix time in ms first,
    then 74 random bits. Time first so the gateway's ledger index takes a new id at its end, not at a
    random page (Python 3.11 has no uuid.uuid7)."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return f"{value & ~(0xF << 76 | 0x3 << 62) | 0x7 << 76 | 0x2 << 62:032x}"


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatOptions:
    """Everything a chat call takes besides its messages: the request's fields, then the call's own
    `timeout` (None: the client's default) and `metadata` (sent after the client's)."""

    model: str
    provider: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    tools: Sequence[ToolLike] = ()
    tool_choice: ToolChoiceLike | None = None
    response_format: pb.ResponseFormat | None = None
    reasoning: pb.ReasoningOptions | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str = ""
    extra_fields: Mapping[str, Any] | None = None
    policy: str = ""
    bypass_cache: bool = False
    tags: Mapping[str, str] | None = None
    request_id: str | None = None
    timeout: timedelta | float | None = None
    metadata: Sequence[tuple[str, str]] = ()

    def request_fields(self, messages: Messages) -> dict[str, Any]:
        """Keyword arguments for ChatRequest or StreamChatRequest (they carry the same fields).

        A request id is generated here when none is given, so that a call retried on UNAVAILABLE is billed once.
        """
        if self.policy and self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        fields: dict[str, Any] = {
            "model": self.model,
            "provider": self.provider,
            "messages": (
                [user(messages)]
                if isinstance(messages, str)
                else [message(m, f"messages[{i}]") for i, m in enumerate(messages)]
            ),
            "stop": list(self.stop),
            "tools": [tool(t, f"tools[{i}]") for i, t in enumerate(self.tools)],
            "tags": dict(self.tags or {}),
            "request_id": self.request_id or new_request_id(),
            "policy": pb.RoutingPolicy.Value(f"ROUTING_POLICY_{self.policy.upper()}") if self.policy else 0,
            "cache": pb.CACHE_MODE_BYPASS if self.bypass_cache else pb.CACHE_MODE_UNSPECIFIED,
            "prompt_cache_key": self.prompt_cache_key,
        }
        optional = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "tool_choice": None if self.tool_choice is None else _tool_choice(self.tool_choice),
            "response_format": self.response_format,
            "reasoning": self.reasoning,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        if self.extra_fields is not None:
            body = struct_pb2.Struct()
            body.update(dict(self.extra_fields))
            fields["extra_fields"] = body
        return fields


@dataclass(frozen=True, kw_only=True, slots=True)
class UsageOptions:
    """What a Usage call takes: the window `[start, end)` (naive datetimes are UTC), the grouping and filters,
    the page, then the call's own `timeout` and `metadata`."""

    start: datetime | None = None
    end: datetime | None = None
    group_by: Sequence[str] = ()
    tenant: str = ""
    provider: str = ""
    model: str = ""
    tag_key: str = ""
    tags: Mapping[str, str] | None = None
    page_size: int = 0
    page_token: str = ""
    timeout: timedelta | float | None = None
    metadata: Sequence[tuple[str, str]] = ()

    def request(self) -> pb.UsageRequest:
        unknown = [g for g in self.group_by if g not in GROUP_BY]
        if unknown:
            raise ValueError(f"group_by must be among {sorted(GROUP_BY)}, got {unknown}")
        if "tag" in self.group_by and not self.tag_key:
            raise ValueError("group_by 'tag' needs tag_key (the tag whose values form the groups)")
        request = pb.UsageRequest(
            group_by=[pb.UsageGroupBy.Value(f"USAGE_GROUP_BY_{g.upper()}") for g in self.group_by],
            tenant=self.tenant,
            provider=self.provider,
            model=self.model,
            tag_key=self.tag_key,
            tags=dict(self.tags or {}),
            page_size=self.page_size,
            page_token=self.page_token,
        )
        if self.start is not None:
            request.start_time.CopyFrom(_timestamp(self.start))
        if self.end is not None:
            request.end_time.CopyFrom(_timestamp(self.end))
        return request


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


P = ParamSpec("P")
C = TypeVar("C")
R = TypeVar("R")


def _with_chat_options(
    options: Callable[P, ChatOptions],
) -> Callable[[Callable[[C, Messages, ChatOptions], R]], Callable[Concatenate[C, Messages, P], R]]:
    build = cast(Callable[..., ChatOptions], options)

    def decorate(method: Callable[[C, Messages, ChatOptions], R]) -> Callable[Concatenate[C, Messages, P], R]:
        if inspect.iscoroutinefunction(method):

            async def call_async(self: Any, messages: Messages, **kwargs: Any) -> Any:
                return await method(self, messages, build(**kwargs))

            wrapper: Callable[..., Any] = call_async
        else:

            def call(self: Any, messages: Messages, **kwargs: Any) -> Any:
                return method(self, messages, build(**kwargs))

            wrapper = call
        return cast(Callable[Concatenate[C, Messages, P], R], _present(wrapper, method, options, leading=2))

    return decorate


def _with_usage_options(
    options: Callable[P, UsageOptions],
) -> Callable[[Callable[[C, UsageOptions], R]], Callable[Concatenate[C, P], R]]:
    build = cast(Callable[..., UsageOptions], options)

    def decorate(method: Callable[[C, UsageOptions], R]) -> Callable[Concatenate[C, P], R]:
        if inspect.iscoroutinefunction(method):

            async def call_async(self: Any, **kwargs: Any) -> Any:
                return await method(self, build(**kwargs))

            wrapper: Callable[..., Any] = call_async
        else:

            def call(self: Any, **kwargs: Any) -> Any:
                return method(self, build(**kwargs))

            wrapper = call
        return cast(Callable[Concatenate[C, P], R], _present(wrapper, method, options, leading=1))

    return decorate


def _present(wrapper: Callable[..., Any], method: Callable[..., Any], options: Any, *, leading: int) -> Any:
    """The wrapper under the method's name and docstring, with the signature help() and IDEs show: the method's
    `leading` parameters, then the options' fields (inspect stops at __signature__ rather than follow __wrapped__)."""
    functools.update_wrapper(wrapper, method)
    own = inspect.signature(method)
    keywords = list(inspect.signature(options).parameters.values())
    wrapper.__signature__ = own.replace(parameters=[*list(own.parameters.values())[:leading], *keywords])  # type: ignore[attr-defined]
    return wrapper


# Turn `method(self, messages, options)` into `method(self, messages, *, model, provider, ...)`, and
# `method(self, options)` into `method(self, *, start, end, ...)`, the keyword arguments being the options'
# fields. A coroutine function stays one (AsyncMock(spec=...) and frameworks look).
chat_options = _with_chat_options(ChatOptions)
usage_options = _with_usage_options(UsageOptions)
