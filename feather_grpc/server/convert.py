"""Proto <-> engine types, and nothing else. Values the engine cannot represent are rejected here."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.timestamp_pb2 import Timestamp

from feather_grpc.core.errors import FieldViolation, InvalidRequest
from feather_grpc.core.ledger import GroupBy, UsageQuery, UsageReport, UsageTotals
from feather_grpc.core.pricing import Price
from feather_grpc.core.results import AttemptRecord, ChatResult, StreamCompleted
from feather_grpc.core.types import (
    ChatRequest,
    FinishReason,
    Message,
    Part,
    PartKind,
    ResponseFormat,
    RetryOverride,
    Role,
    ThinkingBlock,
    ThinkingDelta,
    ToolCall,
    ToolChoice,
    ToolSpec,
    UpstreamReply,
    Usage,
)
from feather_grpc.engine.gateway import ModelView
from feather_grpc.engine.validation import usable_request_id
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server import usage_pages

_ROLES = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_TOOL_CHOICE = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: "",
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_FORMATS = {
    pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: "",
    pb.RESPONSE_FORMAT_TYPE_TEXT: "text",
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
}
_POLICIES = {
    pb.ROUTING_POLICY_UNSPECIFIED: "",
    pb.ROUTING_POLICY_FIRST: "first",
    pb.ROUTING_POLICY_ROUND_ROBIN: "roundrobin",
    pb.ROUTING_POLICY_CHEAPEST: "cheapest",
    pb.ROUTING_POLICY_FASTEST: "fastest",
    pb.ROUTING_POLICY_WEIGHTED: "weighted",
}
_FINISH = {
    FinishReason.UNSPECIFIED: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
}
_OUTCOMES = {
    "ok": pb.ATTEMPT_OUTCOME_OK,
    "retryable_error": pb.ATTEMPT_OUTCOME_RETRYABLE_ERROR,
    "fatal_error": pb.ATTEMPT_OUTCOME_FATAL_ERROR,
    "cancelled": pb.ATTEMPT_OUTCOME_CANCELLED,
    "circuit_open": pb.ATTEMPT_OUTCOME_CIRCUIT_OPEN,
}
_GROUP_BY = {
    pb.USAGE_GROUP_BY_TENANT: GroupBy.TENANT,
    pb.USAGE_GROUP_BY_PROVIDER: GroupBy.PROVIDER,
    pb.USAGE_GROUP_BY_MODEL: GroupBy.MODEL,
    pb.USAGE_GROUP_BY_TAG: GroupBy.TAG,
    pb.USAGE_GROUP_BY_HOUR: GroupBy.HOUR,
    pb.USAGE_GROUP_BY_DAY: GroupBy.DAY,
}


_DETAIL = {
    pb.IMAGE_DETAIL_UNSPECIFIED: "",
    pb.IMAGE_DETAIL_AUTO: "auto",
    pb.IMAGE_DETAIL_LOW: "low",
    pb.IMAGE_DETAIL_HIGH: "high",
}


_EFFORT = {
    pb.REASONING_EFFORT_UNSPECIFIED: "",
    pb.REASONING_EFFORT_NONE: "none",
    pb.REASONING_EFFORT_MINIMAL: "minimal",
    pb.REASONING_EFFORT_LOW: "low",
    pb.REASONING_EFFORT_MEDIUM: "medium",
    pb.REASONING_EFFORT_HIGH: "high",
    pb.REASONING_EFFORT_XHIGH: "xhigh",
}
_TTL = {pb.CACHE_TTL_UNSPECIFIED: "", pb.CACHE_TTL_FIVE_MINUTES: "5m", pb.CACHE_TTL_ONE_HOUR: "1h"}


def _cache_ttl(msg: pb.Part | pb.Message | pb.Tool, field: str, bad: list[FieldViolation]) -> str | None:
    """A breakpoint's TTL ("" for the provider's default), or None without a breakpoint."""
    if not msg.HasField("cache_breakpoint"):
        return None
    ttl = _TTL.get(msg.cache_breakpoint.ttl)
    if ttl is None:
        bad.append(FieldViolation(f"{field}.cache_breakpoint.ttl", "unknown value"))
    return ttl or ""


def _part(p: pb.Part, field: str, bad: list[FieldViolation]) -> Part | None:
    part = _part_kind(p, field, bad)
    if part is not None and p.HasField("cache_breakpoint"):
        part = replace(part, cache_ttl=_cache_ttl(p, field, bad))
    return part


def _part_kind(p: pb.Part, field: str, bad: list[FieldViolation]) -> Part | None:
    kind = p.WhichOneof("kind")
    if kind == "text":
        return Part(PartKind.TEXT, text=p.text)
    if kind == "image":
        detail = _DETAIL.get(p.image.detail)
        if detail is None:
            bad.append(FieldViolation(f"{field}.image.detail", "unknown value"))
        return Part(
            PartKind.IMAGE, url=p.image.url, data=p.image.data, media_type=p.image.media_type, detail=detail or ""
        )
    if kind == "document":
        d = p.document
        return Part(
            PartKind.DOCUMENT, url=d.url, data=d.data, media_type=d.media_type or "application/pdf", title=d.title
        )
    if kind == "audio":
        return Part(PartKind.AUDIO, data=p.audio.data, media_type=p.audio.format)
    bad.append(FieldViolation(field, "must be text, an image, a document or audio"))
    return None


def _json_object(value: struct_pb2.Struct, field: str, bad: list[FieldViolation]) -> dict[str, Any] | None:
    """A Struct as JSON for the upstream; NaN and infinities have no JSON form, so they are the caller's error."""
    try:
        return json_format.MessageToDict(value)
    except ValueError:
        bad.append(FieldViolation(field, "must hold JSON values only (no NaN or Infinity)"))
        return None


