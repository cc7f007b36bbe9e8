"""The FeatherService servicer: converts proto <-> engine types and delegates to the engine."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from feather_grpc.core.errors import FeatherError, PermissionDenied
from feather_grpc.core.results import StreamCompleted, StreamStarted
from feather_grpc.core.types import TextDelta, ThinkingDelta
from feather_grpc.engine.admission import Admission
from feather_grpc.engine.gateway import Feather
from feather_grpc.engine.validation import usable_request_id
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server import convert
from feather_grpc.server.calls import ServerCall, current_call
from feather_grpc.server.status import internal_status, status_for

log = logging.getLogger(__name__)


def _call() -> ServerCall:
    """The call's context, built by the call wrapper (server.calls.CallTracker) every server registers it with."""
    call = current_call.get()
    assert call is not None, "FeatherService is served behind CallTracker"
    return call


def _usage_tenant(requested: str) -> str:
    """Members see only their own usage; admins see everyone's, or one tenant's when they ask."""
    tenant = _call().tenant
    if tenant is None or tenant.role == "admin":
        return requested
    if requested and requested != tenant.name:
        raise PermissionDenied(f"tenant {tenant.name!r} may not read the usage of {requested!r}")
    return tenant.name


async def _abort(context: grpc.aio.ServicerContext, error: Exception, request_id: str) -> NoReturn:
    """Ends the call with the status for `error`: rich for engine errors, a bare INTERNAL otherwise.
    Aborts pass through untouched; cancellations never reach here (they are not Exceptions)."""
    if isinstance(error, grpc.aio.AbortError):
        raise error
    if isinstance(error, FeatherError):
        _call().error = error  # the call wrapper counts refusals by it
        await context.abort_with_status(status_for(error, request_id))
    # The status says the request id finds the error in the logs: so there is always one to give.
    request_id = usable_request_id(request_id) or os.urandom(8).hex()
    log.error("unexpected error handling request %s", request_id, exc_info=error)
    await context.abort_with_status(internal_status(request_id))
    raise AssertionError("abort_with_status always raises")


class FeatherServicer(pb_grpc.FeatherServiceServicer):
    def __init__(self, engine: Feather) -> None:
        self._engine = engine

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        try:
            call = _call()  # its request converted, and its context, by the call wrapper
            assert call.request is not None and call.ctx is not None
            return convert.chat_response(await self._engine.chat(call.request, call.ctx))
        except Exception as e:
            await _abort(context, e, request.request_id)

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatResponse]:
        try:
            call = _call()
            assert call.request is not None and call.ctx is not None
            events = self._engine.stream(call.request, call.ctx)
            try:
                async for event in events:
                    if isinstance(event, TextDelta):  # all but two events of a stream, as a rule
                        out = pb.StreamChatResponse()
                        out.delta.content = event.content  # filled in place: cheaper than nesting constructors
                        yield out
                    elif isinstance(event, StreamStarted):
                        yield pb.StreamChatResponse(
                            start=pb.StreamStart(
                                provider=event.provider, model=event.model, request_id=event.request_id
                            )
                        )
                    elif isinstance(event, StreamCompleted):
                        yield pb.StreamChatResponse(end=convert.stream_end(event))
                    elif isinstance(event, ThinkingDelta):
                        yield pb.StreamChatResponse(delta=convert.thinking_delta(event))
                    else:
                        yield pb.StreamChatResponse(
                            delta=pb.ChatDelta(
                                tool_calls=[
                                    pb.ToolCallDelta(
                                        index=event.index, id=event.id, name=event.name, arguments=event.arguments
                                    )
                                ]
                            )
                        )
            finally:
                await events.aclose()  # closes the upstream stream at once when the caller went away
        except Exception as e:
            await _abort(context, e, request.request_id)

    async def Usage(self, request: pb.UsageRequest, context: grpc.aio.ServicerContext) -> pb.UsageResponse:
        try:
            query = convert.usage_query(request, tenant=_usage_tenant(request.tenant))
            return convert.usage_response(await self._engine.usage(query), query)
        except Exception as e:
            await _abort(context, e, "")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await self._engine.refresh_circuits()
        tenant = _call().tenant  # a tenant sees the models it may call
        models = [
            m
            for m in self._engine.models(request.provider)
            if tenant is None or Admission.may_use(tenant, m.provider, m.model)
        ]
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in models])
