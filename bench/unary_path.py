"""CPU per unary Chat call of the gateway's own code, without gRPC, next to the floor's: the Chat handler as
the server runs it (CallTracker's wrapper around the servicer, the engine, the OpenAI adapter, the own HTTP
client, the SQLite ledger, the metrics and call-log observers) driven in this process against the
benchmark's nginx, and `bench/floor.py`'s proxy handler (aiohttp POST, orjson, the reply built) driven the
same way. The unary counterpart of `bench/stream_path.py`.

`bench/run.py --compare floor` measures whole processes, whose CPU per call is mostly gRPC's and moves
by 10-20% from round to round here; this isolates what the gateway's code adds per call (issue 14 item 5),
so a cut of a few µs shows. Both run on uvloop with the collector tuned as `serve` tunes it. Reported per
round: this thread's CPU per call (time.thread_time over the round) and the young collections per 1,000
calls. The arms alternate round by round.

`--variants` adds the gateway again with one part off (the memory ledger instead of SQLite, no metrics or
call log, no breakers or retries), each its own engine in this process, and reports what the part costs
per call: the gateway minus the variant, round by round. The machine's speed drifts by ±20% over
seconds here, so short rounds (`--calls 1024 --rounds 50`) pair the arms closer in time.

    .venv/bin/python bench/unary_path.py [--concurrency 64] [--calls 5000] [--rounds 10]   # ~40 s
    .venv/bin/python bench/unary_path.py --variants memory-ledger,no-observers,no-resilience \
        --calls 1024 --rounds 50                                                           # ~90 s
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import floor  # noqa: E402
import upstream  # noqa: E402
from run import gateway_config, resilience_off_config  # noqa: E402
from stream_path import HappyContext  # noqa: E402

Handler = Callable[[Any, Any], Awaitable[Any]]


async def _drive(handler: Handler, concurrency: int, calls: int) -> tuple[float, int]:
    """`calls` calls, `concurrency` at a time, each request parsed and each reply serialized as gRPC
    would; this thread's CPU per call (µs) and the young collections meanwhile."""
    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb

    raw = pb.ChatRequest(
        model=upstream.MODEL_CHAT, messages=[pb.Message(role=pb.ROLE_USER, content=upstream.PROMPT)]
    ).SerializeToString()

    async def worker(n: int) -> None:
        for _ in range(n):
            reply = await handler(pb.ChatRequest.FromString(raw), HappyContext())
            reply.SerializeToString()

    young = gc.get_stats()[0]["collections"]
    cpu = time.thread_time()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    cpu = time.thread_time() - cpu
    done = calls // concurrency * concurrency
    return cpu / done * 1e6, gc.get_stats()[0]["collections"] - young


# --variants: the gateway again with one part off, to read each part's cost off the difference
VARIANTS = ("memory-ledger", "no-observers", "no-resilience")


async def _run(args: argparse.Namespace) -> dict[str, list[float]]:
    from feather_grpc import config
    from feather_grpc.server.app import GatewayServer, ServerOptions
    from feather_grpc.server.memory import tune_garbage_collector
    from feather_grpc.server.servicer import FeatherServicer

    logging.basicConfig(level=logging.ERROR)  # the call log is formatted; its INFO lines are not written
    with tempfile.TemporaryDirectory(prefix="unary-path-") as t:
        tmp = Path(t)
        nginx = upstream.Nginx(upstream.free_port(), tmp / "nginx").start()
        servers: list[GatewayServer] = []
        proxy = floor.Proxy(nginx.url)
        try:

            async def gateway(name: str, doc: dict[str, Any], observers: bool = True) -> Handler:
                cfg = config.resolve(config.parse_file_config(json.dumps(doc), name), {}, name)
                options = ServerOptions(metrics_port=0, call_log=True) if observers else ServerOptions()
                server = GatewayServer(cfg, options=options)
                servers.append(server)
                await server.engine.start()
                server.tracker.inflight.setdefault("Chat", 0)  # what wrapping the method for gRPC does
                return server.tracker._unary("Chat", FeatherServicer(server.engine).Chat)

            def doc(ledger: str, name: str) -> dict[str, Any]:
                return gateway_config(nginx.url, ledger, tmp / f"{name}.db")

            arms: dict[str, Handler] = {"gateway": await gateway("gateway", doc("sqlite", "gateway"))}
            for name in args.variants:
                if name == "memory-ledger":
                    arms[name] = await gateway(name, doc("memory", name))
                elif name == "no-observers":
                    arms[name] = await gateway(name, doc("sqlite", name), observers=False)
                else:
                    arms[name] = await gateway(name, resilience_off_config(doc("sqlite", name)))
            arms["floor"] = proxy.Chat
            for handler in arms.values():  # warm-up: imports, caches, the pools
                await _drive(handler, args.concurrency, 20 * args.concurrency)
            tune_garbage_collector()
            results: dict[str, list[float]] = {name: [] for name in arms}
            names = list(arms)
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:  # each arm first in turn
                    us, young = await _drive(arms[name], args.concurrency, args.calls)
                    results[name].append(us)
                    per_1000 = young / args.calls * 1000
                    print(f"round {r} {name:<14} {us:7.1f} us/call, {per_1000:5.1f} young collections per 1,000 calls")
            return results
        finally:
            await proxy.session().close()
            for server in servers:
                await server.engine.aclose()
                if server.assembly is not None:
                    await server.assembly.aclose()
            nginx.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--calls", type=int, default=5_000, help="calls per arm per round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--variants",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help=f"also the gateway with a part off, comma-separated: {', '.join(VARIANTS)}",
    )
    args = ap.parse_args()
    if unknown := set(args.variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    import uvloop

    results = uvloop.run(_run(args))
    gw, fl = results["gateway"], results["floor"]
    ratios = [g / f for g, f in zip(gw, fl, strict=True)]
    added = [g - f for g, f in zip(gw, fl, strict=True)]
    summary: dict[str, Any] = {
        "concurrency": args.concurrency,
        "gateway_us_per_call_median": round(statistics.median(gw), 1),
        "floor_us_per_call_median": round(statistics.median(fl), 1),
        "gateway_added_us_per_call_median": round(statistics.median(added), 1),
        "gateway_over_floor_median": round(statistics.median(ratios), 3),
        "gateway_over_floor_per_round": [round(x, 3) for x in ratios],
    }
    for name in args.variants:  # what the part costs: the gateway minus the variant, round by round
        saved = [g - v for g, v in zip(gw, results[name], strict=True)]
        summary[f"{name}_saves_us_per_call_median"] = round(statistics.median(saved), 1)
        summary[f"{name}_saves_us_per_call_per_round"] = [round(x, 1) for x in saved]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