def chat_request(msg: pb.ChatRequest | pb.StreamChatRequest) -> ChatRequest:
    """Both request messages carry the same fields, so one conversion serves Chat and StreamChat."""
    bad: list[FieldViolation] = []
    messages: list[Message] = []
    for i, m in enumerate(msg.messages):
        role = _ROLES.get(m.role)
        if role is None:
            bad.append(
                FieldViolation(f"messages[{i}].role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL")
            )
            continue
        calls = m.tool_calls
        messages.append(
            Message(
                role=role,
                content=m.content,
                name=m.name,
                tool_call_id=m.tool_call_id,
                tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in calls) if calls else (),
                is_error=m.is_error,
                parts=tuple(
                    part
                    for j, p in enumerate(m.parts)
                    if (part := _part(p, f"messages[{i}].parts[{j}]", bad)) is not None
                )
                if m.parts
                else (),
                cache_ttl=_cache_ttl(m, f"messages[{i}]", bad),
                thinking=tuple(ThinkingBlock(t.text, t.signature, t.redacted_data) for t in m.thinking)
                if m.thinking
                else (),
            )
        )
    tool_choice = None
    if msg.HasField("tool_choice"):
        mode = _TOOL_CHOICE.get(msg.tool_choice.mode)
        if mode is None:
            bad.append(FieldViolation("tool_choice.mode", "unknown value"))
        tool_choice = ToolChoice(mode or "", msg.tool_choice.function_name)
    response_format = None
    if msg.HasField("response_format"):
        rf = msg.response_format
        fmt = _FORMATS.get(rf.type)
        if fmt is None:
            bad.append(FieldViolation("response_format.type", "unknown value"))
        response_format = ResponseFormat(
            type=fmt or "",
            schema_name=rf.schema_name,
            strict=rf.strict,
            json_schema=_json_object(rf.json_schema, "response_format.json_schema", bad)
            if rf.HasField("json_schema")
            else None,
        )
    policy = _POLICIES.get(msg.policy)
    if policy is None:
        bad.append(FieldViolation("policy", "unknown value"))
    if msg.cache not in (pb.CACHE_MODE_UNSPECIFIED, pb.CACHE_MODE_BYPASS):
        bad.append(FieldViolation("cache", "unknown value"))
    tools = [
        ToolSpec(
            t.name,
            t.description,
            _json_object(t.parameters, f"tools[{i}].parameters", bad) if t.HasField("parameters") else None,
            t.strict,
            _cache_ttl(t, f"tools[{i}]", bad),
        )
        for i, t in enumerate(msg.tools)
    ]
    extra_fields = _json_object(msg.extra_fields, "extra_fields", bad) if msg.HasField("extra_fields") else None
    effort = _EFFORT.get(msg.reasoning.effort)
    if effort is None:
        bad.append(FieldViolation("reasoning.effort", "unknown value"))
    if bad:
        raise InvalidRequest(bad)
    retry = None
    if msg.HasField("retry"):
        r = msg.retry
        retry = RetryOverride(
            max_attempts=r.max_attempts if r.HasField("max_attempts") else None,
            base_ms=r.base_ms if r.HasField("base_ms") else None,
            max_ms=r.max_ms if r.HasField("max_ms") else None,
        )
    return ChatRequest(
        model=msg.model,
        messages=messages,
        provider=msg.provider,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        stop=list(msg.stop) if msg.stop else [],
        seed=msg.seed if msg.HasField("seed") else None,
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        policy=policy or "",
        retry=retry,
        cache_bypass=msg.cache == pb.CACHE_MODE_BYPASS,
        tags=dict(msg.tags) if msg.tags else {},
        request_id=msg.request_id,
        parallel_tool_calls=msg.parallel_tool_calls if msg.HasField("parallel_tool_calls") else None,
        prompt_cache_key=msg.prompt_cache_key,
        reasoning_effort=effort or "",
        extra_fields=extra_fields,
        thinking_budget=msg.reasoning.thinking_budget_tokens
        if msg.reasoning.HasField("thinking_budget_tokens")
        else None,
    )


