"""PostgresLedger's schema: the `feather_usage` table, its versions and their migration.

Created or migrated at start (and by the shipper, if Postgres was down at start) under an advisory
lock, so replicas starting together are safe; the version is in `feather_schema_version`. Time is
BIGINT nanoseconds, money and tokens are BIGINT, tags are JSONB, and grouping keys sort with
COLLATE "C" (code point order, as Python and SQLite sort). The columns are ledger_rows.COLUMNS, then
`billed`, after the record's spool identity `(spool_id, spool_seq)`.
"""

from __future__ import annotations

import asyncpg

from feather_grpc.core.ledger import Outcome
from feather_grpc.state import usage_math
from feather_grpc.state.ledger_rows import COLUMNS

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

SCHEMA_VERSION = 3
SCHEMA_COMPONENT = "usage_ledger"
TABLE = "feather_usage"
# pg_advisory_xact_lock(int, int) keys: its key space is separate from the bigint one used per request.
_MIGRATION_LOCK = (0x46454154, 1)  # "FEAT", 1

_OUTCOMES = ", ".join(f"'{o.value}'" for o in Outcome)
_TEXT_COLUMNS = frozenset(usage_math.STR_FIELDS) | {"outcome", "tags"}
BOOL_COLUMNS = frozenset(usage_math.BOOL_FIELDS)
_KEY_COLUMNS = frozenset({"request_id", "tenant", "provider", "model"})


def pg_type(column: str) -> str:
    """The Postgres type of a column of ledger_rows.COLUMNS."""
    if column in BOOL_COLUMNS:
        return "boolean"
    if column in _TEXT_COLUMNS:
        return "text"
    return "bigint"


# Columns added after v1, by the version that added them: v2 server-side web searches and 1-hour cache
# writes, v3 audio tokens.
_ADDED_COLUMNS = {
    2: ("web_search_requests", "cache_write_1h_tokens"),
    3: ("audio_input_tokens", "audio_output_tokens"),
}
_LATER_COLUMNS = frozenset(c for columns in _ADDED_COLUMNS.values() for c in columns)


def _column_ddl(column: str) -> str:
    if column == "tags":
        return "tags jsonb NOT NULL"
    if column == "outcome":
        return f"outcome text NOT NULL CHECK (outcome IN ({_OUTCOMES}))"
    collate = ' COLLATE "C"' if column in _KEY_COLUMNS else ""
    # Columns added after v1 default to 0, as their migration gives them: a replica of the release before
    # them still writes to a table a newer one created.
    default = " DEFAULT 0" if column in _LATER_COLUMNS else ""
    return f"{column} {pg_type(column)}{collate} NOT NULL{default}"


_SCHEMA_V1 = [
    f"""CREATE TABLE {TABLE} (
    spool_id uuid NOT NULL,
    spool_seq bigint NOT NULL,
    {", ".join(_column_ddl(c) for c in COLUMNS)},
    billed boolean NOT NULL,
    shipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (spool_id, spool_seq)
)""",
    # At most one billed record per (tenant, request_id): double billing is a constraint violation.
    f"CREATE UNIQUE INDEX {TABLE}_billed_request ON {TABLE} (tenant, request_id) WHERE billed AND request_id <> ''",
    f"CREATE INDEX {TABLE}_time ON {TABLE} (time_ns) WHERE billed",
    f"CREATE INDEX {TABLE}_tenant_time ON {TABLE} (tenant, time_ns) WHERE billed",
]
# Later versions add their columns. IF NOT EXISTS: v1 above makes today's COLUMNS.
_MIGRATIONS: dict[int, list[str]] = {
    1: _SCHEMA_V1,
    **{
        version: [f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {c} bigint NOT NULL DEFAULT 0" for c in columns]
        for version, columns in _ADDED_COLUMNS.items()
    },
}


async def migrate(conn: Connection) -> int:
    """Bring the schema to SCHEMA_VERSION under an advisory lock; returns the version found."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *_MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS feather_schema_version (component text PRIMARY KEY, version integer NOT NULL)"
        )
        found = await conn.fetchval("SELECT version FROM feather_schema_version WHERE component = $1", SCHEMA_COMPONENT)
        version = 0 if found is None else int(found)
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"usage ledger schema version {version} in Postgres is newer than this build ({SCHEMA_VERSION})"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                await conn.execute(statement)
        if version < SCHEMA_VERSION:
            await conn.execute(
                "INSERT INTO feather_schema_version (component, version) VALUES ($1, $2) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                SCHEMA_COMPONENT,
                SCHEMA_VERSION,
            )
        return version
