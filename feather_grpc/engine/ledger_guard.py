"""LedgerGuard: whether the usage ledger can write. While it cannot, calls are refused before they reach an
upstream (what they cost could not be recorded); a failed record or probe says it cannot, a write that
commits says it can again. Each change is one log line."""

from __future__ import annotations

import logging

from feather_grpc.core.errors import LedgerUnavailable
from feather_grpc.core.ledger import LedgerWriteError, UsageLedger

log = logging.getLogger(__name__)

# What RetryInfo tells a refused caller: about the time the server takes to see the ledger write again.
RETRY_AFTER_S = 2.0


class LedgerGuard:
    def __init__(self, ledger: UsageLedger) -> None:
        self._ledger = ledger
        self.fault = ""  # why the ledger cannot write; "" while it can
        self.writes = 0  # records and probes committed so far

    @property
    def writable(self) -> bool:
        return not self.fault

    def check(self) -> None:
        """Raises LedgerUnavailable while the ledger cannot write."""
        if self.fault:
            raise LedgerUnavailable(f"the usage ledger cannot write ({self.fault}); retry shortly", RETRY_AFTER_S)

    def failed(self, error: LedgerWriteError) -> LedgerUnavailable:
        """Notes a failed write; returns the error to give the caller whose record it was."""
        if not self.fault:
            log.error("usage ledger UNWRITABLE (%s): refusing calls until it can write again", error)
        self.fault = str(error) or type(error).__name__
        return LedgerUnavailable(f"the usage ledger cannot write ({self.fault}); retry shortly", RETRY_AFTER_S)

    def succeeded(self) -> None:
        self.writes += 1
        if self.fault:
            self.fault = ""
            log.warning("usage ledger writable again: serving calls")

    async def probe(self) -> bool:
        """Writes a probe to the ledger and updates the state from the outcome; returns whether it can write."""
        try:
            await self._ledger.probe()
        except LedgerWriteError as e:
            self.failed(e)
            return False
        except Exception as e:  # whatever else stops a write stops the records too
            self.failed(LedgerWriteError(f"{type(e).__name__}: {e}"))
            return False
        self.succeeded()
        return True
