"""Request validation: every problem reported at once, each with its field path."""

from __future__ import annotations

import math
from collections.abc import Callable

from feather_grpc.config import InputLimits
from feather_grpc.core.errors import FieldViolation, InvalidRequest
from feather_grpc.core.types import ChatRequest, Message, PartKind, Role, owned_fields
from feather_grpc.engine.routing import POLICIES

MAX_STOP_SEQUENCES = 4
MAX_REQUEST_ID_LENGTH = 128
MAX_NAME_LENGTH = 256  # model and provider: a name longer than any configured one cannot resolve
MAX_TAGS = 64  # tags go into every ledger record and call-log line: bounded, like the rest of a record
MAX_TAG_KEY_LENGTH = 128
MAX_TAG_VALUE_LENGTH = 512
_DEFAULT_LIMITS = InputLimits()
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")  # what both providers take
DOCUMENT_MEDIA_TYPE = "application/pdf"
AUDIO_FORMATS = ("wav", "mp3")
MAX_URL_LENGTH = 8192
MAX_CACHE_BREAKPOINTS = 4  # Anthropic's limit per request
MAX_PROMPT_CACHE_KEY_LENGTH = 256
MIN_THINKING_BUDGET = 1024  # Anthropic's minimum budget_tokens
# The part kinds each role may carry (which providers take them is routing's question).
_ROLE_PARTS = {
    Role.SYSTEM: frozenset({PartKind.TEXT}),
    Role.USER: frozenset(PartKind),
    Role.ASSISTANT: frozenset({PartKind.TEXT}),
    Role.TOOL: frozenset({PartKind.TEXT, PartKind.IMAGE, PartKind.DOCUMENT}),
}