def refused_request(msg: pb.ChatRequest | pb.StreamChatRequest, *, authenticated: bool) -> ChatRequest:
    """What the ledger keeps of a call refused before the engine took it: the requested model, the request
    id when it is a valid one (else the engine makes one up) and, for an authenticated caller, its tags
    (the engine's record bounds the model and the tags as for any call)."""
    tags = dict(msg.tags) if authenticated and msg.tags else {}
    return ChatRequest(model=msg.model, messages=[], tags=tags, request_id=usable_request_id(msg.request_id))


def thinking_delta(d: ThinkingDelta) -> pb.ChatDelta:
    return pb.ChatDelta(
        thinking=[pb.ThinkingDelta(index=d.index, text=d.text, signature=d.signature, redacted_data=d.redacted_data)]
    )


# The reply's sub-messages are filled in place, in the message gRPC serializes: building each one apart
# and passing it to a constructor copies it (the whole reply: 6.3 µs against 3.1 µs here).


def _set_usage(out: pb.TokenUsage, u: Usage) -> None:
    out.input_tokens = u.input_tokens
    out.output_tokens = u.output_tokens
    out.cached_input_tokens = u.cached_input_tokens
    out.cache_write_tokens = u.cache_write_tokens
    out.reasoning_tokens = u.reasoning_tokens
    out.web_search_requests = u.web_search_requests
    out.cache_write_1h_tokens = u.cache_write_1h_tokens
    out.audio_input_tokens = u.audio_input_tokens
    out.audio_output_tokens = u.audio_output_tokens


def _add_attempts(out: RepeatedCompositeFieldContainer[pb.Attempt], attempts: list[AttemptRecord]) -> None:
    for a in attempts:
        out.add(
            provider=a.provider,
            model=a.model,
            outcome=_OUTCOMES[a.outcome],
            error_reason=a.error_reason,
            duration_ms=a.duration_ms,
            http_status=a.http_status,
        )


def _set_upstream(out: pb.UpstreamReply, u: UpstreamReply) -> None:
    """Sets every field, so the message is present even when the provider said nothing."""
    out.id = u.id
    out.model = u.model
    out.system_fingerprint = u.system_fingerprint
    out.service_tier = u.service_tier
    out.stop_sequence = u.stop_sequence
    out.refusal = u.refusal


