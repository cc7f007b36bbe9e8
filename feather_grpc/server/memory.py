"""Gives memory back to the operating system once a burst of calls is over.

Thousands of held streams leave the process's heap fragmented: Python frees their objects, but glibc's
malloc keeps the freed pages, so RSS stays near its peak long after the load (held_streams: 62 MB idle,
78-97 MB after 2,000 streams). Once no call has been in flight for a whole check interval after some
load, this runs a full garbage collection and `malloc_trim(0)`, which returns the free pages at the top
and in the middle of the heap. Only then: trimming costs a few milliseconds, and nothing is in flight to
notice. Elsewhere than glibc it only collects. Measured (held_streams, 1,000 streams, two pairs in the same
minutes): 85-86 MB 12 s after the load with it, 89-93 MB without, from 63 MB idle: it returns a part;
the rest is Python's own arenas and gRPC's, which this does not reach.

It trims once more a keep-alive later: the upstream pools keep a burst's connections open for 30 s idle
(providers/http.py), and their sockets' and transports' buffers are freed only when they close.
Measured: held_streams at 2,000 streams, RSS 118.0 -> 110.5 MB at the second trim (78.8 idle); in-process
after ~950 streams, the brk heap 15.4 -> 10.5 MB on a trim once the connections had closed (9.7 idle).
What stays after both is CPython's obmalloc arenas (21 -> 35 x 1 MB, none freed though only ~2,000
blocks of the load survive: an arena is freed only when all of it is) and gRPC's own.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

from feather_grpc.core.upstream import KEEPALIVE_TIMEOUT_S

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


# A full collection only after this many second-generation ones (CPython's default is 10), and as ever only
# once the objects promoted since the last one are a quarter of those it would scan.
FULL_COLLECTION_AFTER = 100


def tune_garbage_collector() -> None:
    """Once per serving process, after start-up: freeze what start-up left (modules, descriptors, config,
    the assembled engine) out of the collector's reach, and make full collections rare.

    Why: a full collection scans every tracked object and holds the event loop meanwhile. At 2,000 held
    streams the heap holds about 220,000 (55,000 of them from start-up), and CPython's defaults ran a full
    collection each time it grew by a quarter: five in a run of held_streams.py, 85-190 ms each, three of
    them while the streams were held, each a stall for every new call. Tuned, the same runs have none
    while the streams are held (RSS unchanged). Cyclic garbage still goes: the younger generations run as
    before, a full collection comes after FULL_COLLECTION_AFTER of them (about a minute at that load), and
    the idle trimmer collects fully once a burst is over. `feather_gc_pause_seconds` shows the pauses.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)


# The upstream pools' keep-alive and a few seconds more.
AGAIN_AFTER_S = KEEPALIVE_TIMEOUT_S + 5.0


async def return_memory_when_idle(
    in_flight: Callable[[], int],
    interval_s: float = 5.0,
    trim: Callable[[int], int] | None = None,
    started: Callable[[], int] | None = None,
    again_after_s: float = AGAIN_AFTER_S,
) -> None:
    """Forever: after load, once `in_flight()` has stayed 0 across a whole interval, collect and trim; and
    once more if it is still idle `again_after_s` later (when the pools have closed the burst's idle
    connections). `started()` (the calls started so far) sees the calls that came and went between two
    checks: light traffic is not idle, or each lull it leaves at a check would cost a full collection."""
    trim = trim or _malloc_trim()
    loop = asyncio.get_running_loop()
    busy = False
    was_idle = False
    again_at: float | None = None  # the second pass, pending after a burst's first
    seen = started() if started is not None else 0
    while True:
        await asyncio.sleep(interval_s)
        count = started() if started is not None else 0
        idle = in_flight() == 0 and count == seen
        seen = count
        if not idle:
            busy, was_idle, again_at = True, False, None  # a new burst: its own passes come after it
            continue
        if busy and was_idle:  # idle at the last check and now: the burst is over
            await _collect(trim)
            busy = False
            again_at = loop.time() + again_after_s
        elif again_at is not None and loop.time() >= again_at:
            await _collect(trim)
            again_at = None
        was_idle = True


async def _collect(trim: Callable[[int], int] | None) -> None:
    gc.collect()
    if trim is not None:
        await asyncio.to_thread(trim, 0)
