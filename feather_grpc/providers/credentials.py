"""Short-lived credentials from the clouds' own SDKs (Entra tokens, AWS keys, Google ADC), kept off the loop.

The SDKs block: they read files, run CLI subprocesses and call metadata endpoints over HTTP. Each fetch
runs in a worker thread; every call shares the cached value until it is close to expiry, when one
refresh starts in the background while calls keep using the still valid one. Only a caller that finds
no valid value waits, and concurrent callers wait on the same fetch (one thread, one request to the
identity endpoint, however many calls arrive at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from feather_grpc.engine.errors import ProviderError
from feather_grpc.providers.http import safe_text

__all__ = ["EXTRAS", "CachedCredential", "missing_extra"]

T = TypeVar("T")
RETRY_AFTER_FAILURE_S = 10.0

# provider need -> (a module it imports, the extra that installs it)
EXTRAS = {
    "entra": ("azure.identity", "azure"),
    "bedrock": ("botocore", "bedrock"),
    "vertex": ("google.auth", "vertex"),
}


def missing_extra(need: str) -> str:
    """'' when the SDK for `need` is importable, else a one-line fix naming the extra that installs it."""
    module, extra = EXTRAS[need]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    return "" if found else f"pip install 'feather-grpc[{extra}]' (it provides {module})"


class CachedCredential(Generic[T]):
    """A value that `fetch()` returns with its expiry (Unix seconds; None: does not expire), fetched in a
    thread and reused until `refresh_before_s` before that expiry."""

    def __init__(
        self, provider: str, fetch: Callable[[], tuple[T, float | None]], *, refresh_before_s: float = 300.0
    ) -> None:
        self._provider = provider
        self._fetch = fetch
        self._refresh_before_s = refresh_before_s
        self._value: T | None = None
        self._expires: float | None = None
        self._task: asyncio.Task[tuple[T, float | None]] | None = None
        self._retry_at = 0.0  # a failed background refresh is tried again from then on
        self.fetches = 0  # how many fetches ran (tests and metrics)

    async def get(self) -> T:
        now = time.time()
        value = self._value
        if value is not None:
            if self._expires is None or now < self._expires - self._refresh_before_s:
                return value
            if now < self._expires - 5.0:  # still usable: refresh in the background, answer now
                if now >= self._retry_at:  # after a failed refresh, not at every call's pace
                    self._start()
                return value
        task = self._start()
        # shield: a cancelled caller must not cancel the fetch other callers are waiting on
        await asyncio.shield(task)
        assert self._value is not None
        return self._value

    def _start(self) -> asyncio.Task[tuple[T, float | None]]:
        if self._task is None:
            self.fetches += 1
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._task.add_done_callback(_retrieve)  # a background refresh nobody awaited may fail
        return self._task

    async def _run(self) -> tuple[T, float | None]:
        try:
            value, expires = await asyncio.to_thread(self._fetch)
        except Exception as e:
            self._retry_at = time.time() + RETRY_AFTER_FAILURE_S
            # The SDKs' messages say which sources they tried; they name no secret, but are made safe anyway.
            detail = safe_text(f"{type(e).__name__}: {e}", limit=200)
            raise ProviderError(
                "UPSTREAM_AUTH_FAILED", f"{self._provider}: could not get credentials: {detail}", retryable=False
            ) from None
        finally:
            self._task = None
        self._value, self._expires = value, expires
        return value, expires

    async def aclose(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()


def load(module: str) -> object:
    """Import an optional SDK module (call it in the worker thread: imports read files)."""
    return importlib.import_module(module)
