"""Upstream connection limits are per provider (providers.<name>.maxConnections, default 1000): one
provider's limit holds whoever else calls the same host, and the limit in force shows in ListModels,
the CLI's `models` and the metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from feather_grpc import config
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server.app import ServerOptions
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import user
from tests.ops_harness import eventually, running_server, sample, scrape

ENV = {"SIM_OPENAI_KEY": "sk-sim-limits"}


def provider(sim: UpstreamSimulator, model: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "openai",
        "apiKeyEnv": "SIM_OPENAI_KEY",
        "baseUrl": sim.url + "/v1",
        "models": [{"name": model, "inputPer1K": 0.03, "outputPer1K": 0.06}],
        **extra,
    }


async def test_a_provider_holds_its_own_connection_limit_and_shows_it() -> None:
    async with UpstreamSimulator() as sim:
        doc = {
            "ledger": {"type": "memory"},
            "cache": {"enabled": False},
            "providers": {"tight": provider(sim, "gpt-tight", maxConnections=2), "roomy": provider(sim, "gpt-roomy")},
        }
        options = ServerOptions(metrics_port=0, metrics_host="127.0.0.1")
        async with running_server(doc, ENV, options) as gw:
            sim.enqueue(*[Reply(content="one two three four", hang_after=2)] * 2)
            sim.default = Reply(content="roomy")
            streams = [
                gw.stub.StreamChat(pb.StreamChatRequest(model="gpt-tight", messages=[user(f"hold {i}")]))
                for i in range(4)
            ]
            readers = [asyncio.ensure_future(s.read()) for s in streams]
            await sim.wait_requests(2, timeout_s=10)
            engine = gw.server.engine
            await eventually(lambda: engine.upstream_connections("tight") == 2, what="two connections")
            # Two calls hold both of tight's connections; the others wait for one. The same host is still
            # reachable for another provider: its pool and its limit are its own.
            reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-roomy", messages=[user("hi")]), timeout=10)
            assert reply.message.content == "roomy"
            assert sim.received == 3 and engine.upstream_connections("tight") == 2

            listed = {m.name: m.max_connections for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
            assert listed == {"gpt-tight": 2, "gpt-roomy": 1000}
            assert gw.server.metrics_port is not None
            samples = scrape(gw.server.metrics_port)
            assert sample(samples, "feather_upstream_connections_limit", provider="tight") == 2
            assert sample(samples, "feather_upstream_connections_limit", provider="roomy") == 1000
            assert sample(samples, "feather_upstream_connections", provider="tight") == 2

            # A held call ends: a waiting one gets its connection. Which two calls hold the connections is
            # the gateway's order, not the list's: the holders are the streams whose first event arrived.
            await eventually(lambda: sum(r.done() for r in readers) == 2, what="two streams started")
            holder = next(i for i, r in enumerate(readers) if r.done())
            streams[holder].cancel()
            await sim.wait_requests(4, timeout_s=10)
            for s in streams:
                s.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


def test_max_connections_is_checked_and_defaults_to_1000() -> None:
    base: dict[str, Any] = {
        "providers": {"p": {"type": "openai", "apiKeyEnv": "K", "models": [{"name": "m", "inputPer1M": 1}]}}
    }
    base["providers"]["p"]["models"][0]["outputPer1M"] = 1
    cfg = config.resolve(config.parse_file_config(json.dumps(base), "<test>"), {"K": "sk"}, "<test>")
    assert cfg.providers[0].max_connections == 1000
    base["providers"]["p"]["maxConnections"] = 0
    with pytest.raises(config.ConfigError) as caught:
        config.parse_file_config(json.dumps(base), "<test>")
    assert "providers.p.maxConnections" in str(caught.value)
