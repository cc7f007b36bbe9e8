"""Usage replies come in pages (AIP-158): the server grants a bounded `page_size` (default 1000, at most
2000), `next_page_token` leads to the next page and is empty on the last, the pages put together are the
whole answer with the same `total` on each, and a token is refused (INVALID_ARGUMENT on `page_token`) for
any other query. Each ledger pages the same way: SQLite, memory and Postgres."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from feather_grpc.core.ledger import GroupBy, UsageQuery, UsageRecord, UsageReport
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.state.memory_ledger import MemoryLedger
from feather_grpc.state.postgres_ledger import PostgresLedger
from feather_grpc.state.sqlite_ledger import SqliteLedger
from tests.gateway_harness import MOCK_CONFIG, rich_error, running_gateway
from tests.pg_server import PgServer

T0 = 1_735_776_000 * 10**9  # 2025-01-02T00:00:00Z
HOUR = 3_600 * 10**9
GROUPS = 2_500  # distinct tag values: three default pages
_databases = itertools.count()


def records(count: int) -> list[UsageRecord]:
    # Tag values that sort differently as text than as numbers, some non-ASCII, over several hours.
    return [
        UsageRecord(
            request_id=f"r{i}",
            time_ns=T0 + (i % 5) * HOUR,
            tenant=("acme", "globex")[i % 2],
            model=("m-a", "m-b", "m-ü")[i % 3],
            cost_nanos_usd=1_000 + i,
            input_tokens=i,
            tags={"job": f"job-{i % GROUPS}-é"},
        )
        for i in range(count)
    ]


async def fill(ledger: Any, rows: list[UsageRecord]) -> None:
    for start in range(0, len(rows), 500):
        await asyncio.gather(*(ledger.record(r) for r in rows[start : start + 500]))


async def all_pages(ledger: Any, query: UsageQuery) -> tuple[list[UsageReport], UsageReport, int]:
    """Every page of the query (page size: a quarter of the rows, and then some), the whole report in one
    reply, and the page size."""
    whole = await ledger.query(query)
    size = max(2, len(whole.rows) // 4)
    pages = []
    after = None
    while True:
        report = await ledger.query(dataclasses.replace(query, page_size=size, after=after))
        pages.append(report)
        if not report.more:
            return pages, whole, size
        last = report.rows[-1]
        after = tuple(
            {"tenant": last.tenant, "model": last.model, "tag": last.tag_value}.get(str(g), last.bucket_start_ns)
            for g in query.group_by
        )


@pytest.fixture(scope="module")
def pg() -> Any:
    with PgServer() as server:
        yield server


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "memory":
        store: Any = MemoryLedger()
    elif request.param == "sqlite":
        store = await SqliteLedger.open(tmp_path / "usage.db")
    else:
        dsn = request.getfixturevalue("pg").create_database(f"pages_{os.getpid()}_{next(_databases)}")
        store = await PostgresLedger.open(dsn, tmp_path / "spool.db")
    await fill(store, records(1_200))
    if isinstance(store, PostgresLedger):
        assert await store.flushed(30)
    yield store
    await store.aclose()


@pytest.mark.parametrize(
    "group_by",
    [[GroupBy.TAG], [GroupBy.TENANT, GroupBy.MODEL, GroupBy.HOUR], [GroupBy.MODEL, GroupBy.TAG, GroupBy.TENANT]],
)
async def test_pages_put_together_are_the_whole_report(ledger: Any, group_by: list[GroupBy]) -> None:
    query = UsageQuery(group_by=group_by, tag_key="job")
    pages, whole, size = await all_pages(ledger, query)
    assert [row for p in pages for row in p.rows] == whole.rows
    assert all(p.total == whole.total for p in pages)  # the total of every page, not of the page
    assert all(len(p.rows) == size for p in pages[:-1]) and 0 < len(pages[-1].rows) <= size
    assert len(pages) == -(-len(whole.rows) // size) >= 4


async def test_a_page_keeps_the_query_filters(ledger: Any) -> None:
    query = UsageQuery(group_by=[GroupBy.TAG], tag_key="job", tenant="acme", model="m-ü", start_ns=T0 + HOUR)
    pages, whole, _ = await all_pages(ledger, query)
    assert [row for p in pages for row in p.rows] == whole.rows
    assert len(pages) > 1 and whole.rows and whole.total.request_count == sum(r.request_count for r in whole.rows)


ADMIN_KEY, ACME_KEY = "fk_pages_admin", "fk_pages_acme"
ADMIN, ACME = (("authorization", f"Bearer {ADMIN_KEY}"),), (("authorization", f"Bearer {ACME_KEY}"),)


def _tenants_doc(tmp_path: Path) -> dict[str, Any]:
    def digest(key: str) -> str:
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()

    doc = copy.deepcopy(MOCK_CONFIG)
    doc["ledger"] = {"type": "sqlite", "path": str(tmp_path / "usage.db")}
    doc["tenants"] = {"ops": {"keys": [digest(ADMIN_KEY)], "role": "admin"}, "acme": {"keys": [digest(ACME_KEY)]}}
    return doc


async def test_usage_over_grpc_pages_with_tokens_and_refuses_another_querys_token(tmp_path: Path) -> None:
    async with running_gateway(_tenants_doc(tmp_path)) as gw:
        await fill(gw.server.engine.ledger, records(GROUPS + 10))
        by_job = pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job")

        rows: list[pb.UsageRow] = []
        totals = []
        token = ""
        sizes = []
        while True:
            request = copy.deepcopy(by_job)
            request.page_token = token
            reply = await gw.stub.Usage(request, metadata=ADMIN)
            rows.extend(reply.rows)
            totals.append(reply.total)
            sizes.append(len(reply.rows))
            token = reply.next_page_token
            if not token:
                break
        assert sizes == [1000, 1000, 500]  # the documented default
        assert len({r.tag_value for r in rows}) == GROUPS == len(rows)
        assert [r.tag_value for r in rows] == sorted(r.tag_value for r in rows)
        assert all(t == totals[0] for t in totals) and totals[0].request_count == GROUPS + 10
        assert sum(r.request_count for r in rows) == GROUPS + 10

        capped = await gw.stub.Usage(
            pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job", page_size=10**6), metadata=ADMIN
        )
        assert len(capped.rows) == 2000 and capped.next_page_token
        # page_size may change between pages: the token carries only where the next page starts.
        rest = await gw.stub.Usage(
            pb.UsageRequest(
                group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job", page_size=5, page_token=capped.next_page_token
            ),
            metadata=ADMIN,
        )
        assert [r.tag_value for r in rest.rows] == [r.tag_value for r in rows[2000:2005]]
        ungrouped = await gw.stub.Usage(pb.UsageRequest(page_size=1), metadata=ADMIN)
        assert ungrouped.total.request_count == GROUPS + 10 and not ungrouped.next_page_token

        first = await gw.stub.Usage(
            pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job", page_size=3), metadata=ADMIN
        )
        others = [
            (pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job", model="mock-fast"), ADMIN),
            (pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="other"), ADMIN),
            (pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG, pb.USAGE_GROUP_BY_HOUR], tag_key="job"), ADMIN),
            (pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job", tenant="acme"), ADMIN),
            # The same request from a member: its query is its own tenant's, so the admin's token is not for it.
            (pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job"), ACME),
        ]
        for other, caller in others:
            other.page_token = first.next_page_token
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Usage(other, metadata=caller)
            error = rich_error(caught.value)
            assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
            assert [field for field, _ in error.violations] == ["page_token"]
        for garbage in ("not-a-token", first.next_page_token[:-4], "x" * 40_000, "eyJ2IjoxfQ"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Usage(
                    pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job", page_token=garbage), metadata=ADMIN
                )
            assert rich_error(caught.value).violations[0][0] == "page_token"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Usage(
                pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job", page_size=-1), metadata=ADMIN
            )
        assert rich_error(caught.value).violations[0][0] == "page_size"


@pytest.mark.parametrize(
    ("group_by", "after"),
    [
        ([pb.USAGE_GROUP_BY_TAG], ["\ud800"]),  # JSON spells a lone surrogate; UTF-8 cannot encode it
        ([pb.USAGE_GROUP_BY_HOUR], [10**30]),  # past SQLite's and Postgres's 64-bit integers
        ([pb.USAGE_GROUP_BY_HOUR], [-(2**63) - 1]),
    ],
)
async def test_a_token_edited_to_hold_what_the_database_cannot_take_is_invalid(
    tmp_path: Path, group_by: list[pb.UsageGroupBy.ValueType], after: list[Any]
) -> None:
    """Found by bench/fuzz.py: a token is unsigned JSON, and these values in it reached SQLite and failed the
    call with INTERNAL (UnicodeEncodeError, OverflowError)."""
    async with running_gateway(_tenants_doc(tmp_path)) as gw:
        await fill(gw.server.engine.ledger, records(40))
        query = pb.UsageRequest(group_by=group_by, tag_key="job", page_size=1)
        token = (await gw.stub.Usage(query, metadata=ADMIN)).next_page_token
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        body["after"] = after
        query.page_token = base64.urlsafe_b64encode(json.dumps(body).encode()).decode()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Usage(query, metadata=ADMIN)
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert [field for field, _ in error.violations] == ["page_token"]


async def test_the_python_client_and_the_cli_follow_the_pages(tmp_path: Path) -> None:
    from feather_client import FeatherClient

    async with running_gateway(_tenants_doc(tmp_path)) as gw:
        await fill(gw.server.engine.ledger, records(GROUPS))
        async with FeatherClient(gw.address, api_key=ADMIN_KEY) as client:
            first = await client.usage(group_by=["tag"], tag_key="job", page_size=2)
            second = await client.usage(group_by=["tag"], tag_key="job", page_size=2, page_token=first.next_page_token)
        assert len(first.rows) == len(second.rows) == 2 and second.next_page_token
        assert first.rows[-1].tag_value < second.rows[0].tag_value

        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "feather_grpc.cli",
            "usage",
            "--group-by",
            "tag",
            "--tag-key",
            "job",
            "--json",
            "--addr",
            gw.address,
            env={**os.environ, "FEATHER_API_KEY": ADMIN_KEY},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 0, err.decode()
    document = json.loads(out)
    assert len(document["rows"]) == GROUPS  # three pages, put together
    assert document["total"]["requests"] == GROUPS == sum(r["requests"] for r in document["rows"])