def chat_response(r: ChatResult) -> pb.ChatResponse:
    out = pb.ChatResponse(
        finish_reason=_FINISH[r.finish_reason],
        provider=r.provider,
        model=r.model,
        cost_nanos_usd=r.cost_nanos_usd,
        cached=r.cached,
        latency_ms=r.latency_ms,
        request_id=r.request_id,
        unpriced=r.unpriced,
        usage_estimated=r.usage_estimated,
    )
    message = out.message
    message.role = pb.ROLE_ASSISTANT
    message.content = r.content
    for c in r.tool_calls:
        message.tool_calls.add(id=c.id, name=c.name, arguments=c.arguments)
    for t in r.thinking:
        message.thinking.add(text=t.text, signature=t.signature, redacted_data=t.redacted_data)
    _set_usage(out.usage, r.usage)
    _add_attempts(out.attempts, r.attempts)
    _set_upstream(out.upstream, r.upstream)
    return out


def stream_end(r: StreamCompleted) -> pb.StreamEnd:
    out = pb.StreamEnd(
        finish_reason=_FINISH[r.finish_reason],
        cost_nanos_usd=r.cost_nanos_usd,
        latency_ms=r.latency_ms,
        time_to_first_token_ms=r.time_to_first_token_ms,
        usage_estimated=r.usage_estimated,
        unpriced=r.unpriced,
        cached=r.cached,
    )
    _set_usage(out.usage, r.usage)
    _add_attempts(out.attempts, r.attempts)
    _set_upstream(out.upstream, r.upstream)
    return out


# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
_INT64 = (-(2**63), 2**63 - 1)


def _ns(ts: Timestamp) -> int:
    """Nanoseconds since the epoch, held to int64 as the ledgers store them: a valid Timestamp before
    1677 or after 2262 means "from the beginning" or "until the end"."""
    return min(max(ts.seconds * 1_000_000_000 + ts.nanos, _INT64[0]), _INT64[1])


