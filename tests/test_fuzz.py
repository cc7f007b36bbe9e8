"""bench/fuzz.py's seeded run, small enough for every CI run: a real gateway in front of every simulator,
a few hundred odd requests over every RPC (raw malformed bytes too), some upstream replies odd as well."""

from __future__ import annotations

from bench.fuzz import METHODS, fuzz


async def test_a_seeded_fuzz_run_gets_no_internal_error_and_every_call_is_recorded_or_refused_with_a_reason() -> None:
    report = await fuzz(seed=20261207, requests=400, concurrency=16)
    # A finding is an INTERNAL or UNKNOWN status, an error without ErrorInfo that the gateway sent, trailers
    # a client cannot read, a call that outlived its deadline, or an ERROR log line with a traceback.
    assert report.findings == [], report.summary()
    assert report.requests == 400
    assert {m for m in report.by_method if not m.endswith("(raw)")} == set(METHODS)
    assert any(m.endswith("(raw)") for m in report.by_method)
    # The run reached both the upstreams (answers) and validation (refusals with field paths).
    assert report.codes["OK"] > 40 and report.reasons["INVALID_ARGUMENT INVALID_REQUEST"] > 40
    assert report.violations
    # Every Chat/StreamChat the gateway answered is in the ledger (refusals included), once per request_id
    # (some calls repeat an earlier call's); more records are calls whose caller's deadline passed first,
    # and hedges' own records.
    assert report.chat_answered > 100 and report.repeats > 0
    assert report.recorded >= report.chat_answered - report.repeats
