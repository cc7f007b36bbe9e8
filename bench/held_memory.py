"""Held streams' memory by source line: a tracemalloc diff of an in-process gateway, idle vs N held streams
vs after the load.

The gateway runs in this process (tracemalloc on, so several times slower: keep N in the hundreds), with
the held_streams upstream and holder processes (`bench/held_streams.py --role ...`). Snapshots: after a
warm-up (idle), once 95% of the streams are in flight (peak), and 3 s after they all ended (after), each
after a full collection. Prints the top lines of peak - idle and after - idle, and the bytes per stream.
What it sees is Python's allocations only: gRPC core's and the kernel's memory are in RSS, not here.

    .venv/bin/python bench/held_memory.py --streams 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
HELD = str(ROOT / "bench" / "held_streams.py")


async def _holder(address: str, prefix: str, count: int, ramp: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, HELD, "--role", "holder", "--address", address, "--prefix", prefix, "--count", str(count),
        "--ramp", str(ramp), "--per-channel", "100", stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _top(snap: tracemalloc.Snapshot, base: tracemalloc.Snapshot, streams: int, top: int) -> list[str]:
    stats = snap.compare_to(base, "lineno")
    total = sum(s.size_diff for s in stats)
    lines = [f"{total / 1024:.0f} KB, {total / streams:.0f} B per stream"]
    for s in stats[:top]:
        frame = s.traceback[0]
        where = frame.filename.replace(str(ROOT) + "/", "").replace(".venv/lib/python3.11/site-packages/", "")
        lines.append(f"{s.size_diff / 1024:9.1f} KB {s.count_diff:7d} objects  {where}:{frame.lineno}")
    return lines


async def main(streams: int, depth: int, top: int, chunks: int, ramp: float) -> None:
    from held_streams import in_process_config, start_upstream

    from feather_grpc import config
    from feather_grpc.server.app import GatewayServer

    upstream, port = await start_upstream(chunks, 0.2)
    doc = in_process_config(port, streams, timeoutMs=600_000)
    server = GatewayServer(config.resolve(config.parse_file_config(json.dumps(doc), "<held>"), {}, "<held>"))
    address = f"127.0.0.1:{await server.start('127.0.0.1', 0)}"
    warm = await _holder(address, "warm", 20, 0.5)  # the first calls' one-time costs (imports, caches, pool)
    await asyncio.sleep(3)
    with contextlib.suppress(ProcessLookupError):  # its streams may have ended already (a short --chunks)
        warm.terminate()
    await warm.wait()
    await asyncio.sleep(2)
    await asyncio.sleep(1)
    gc.collect()
    tracemalloc.start(depth)
    idle = tracemalloc.take_snapshot()
    half = streams // 2
    holders = [await _holder(address, "a", half, ramp), await _holder(address, "b", streams - half, ramp)]
    began = time.monotonic()
    # A gauge sampled, as a benchmark does: nothing to wait on.
    while server.tracker.total_inflight < 0.95 * streams and time.monotonic() - began < 300:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    held = server.tracker.total_inflight
    gc.collect()
    peak = tracemalloc.take_snapshot()
    await asyncio.gather(*(h.wait() for h in holders))
    await asyncio.sleep(3)
    gc.collect()
    after = tracemalloc.take_snapshot()
    print(f"== peak ({held} streams in flight) - idle:", *_top(peak, idle, max(held, 1), top), sep="\n")
    print("== after - idle:", *_top(after, idle, max(held, 1), top), sep="\n")
    await server.stop(1)
    upstream.terminate()
    await upstream.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--depth", type=int, default=5, help="tracemalloc frames kept per allocation")
    ap.add_argument("--top", type=int, default=20, help="source lines shown")
    ap.add_argument("--chunks", type=int, default=200, help="chunks per stream, every 0.2 s (outlast the ramp)")
    ap.add_argument("--ramp", type=float, default=15.0)
    opts = ap.parse_args()
    import uvloop

    uvloop.run(main(opts.streams, opts.depth, opts.top, opts.chunks, opts.ramp))