def _timestamp_violation(name: str, ts: Timestamp) -> FieldViolation | None:
    if not _TIMESTAMP_SECONDS[0] <= ts.seconds <= _TIMESTAMP_SECONDS[1]:
        return FieldViolation(name, "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
    if not 0 <= ts.nanos <= 999_999_999:
        return FieldViolation(f"{name}.nanos", "must be between 0 and 999,999,999")
    return None


def usage_query(msg: pb.UsageRequest, tenant: str) -> UsageQuery:
    bad: list[FieldViolation] = []
    group_by: list[GroupBy] = []
    for i, g in enumerate(msg.group_by):
        dim = _GROUP_BY.get(g)
        if dim is None:
            bad.append(FieldViolation(f"group_by[{i}]", "must be a USAGE_GROUP_BY_* value other than UNSPECIFIED"))
        elif dim in group_by:
            bad.append(FieldViolation(f"group_by[{i}]", "is repeated"))
        else:
            group_by.append(dim)
    if GroupBy.HOUR in group_by and GroupBy.DAY in group_by:
        bad.append(FieldViolation("group_by", "group by USAGE_GROUP_BY_HOUR or USAGE_GROUP_BY_DAY, not both"))
    if GroupBy.TAG in group_by and not msg.tag_key:
        bad.append(FieldViolation("tag_key", "is required when grouping by USAGE_GROUP_BY_TAG"))
    times = [(n, getattr(msg, n)) for n in ("start_time", "end_time") if msg.HasField(n)]
    wrong = [v for v in (_timestamp_violation(n, ts) for n, ts in times) if v is not None]
    bad += wrong
    start, end = msg.start_time, msg.end_time
    if len(times) == 2 and not wrong and (end.seconds, end.nanos) <= (start.seconds, start.nanos):
        bad.append(FieldViolation("end_time", "must be after start_time"))
    if msg.page_size < 0:
        bad.append(FieldViolation("page_size", "must not be negative (0 means the default)"))
    if bad:
        raise InvalidRequest(bad)
    query = UsageQuery(
        start_ns=_ns(msg.start_time) if msg.HasField("start_time") else None,
        end_ns=_ns(msg.end_time) if msg.HasField("end_time") else None,
        group_by=group_by,
        tenant=tenant,
        provider=msg.provider,
        model=msg.model,
        tag_key=msg.tag_key,
        tags=dict(msg.tags) if msg.tags else {},
    )
    if group_by:  # without grouping the reply is one total: nothing to page
        query.page_size = usage_pages.page_size(msg.page_size)
        query.after = usage_pages.page_start(msg.page_token, query)
    return query


def _row(t: UsageTotals) -> pb.UsageRow:
    row = pb.UsageRow(
        tenant=t.tenant,
        provider=t.provider,
        model=t.model,
        tag_value=t.tag_value,
        request_count=t.request_count,
        ok_count=t.ok_count,
        error_count=t.error_count,
        cancelled_count=t.cancelled_count,
        cached_count=t.cached_count,
        input_tokens=t.input_tokens,
        output_tokens=t.output_tokens,
        cached_input_tokens=t.cached_input_tokens,
        cost_nanos_usd=t.cost_nanos_usd,
        estimated_count=t.estimated_count,
        cache_write_tokens=t.cache_write_tokens,
        reasoning_tokens=t.reasoning_tokens,
        web_search_requests=t.web_search_requests,
        cache_write_1h_tokens=t.cache_write_1h_tokens,
        audio_input_tokens=t.audio_input_tokens,
        audio_output_tokens=t.audio_output_tokens,
    )
    if t.bucket_start_ns is not None:
        row.bucket_start_time.FromNanoseconds(t.bucket_start_ns)
    return row


def usage_response(report: UsageReport, query: UsageQuery) -> pb.UsageResponse:
    return pb.UsageResponse(
        rows=[_row(r) for r in report.rows],
        total=_row(report.total),
        next_page_token=usage_pages.next_page_token(query, report),
    )


_CIRCUIT = {"closed": pb.CIRCUIT_STATE_CLOSED, "open": pb.CIRCUIT_STATE_OPEN, "half_open": pb.CIRCUIT_STATE_HALF_OPEN}


def model_info(v: ModelView) -> pb.ModelInfo:
    info = pb.ModelInfo(
        provider=v.provider,
        name=v.model.name,
        aliases=v.model.aliases,
        provider_type=v.provider_type,
        capabilities=v.model.capabilities,
        circuit_state=_CIRCUIT[v.circuit_state],
        latency_ms=v.latency_ms,
        max_connections=v.max_connections,
    )
    if (failure := v.last_failure) is not None:
        info.last_failure.reason = failure.reason
        info.last_failure.message = failure.message
        info.last_failure.http_status = failure.http_status
        info.last_failure.failure_time.FromNanoseconds(int(failure.time_s * 1e9))
    if v.model.price is not None:
        info.price.CopyFrom(_model_price(v.model.price))
    for tier, price in v.model.tier_prices:
        info.service_tier_prices[tier].CopyFrom(_model_price(price))
    if v.model.long_context is not None:
        info.long_context_above_input_tokens, long_price = v.model.long_context
        info.long_context_price.CopyFrom(_model_price(long_price))
    return info


def _model_price(price: Price) -> pb.ModelPrice:
    return pb.ModelPrice(
        input_nanos_usd_per_million=price.input,
        output_nanos_usd_per_million=price.output,
        cached_input_nanos_usd_per_million=price.cached_input,
        cache_write_nanos_usd_per_million=price.cache_write,
        web_search_nanos_usd_per_million=price.web_search,
        cache_write_1h_nanos_usd_per_million=_or(price.cache_write_1h, price.cache_write),
        audio_input_nanos_usd_per_million=_or(price.audio_input, price.input),
        audio_output_nanos_usd_per_million=_or(price.audio_output, price.output),
    )


def _or(price: int | None, default: int) -> int:
    return default if price is None else price
