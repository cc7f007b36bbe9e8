"""The one layer around FeatherService calls: bookkeeping and tenancy in a single wrapper.

`CallTracker` registers FeatherService with each method wrapped (`register`). For each call it
builds the call's one context object, a `ServerCall`, and puts it in `current_call` (the servicer reads
it there; the engine's observer hooks run in the call's task, or in tasks copied from it, so they see it
too), and counts the call as in flight until the handler returns or the stream ends. With a `TenantGate`
it authenticates the caller from the call's own metadata and makes Chat/StreamChat hold a tenant slot
(request rate, concurrency, load shedding) while they run; for those it also converts the request to the
engine's and fills in the engine's `CallContext` (tenant, deadline, request-rate token). Only when
content logging is on does it write the request's messages and the reply's text at DEBUG. Calls refused
with RESOURCE_EXHAUSTED (by the gate or the engine) are reported to `on_refused` with their error's
reason and subject (the servicer puts the engine's error on the ServerCall before it aborts).
`on_status` (tracing) hears the code of every call that did not end OK.

A Chat/StreamChat call refused before the engine (authentication, the gate, a request that does not
decode or convert) is still a call: `record_refusal` (the engine's `Feather.record_refused`) writes its
ledger record and call-log line here, the one place, before the status goes out, as the engine does for
the calls it fails. Its tenant is the authenticated one, or `UNAUTHENTICATED` ("") when authentication
failed: that caller is nobody's tenant, and "" is no tenant's name (a key or JWT always names one).
Refused Usage/ListModels calls are not LLM calls and are not in the ledger.

It answers this process's start probes (loop_lag.StartProbes) before anything else, with an empty reply.

A wrapper registered with the service, not a gRPC interceptor: grpc.aio runs its interceptors for every
call, each a coroutine and a continuation before the handler even starts, and on a stream every layer
is an async generator that each message passes through. Without tracing the server has no interceptor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc

from feather_grpc.config import TenantConfig
from feather_grpc.core.errors import FeatherError, FieldViolation, InvalidRequest, RateLimitExceeded
from feather_grpc.core.types import ChatRequest
from feather_grpc.engine.call import CallContext
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server import convert
from feather_grpc.server.logs import CONTENT_LOGGER
from feather_grpc.server.loop_lag import StartProbes
from feather_grpc.server.status import status_for
from feather_grpc.server.tenancy import RequestToken, TenantGate, authorization, remaining_s

# The methods that call upstreams: they hold a tenant slot (rate, concurrency, load shedding).
LIMITED_METHODS = frozenset({"Chat", "StreamChat"})


@dataclass(slots=True)
class ServerCall:
    """One RPC as the server knows it, built by the call wrapper: who is calling, what they asked the
    engine for, and what observers learn as it runs (perf_counter seconds)."""

    method: str
    started: float
    upstream_s: float = 0.0  # time inside upstream attempts (overlapping hedge legs add up)
    first_ok_at: float | None = None  # when an attempt succeeded: for a stream, its first event
    pending: dict[str, Any] = field(default_factory=dict)  # observer state kept until the call settles
    # The authenticated caller; None without tenancy (no gate) or before authentication succeeded.
    tenant: TenantConfig | None = None
    request_token: RequestToken | None = None  # Chat/StreamChat: the tenant's request-rate token
    # Chat/StreamChat, once admitted by the gate: the engine's request and call context.
    request: ChatRequest | None = None
    ctx: CallContext | None = None
    error: FeatherError | None = None  # the error the call was refused or failed with, when it was one


current_call: ContextVar[ServerCall | None] = ContextVar("feather_current_call", default=None)

# (reason, subject): e.g. ("RATE_LIMITED", "tenant:acme:requests"), ("OVERLOADED", "")
RefusalHook = Callable[[str, str], None]
# The status code a call that did not end OK ended with, as the caller received it.
StatusHook = Callable[[grpc.StatusCode], None]
# Writes the ledger record (and the observers' lines) of a call refused here; see Feather.record_refused.
RefusalRecorder = Callable[[ChatRequest, CallContext, FeatherError, bool], Awaitable[None]]
# The ledger tenant of a call whose caller could not be authenticated.
UNAUTHENTICATED = ""

log = logging.getLogger(__name__)


class CallTracker:
    """Counts in-flight FeatherService calls per method, builds a ServerCall for each, and applies the
    tenant gate when given one."""

    def __init__(
        self,
        gate: TenantGate | None = None,
        *,
        log_content: bool = False,
        on_refused: RefusalHook | None = None,
        record_refusal: RefusalRecorder | None = None,
        on_status: StatusHook | None = None,
        max_request_bytes: int | None = None,
        probes: StartProbes | None = None,
    ) -> None:
        self.gate = gate
        self.probes = probes
        self.max_request_bytes = max_request_bytes
        self.on_status = on_status
        self.record_refusal = record_refusal
        self.inflight: dict[str, int] = {}
        self._active = 0  # all methods: the sum of `inflight`
        self.started = 0  # calls that have entered a handler so far
        self._idle: asyncio.Event | None = None  # set when _active drops to 0, while someone waits for it
        self.on_refused = on_refused
        self._content = logging.getLogger(CONTENT_LOGGER) if log_content else None

    @property
    def total_inflight(self) -> int:
        return self._active

    async def drained(self) -> None:
        """Returns once no call is in its handler: after the server cancelled the calls that outlived the
        grace period, their handlers still settle them (ledger records included) before they end."""
        while self._active:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._idle = None

    def _enter(self, method: str) -> None:
        self.inflight[method] += 1
        self._active += 1
        self.started += 1

    def _exit(self, method: str) -> None:
        self.inflight[method] -= 1
        self._active -= 1
        if not self._active and self._idle is not None:
            self._idle.set()

    def register(self, server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Registers `servicer` on `server` as `add_to_server` (a generated `add_*Servicer_to_server`) does,
        with each of its methods wrapped."""
        captured = _Registration()
        add_to_server(servicer, captured)
        if not captured.services:
            raise RuntimeError(f"{add_to_server.__name__} registered no method handlers: regenerate the stubs")
        for service, handlers in captured.services.items():
            wrapped = {name: self._wrap(name, handler) for name, handler in handlers.items()}
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
            server.add_registered_method_handlers(service, wrapped)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        self.inflight.setdefault(method, 0)
        deserializer = _tolerant(handler.request_deserializer, self.max_request_bytes)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # FeatherService has no client-streaming methods

    def _begin(self, method: str) -> ServerCall:
        call = ServerCall(method, time.perf_counter())
        # Each RPC runs in its own task, so the variable needs no reset: it dies with the task.
        current_call.set(call)
        return call

    async def _admit(self, call: ServerCall, request: Any, context: grpc.aio.ServicerContext) -> TenantConfig | None:
        """Authenticates the caller and, for Chat/StreamChat, takes a tenant slot. Returns the tenant when
        it holds a slot (to give back with `gate.leave`). A refusal is recorded, then aborts the call."""
        gate = self.gate
        try:
            if gate is not None:  # else no tenancy (an embedding without the gate)
                call.tenant = gate.default_tenant if gate.open else gate.authenticate(authorization(context))
            if type(request) is Undecodable:
                raise request.error
            if gate is None or call.tenant is None or call.method not in LIMITED_METHODS:
                return None
            call.request_token = gate.enter(call.tenant, remaining_s(context))
        except FeatherError as e:
            await self._refuse(call, request, context, e)
        return call.tenant

    async def _to_engine(self, call: ServerCall, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Chat/StreamChat: the engine's request and call context. A request that does not convert is
        refused here (recorded, with its request id in the status)."""
        if call.method not in LIMITED_METHODS:
            return
        remaining = remaining_s(context)
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        tenant = call.tenant
        if tenant is None:  # served without the tenant gate (an embedding): the configured default tenant
            call.ctx = CallContext(deadline=deadline)
        else:
            call.ctx = CallContext(tenant.name, deadline, tenant, call.request_token)
        try:
            call.request = convert.chat_request(request)
        except InvalidRequest as e:
            await self._refuse(call, request, context, e, request.request_id)

    async def _refuse(
        self,
        call: ServerCall,
        request: Any,
        context: grpc.aio.ServicerContext,
        error: FeatherError,
        request_id: str = "",
    ) -> None:
        """Refuses a call before the engine saw it: Chat/StreamChat are recorded first (the one place)."""
        call.error = error
        if call.method in LIMITED_METHODS:
            await self._record_refusal(call, request, error)
        await context.abort_with_status(status_for(error, request_id))

    async def _record_refusal(self, call: ServerCall, request: Any, error: FeatherError) -> None:
        if self.record_refusal is None:
            return
        tenant = call.tenant
        if call.ctx is not None:  # refused after the gate (the request did not convert): its own context
            ctx = call.ctx
        elif tenant is None:
            ctx = CallContext(tenant=UNAUTHENTICATED)
        else:
            ctx = CallContext(tenant=tenant.name, tenant_config=tenant)
        try:
            if type(request) is Undecodable:
                refused = ChatRequest(model="", messages=[])
            else:
                refused = convert.refused_request(request, authenticated=tenant is not None or call.ctx is not None)
            await self.record_refusal(refused, ctx, error, call.method == "StreamChat")
        except Exception:  # the refusal goes out whatever happened to its record
            log.exception("could not record a refused %s call", call.method)

    def _unary(self, method: str, behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Any]:
        gate = self.gate
        probes = self.probes if method == "Chat" else None

        async def unary(request: Any, context: Any) -> Any:
            if probes is not None and _may_be_probe(request) and probes.is_probe(context.invocation_metadata()):
                return _PROBE_REPLY
            call = self._begin(method)
            self._enter(method)
            try:
                tenant = await self._admit(call, request, context)
                try:
                    await self._to_engine(call, request, context)
                    response = await behavior(request, context)
                finally:
                    if tenant is not None and gate is not None:
                        await _discard(call.request_token)
                        gate.leave(tenant)
            except grpc.aio.AbortError:
                self._aborted(call, context)
                raise
            except BaseException as e:
                self._failed(context, e)
                raise
            finally:
                self._exit(method)
            # Chat only: Usage and ListModels carry no conversation.
            if self._content is not None and method == "Chat" and self._content.isEnabledFor(logging.DEBUG):
                _log_content(self._content, method, response.request_id, request, response.message.content)
            return response

        return unary

    def _stream(self, method: str, behavior: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], Any]:
        gate = self.gate
        probes = self.probes if method == "StreamChat" else None

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if probes is not None and _may_be_probe(request) and probes.is_probe(context.invocation_metadata()):
                return  # no message, status OK
            call = self._begin(method)
            self._enter(method)
            text: list[str] | None = [] if self._content is not None else None
            request_id = "" if type(request) is Undecodable else request.request_id
            try:
                tenant = await self._admit(call, request, context)
                try:
                    await self._to_engine(call, request, context)
                    if text is None:
                        async for response in behavior(request, context):
                            yield response
                    else:
                        async for response in behavior(request, context):
                            if response.HasField("delta"):
                                text.append(response.delta.content)
                            elif response.HasField("start"):
                                request_id = response.start.request_id
                            yield response
                finally:
                    if tenant is not None and gate is not None:
                        await _discard(call.request_token)
                        gate.leave(tenant)
            except grpc.aio.AbortError:
                self._aborted(call, context)
                raise
            except BaseException as e:
                self._failed(context, e)
                raise
            finally:
                self._exit(method)
            if self._content is not None and text is not None and self._content.isEnabledFor(logging.DEBUG):
                _log_content(self._content, method, request_id, request, "".join(text))

        return stream

    def _failed(self, context: Any, error: BaseException) -> None:
        """A call that ended by an exception other than an abort: cancelled (by the caller, or by its
        deadline), or an error gRPC turns into UNKNOWN."""
        if self.on_status is None or isinstance(error, GeneratorExit):
            return
        if isinstance(error, asyncio.CancelledError):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self.on_status(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
        else:
            self.on_status(grpc.StatusCode.UNKNOWN)

    def _aborted(self, call: ServerCall, context: Any) -> None:
        code = context.code()
        if self.on_status is not None:
            self.on_status(code)
        error = call.error
        if self.on_refused is None or code != grpc.StatusCode.RESOURCE_EXHAUSTED or error is None:
            return
        # What the caller's ErrorInfo says too (status.status_for): the reason, and the limit's subject.
        self.on_refused(error.reason, error.subject if isinstance(error, RateLimitExceeded) else "")


# What a Chat probe is answered with: an empty message, no bytes on the wire.
_PROBE_REPLY = pb.ChatResponse()


def _may_be_probe(request: Any) -> bool:
    """A probe's request is empty; a real call names a model. Only then are the call's headers read."""
    return type(request) is not Undecodable and not request.model


class _Registration:
    """Stands in for the server while a generated `add_*Servicer_to_server` registers a servicer, to keep
    each service's method handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same methods as the registered ones below, rebuilt from the wrapped handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = handlers


async def _discard(token: RequestToken | None) -> None:
    """Awaits the verdict of a request-rate token the engine never judged (the token stays taken)."""
    if token is not None:
        await token.discard()


def _log_content(log: logging.Logger, method: str, request_id: str, request: Any, completion: str) -> None:
    messages = [{"role": pb.Role.Name(m.role), "content": m.content} for m in request.messages]
    log.debug(
        "content",
        extra={"method": method, "request_id": request_id, "messages": messages, "completion": completion},
    )


class Undecodable:
    """What a request that is not a valid message deserializes to (bad UTF-8, truncated or corrupt bytes,
    or more bytes than the server takes): the call is refused with INVALID_ARGUMENT, and Chat/StreamChat
    recorded, rather than gRPC answering UNKNOWN with a Python exception's name."""

    __slots__ = ("error",)

    def __init__(self, problem: str) -> None:
        self.error = InvalidRequest([FieldViolation("request", problem[:250])])


def _tolerant(deserialize: Callable[[bytes], Any] | None, limit: int | None) -> Callable[[bytes], Any] | None:
    """`deserialize`, with bytes that do not parse, or more than `limit` of them (not parsed at all), turned
    into an Undecodable request."""
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        if limit is not None and len(raw) > limit:
            return Undecodable(f"is {len(raw)} bytes; this server takes at most {limit} (server.maxMessageBytes)")
        try:
            return deserialize(raw)
        except Exception as e:  # protobuf's DecodeError (and whatever a parser of bytes may raise)
            return Undecodable(f"is not a valid message: {(str(e) or type(e).__name__)[:200]}")

    return parse