def validate_chat(req: ChatRequest, limits: InputLimits = _DEFAULT_LIMITS) -> None:
    v: list[FieldViolation] = []

    def bad(field: str, why: str) -> None:
        v.append(FieldViolation(field, why))

    if not req.model.strip():
        bad("model", "must name a model, an alias or provider/model")
    elif len(req.model) > MAX_NAME_LENGTH:
        bad("model", f"at most {MAX_NAME_LENGTH} characters")
    if len(req.provider) > MAX_NAME_LENGTH:
        bad("provider", f"at most {MAX_NAME_LENGTH} characters")
    if not req.messages:
        bad("messages", "must contain at least one message")
    elif len(req.messages) > limits.max_messages:
        bad("messages", f"at most {limits.max_messages} messages")
    tool_call_ids: set[str] = set()
    for i, m in enumerate(req.messages):
        if m.role is Role.TOOL:
            if not m.tool_call_id:
                bad(f"messages[{i}].tool_call_id", "is required for a tool message")
        elif m.tool_call_id:
            bad(f"messages[{i}].tool_call_id", "is only allowed on tool messages")
        if m.thinking and m.role is not Role.ASSISTANT:
            bad(f"messages[{i}].thinking", "is only allowed on assistant messages")
        if m.is_error and m.role is not Role.TOOL:
            bad(f"messages[{i}].is_error", "is only allowed on tool messages")
        if m.tool_calls and m.role is not Role.ASSISTANT:
            bad(f"messages[{i}].tool_calls", "are only allowed on assistant messages")
        if m.parts:
            if m.content:
                bad(f"messages[{i}].parts", "use content or parts, not both")
            _check_parts(i, m, bad)
            if len(m.text) > limits.max_content_chars:
                bad(f"messages[{i}].parts", f"at most {limits.max_content_chars} characters of text")
        elif not m.content and not m.tool_calls and m.role is not Role.TOOL:
            bad(f"messages[{i}].content", "must not be empty")
        elif len(m.content) > limits.max_content_chars:
            bad(f"messages[{i}].content", f"at most {limits.max_content_chars} characters")
        for j, call in enumerate(m.tool_calls):
            if not call.id:
                bad(f"messages[{i}].tool_calls[{j}].id", "must not be empty")
            if not call.name:
                bad(f"messages[{i}].tool_calls[{j}].name", "must not be empty")
            tool_call_ids.add(call.id)
    if req.messages and all(m.role is Role.SYSTEM for m in req.messages):
        bad("messages", "must contain at least one non-system message")
    if req.max_tokens is not None and not 1 <= req.max_tokens <= limits.max_output_tokens:
        bad("max_tokens", f"must be between 1 and {limits.max_output_tokens}")
    if req.temperature is not None and not (math.isfinite(req.temperature) and 0 <= req.temperature <= 2):
        bad("temperature", "must be between 0 and 2")
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0 <= req.top_p <= 1):
        bad("top_p", "must be between 0 and 1")
    if len(req.stop) > MAX_STOP_SEQUENCES:
        bad("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    for i, s in enumerate(req.stop):
        if not s:
            bad(f"stop[{i}]", "must not be empty")
    names: set[str] = set()
    for i, t in enumerate(req.tools):
        if not t.name:
            bad(f"tools[{i}].name", "must not be empty")
        elif t.name in names:
            bad(f"tools[{i}].name", f"duplicates tool {t.name!r}")
        names.add(t.name)
    for i, t in enumerate(req.tools):
        if t.strict and t.parameters is None:
            bad(f"tools[{i}].parameters", "is required when strict is set")
    if req.tool_choice and req.tool_choice.function_name and req.tool_choice.function_name not in names:
        bad("tool_choice.function_name", "must name one of the request's tools")
    if req.response_format and req.response_format.type == "json_schema":
        if not req.response_format.json_schema:
            bad("response_format.json_schema", "is required for RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
        if not req.response_format.schema_name:
            bad("response_format.schema_name", "is required for RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
    if req.policy and req.policy not in POLICIES:
        bad("policy", f"must be one of {', '.join(POLICIES)}")
    if req.retry:
        if req.retry.max_attempts is not None and not 1 <= req.retry.max_attempts <= 10:
            bad("retry.max_attempts", "must be between 1 and 10")
        if req.retry.base_ms is not None and req.retry.base_ms < 0:
            bad("retry.base_ms", "must not be negative")
        if req.retry.max_ms is not None and req.retry.max_ms < 0:
            bad("retry.max_ms", "must not be negative")
    if req.thinking_budget is not None:
        if req.thinking_budget < MIN_THINKING_BUDGET:
            bad("reasoning.thinking_budget_tokens", f"must be at least {MIN_THINKING_BUDGET}")
        elif req.max_tokens is not None and req.max_tokens <= req.thinking_budget:
            bad("reasoning.thinking_budget_tokens", "must be less than max_tokens (which includes the thinking)")
        elif req.thinking_budget >= limits.max_output_tokens:
            limit = limits.max_output_tokens  # the output includes the thinking
            bad("reasoning.thinking_budget_tokens", f"must be less than {limit}, the output limit")
    if req.extra_fields:  # most calls have none, and the check costs ~2 µs
        for key in owned_fields(req.extra_fields):
            bad(f"extra_fields.{key}", "is set by the gateway and cannot be overridden")
    breakpoints = sum(m.cache_ttl is not None for m in req.messages)
    breakpoints += sum(p.cache_ttl is not None for m in req.messages for p in m.parts)
    breakpoints += sum(t.cache_ttl is not None for t in req.tools)
    if breakpoints > MAX_CACHE_BREAKPOINTS:
        bad("cache_breakpoint", f"at most {MAX_CACHE_BREAKPOINTS} cache breakpoints in a request ({breakpoints} given)")
    if len(req.prompt_cache_key) > MAX_PROMPT_CACHE_KEY_LENGTH:
        bad("prompt_cache_key", f"at most {MAX_PROMPT_CACHE_KEY_LENGTH} characters")
    if len(req.request_id) > MAX_REQUEST_ID_LENGTH:
        bad("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
    if len(req.tags) > MAX_TAGS:
        bad("tags", f"at most {MAX_TAGS} tags")
    bad_keys = sum(1 for k in req.tags if not 1 <= len(k) <= MAX_TAG_KEY_LENGTH)
    if bad_keys:  # counted, not quoted: the error must not echo what was too long
        bad("tags", f"keys must be 1 to {MAX_TAG_KEY_LENGTH} characters ({_how_many(bad_keys)} not)")
    long_values = sum(1 for value in req.tags.values() if len(value) > MAX_TAG_VALUE_LENGTH)
    if long_values:
        bad("tags", f"values must be at most {MAX_TAG_VALUE_LENGTH} characters ({_how_many(long_values)} longer)")
    if v:
        raise InvalidRequest(v)


def _check_parts(i: int, m: Message, bad: Callable[[str, str], None]) -> None:
    allowed = _ROLE_PARTS[m.role]
    for j, p in enumerate(m.parts):
        where = f"messages[{i}].parts[{j}]"
        if p.kind not in allowed:
            kinds = " and ".join(sorted(allowed))
            bad(where, f"a {m.role.value} message takes {kinds} parts, not {p.kind.value}")
            continue
        if p.kind is PartKind.TEXT:
            if not p.text:
                bad(f"{where}.text", "must not be empty")
        elif p.kind is PartKind.AUDIO:
            if not p.data:
                bad(f"{where}.audio.data", "is required")
            if p.media_type not in AUDIO_FORMATS:
                bad(f"{where}.audio.format", f"must be one of {', '.join(AUDIO_FORMATS)}")
        else:
            name = p.kind.value
            if not p.url and not p.data:
                bad(f"{where}.{name}", "needs a url or inline data")
            elif p.url and not (p.url.startswith(("https://", "http://")) and len(p.url) <= MAX_URL_LENGTH):
                bad(f"{where}.{name}.url", f"must be an http(s) URL of at most {MAX_URL_LENGTH} characters")
            if p.kind is PartKind.IMAGE and p.data and p.media_type not in IMAGE_MEDIA_TYPES:
                bad(f"{where}.image.media_type", f"must be one of {', '.join(IMAGE_MEDIA_TYPES)} with data")
            if p.kind is PartKind.DOCUMENT and p.media_type != DOCUMENT_MEDIA_TYPE:
                bad(f"{where}.document.media_type", f"must be {DOCUMENT_MEDIA_TYPE} (or unset)")


def _how_many(n: int) -> str:
    return "1 is" if n == 1 else f"{n} are"


# What a record and an error keep of a request that may be invalid: never more than the limits above.


def usable_request_id(request_id: str) -> str:
    """The caller's request id when it is within the limit, else "" (the engine then makes one up)."""
    return request_id if len(request_id) <= MAX_REQUEST_ID_LENGTH else ""


def bounded_tags(tags: dict[str, str]) -> dict[str, str]:
    """All the tags when they are within the limits, none when they are not (an invalid request's)."""
    if not tags:
        return tags
    if len(tags) <= MAX_TAGS and all(
        1 <= len(k) <= MAX_TAG_KEY_LENGTH and len(v) <= MAX_TAG_VALUE_LENGTH for k, v in tags.items()
    ):
        return tags
    return {}
