"""ChatOptions: the options of a chat call, written once for `chat()` and `stream_chat()` of both clients.

The four methods take them as keyword arguments, exactly as before; `chat_options` builds the method's
signature from the dataclass's fields (for type checkers through a ParamSpec, for `help()` and IDEs
through `__signature__`), so a new option is one field here.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from google.protobuf import struct_pb2

from .gen.feather.v1 import feather_service_pb2 as pb
from .results import POLICIES, user

__all__ = ["ChatOptions", "Messages", "chat_options"]

Messages = str | Sequence[pb.Message]


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
    tools: Sequence[pb.Tool] = ()
    tool_choice: pb.ToolChoice | None = None
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
            "messages": [user(messages)] if isinstance(messages, str) else list(messages),
            "stop": list(self.stop),
            "tools": list(self.tools),
            "tags": dict(self.tags or {}),
            "request_id": self.request_id or uuid.uuid4().hex,
            "policy": pb.RoutingPolicy.Value(f"ROUTING_POLICY_{self.policy.upper()}") if self.policy else 0,
            "cache": pb.CACHE_MODE_BYPASS if self.bypass_cache else pb.CACHE_MODE_UNSPECIFIED,
            "prompt_cache_key": self.prompt_cache_key,
        }
        optional = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "tool_choice": self.tool_choice,
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


P = ParamSpec("P")
C = TypeVar("C")
R = TypeVar("R")


def _with_options(
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
        functools.update_wrapper(wrapper, method)
        own = inspect.signature(method)
        self_param, messages_param = list(own.parameters.values())[:2]
        keywords = list(inspect.signature(options).parameters.values())
        # What help() and IDEs show (inspect stops at __signature__ rather than follow __wrapped__).
        wrapper.__signature__ = own.replace(parameters=[self_param, messages_param, *keywords])  # type: ignore[attr-defined]
        return cast(Callable[Concatenate[C, Messages, P], R], wrapper)

    return decorate


# Turns `method(self, messages, options)` into `method(self, messages, *, model, provider, ...)`, the keyword
# arguments being ChatOptions' fields. A coroutine function stays one (AsyncMock(spec=...) and frameworks look).
chat_options = _with_options(ChatOptions)
