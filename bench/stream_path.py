"""CPU per streamed message of the gateway's own code, without gRPC: the StreamChat handler as the server
runs it (CallTracker's wrapper around the servicer, the engine, the OpenAI adapter, the SSE parser and the
own HTTP client) reading a real upstream process, each message serialized as gRPC would.

`bench/held_streams.py` measures the whole process, whose CPU per message is mostly gRPC's (its
`sendmsg` per message, its poller thread) and moves by 20-30% from run to run on a shared machine; this
isolates the part the gateway's code adds per message, so a cut of a few µs shows. The upstream is
held_streams' (`--role upstream`: one content chunk every `--interval` s, the same bytes), in its own
process; the streams run in this one, on uvloop, with the default observers of `serve` (metrics, call log)
and the SQLite ledger. Reported: this thread's CPU (time.thread_time) from the first stream's start to
the last one's end, per message the handler yielded (a call's start, end and settlement included, shared
by its `--chunks` messages).

    .venv/bin/python bench/stream_path.py --streams 200 --chunks 100 --interval 0.02 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


class HappyContext:
    """What the handlers ask of grpc.aio's ServicerContext on the happy path (unary_path uses it too)."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()


async def _run(streams: int, chunks: int, interval: float, rounds: int) -> list[float]:
    from held_streams import in_process_config, start_upstream

    from feather_grpc import config
    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
    from feather_grpc.server.app import GatewayServer, ServerOptions
    from feather_grpc.server.servicer import FeatherServicer

    logging.basicConfig(level=logging.WARNING)  # the call log's INFO lines are not written, as with LOG_LEVEL=warning
    upstream, port = await start_upstream(chunks, interval)
    doc = in_process_config(port, streams)
    cfg = config.resolve(config.parse_file_config(json.dumps(doc), "<stream_path>"), {}, "<stream_path>")
    server = GatewayServer(cfg, options=ServerOptions(metrics_port=0, call_log=True))
    await server.engine.start()
    server.tracker.inflight.setdefault("StreamChat", 0)  # what wrapping the method for gRPC does
    handler = server.tracker._stream("StreamChat", FeatherServicer(server.engine).StreamChat)
    serialize = pb.StreamChatResponse.SerializeToString
    request = pb.StreamChatRequest(model="held", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])

    async def one() -> int:
        n = 0
        async for out in handler(request, HappyContext()):
            serialize(out)
            n += 1
        return n

    results: list[float] = []
    try:
        await asyncio.gather(*(one() for _ in range(20)))  # warm-up: imports, caches, the pool
        for _ in range(rounds):
            cpu = time.thread_time()
            counts = await asyncio.gather(*(one() for _ in range(streams)))
            cpu = time.thread_time() - cpu
            results.append(cpu / sum(counts) * 1e6)
            print(f"{streams} streams, {sum(counts)} messages: {results[-1]:.2f} us/message", flush=True)
    finally:
        upstream.terminate()
        await upstream.wait()
        await server.engine.aclose()
        if server.assembly is not None:
            await server.assembly.aclose()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--chunks", type=int, default=100, help="content chunks per stream")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between two chunks of a stream")
    ap.add_argument("--rounds", type=int, default=3)
    opts = ap.parse_args()
    import uvloop

    results: Any = uvloop.run(_run(opts.streams, opts.chunks, opts.interval, opts.rounds))
    print(json.dumps({"us_per_message_median": round(statistics.median(results), 2), "rounds": results}))


if __name__ == "__main__":
    main()
