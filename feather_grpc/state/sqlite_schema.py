"""The SqliteLedger file's schema: the `usage_records` table, its versions and their migration.

The version is `PRAGMA user_version`. A file is brought to SCHEMA_VERSION when a writer opens it,
inside one BEGIN IMMEDIATE transaction, so several processes opening one file together are safe.
v2 added the `billed` flag (a v1 file's rows are ranked by the billing rule, ledger_rows, in one
UPDATE), v3 the web search and 1-hour cache write counts, v4 the audio token counts.
"""

from __future__ import annotations

import contextlib
import sqlite3

from feather_grpc.state.ledger_rows import SUCCESS_SQL

SCHEMA_VERSION = 4  # PRAGMA user_version; bump with a migration step in _MIGRATIONS
MIN_SQLITE_VERSION = (3, 37, 0)  # STRICT tables

_SCHEMA_V1 = """
CREATE TABLE usage_records (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    requested_model TEXT NOT NULL,
    outcome TEXT NOT NULL,
    error_code TEXT NOT NULL,
    error_reason TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost_nanos_usd INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    unpriced INTEGER NOT NULL,
    streamed INTEGER NOT NULL,
    attempt_count INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    tags TEXT NOT NULL
) STRICT;
CREATE INDEX usage_records_time ON usage_records (time_ns);
"""

# v2: the `billed` flag. Every v1 row becomes billed unless it loses to another record of its
# request under the billing rule (in one statement: rank each request's records, unbill all but
# the first).
_SCHEMA_V2 = f"""
ALTER TABLE usage_records ADD COLUMN billed INTEGER NOT NULL DEFAULT 1;
UPDATE usage_records SET billed = 0 WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
            PARTITION BY tenant, request_id
            ORDER BY outcome NOT IN {SUCCESS_SQL}, time_ns, id
        ) AS place
        FROM usage_records WHERE request_id <> ''
    ) WHERE place > 1
);
CREATE UNIQUE INDEX usage_records_billed_request ON usage_records (tenant, request_id)
    WHERE billed AND request_id <> '';
"""
# v3: server-side web searches and 1-hour cache writes (0 for the records written before).
_SCHEMA_V3 = """
ALTER TABLE usage_records ADD COLUMN web_search_requests INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
"""
# v4: audio tokens (0 for the records written before).
_SCHEMA_V4 = """
ALTER TABLE usage_records ADD COLUMN audio_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN audio_output_tokens INTEGER NOT NULL DEFAULT 0;
"""
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4}


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; safe when several processes open the file at once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"usage ledger schema version {version} is newer than this build ({SCHEMA_VERSION})")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step].split(";"):
                if statement.strip():
                    conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise


def is_busy(exc: sqlite3.OperationalError) -> bool:
    code: int = getattr(exc, "sqlite_errorcode", 0)  # set on errors SQLite itself raised
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # primary code of extended ones too


def rollback_quietly(conn: sqlite3.Connection) -> None:
    # The original error is the one to report; a failed rollback adds nothing.
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")
