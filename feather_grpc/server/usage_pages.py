"""Pages of Usage replies (AIP-158): the page size the server grants, and opaque page tokens that carry
where the next page starts, tied to the query (the caller's tenant included) that made them."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json

from feather_grpc.engine.errors import FieldViolation, InvalidRequest
from feather_grpc.state import usage_math
from feather_grpc.state.ledger import UsageQuery, UsageReport

DEFAULT_PAGE_SIZE = 1000
# The largest page: 2000 rows of the longest names and tag values stay under gRPC's 4 MiB default.
MAX_PAGE_SIZE = 2000
# A token longer than any the server makes is refused before it is decoded.
_MAX_TOKEN_CHARS = 32 * 1024
_VERSION = 1


def page_size(requested: int) -> int:
    """0 means the default; more than the maximum is lowered to it (AIP-158). Negative is refused earlier,
    with the request's other violations."""
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def next_page_token(query: UsageQuery, report: UsageReport) -> str:
    """The token for the page after this report's, or "" when it is the last."""
    if not report.more or not report.rows:
        return ""
    body = {"v": _VERSION, "q": _fingerprint(query), "after": list(usage_math.row_key(query.group_by, report.rows[-1]))}
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_start(token: str, query: UsageQuery) -> tuple[str | int, ...] | None:
    """Where the page asked for with `token` starts (None: the first page). Raises InvalidRequest on
    `page_token` for anything but a token this server made for this same query."""
    if not token:
        return None
    try:
        if len(token) > _MAX_TOKEN_CHARS:
            raise ValueError("too long")
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(body, dict) or not isinstance(body.get("after"), list):
            raise ValueError("not a page token")
        if body.get("v") != _VERSION or body.get("q") != _fingerprint(query):
            raise ValueError("not this query's")
        after = tuple(body["after"])
        usage_math.check_query(dataclasses.replace(query, after=after))  # one value of the right type per key
    except (ValueError, binascii.Error):  # json's and base64's errors, UnicodeDecodeError: ValueErrors
        why = "is not a next_page_token of this same query (every other field but page_size must be unchanged)"
        raise InvalidRequest([FieldViolation("page_token", why)]) from None
    return after


def _fingerprint(query: UsageQuery) -> str:
    """What a token is tied to: every field of the query but the page itself."""
    fields = [
        query.start_ns,
        query.end_ns,
        [str(g) for g in query.group_by],
        query.tenant,
        query.provider,
        query.model,
        query.tag_key,
        sorted(query.tags.items()),
    ]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()[:32]
