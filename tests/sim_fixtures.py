"""Fixtures for tests that talk HTTP to the upstream simulator. Import the ones a test module uses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from feather_grpc.providers.http import new_session
from feather_grpc.providers.transport.client import HttpClient
from sim.upstream import UpstreamSimulator


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamSimulator]:
    """A fresh simulator on 127.0.0.1:<free port>; OpenAI base_url `upstream.url + "/v1"`."""
    async with UpstreamSimulator() as sim:
        yield sim


@pytest.fixture
async def http_session() -> AsyncIterator[HttpClient]:
    """The gateway's pooled session, as the engine creates it."""
    session = new_session()
    try:
        yield session
    finally:
        await session.close()
