"""A TCP relay in front of a real redis-server that resets the client's connection when a chosen command
passes, for tests of what a lost write or a lost reply does.

    async with RedisRelay(redis.port, trigger=b"<sha of a script>") as relay:
        url = relay.url                 # point the gateway here
        relay.resets_left = 4           # the next 4 chunks holding the trigger reset the connection
        relay.resets                    # how many it did: alternately the chunk is dropped (never reaches
                                        # Redis) and delivered (Redis applies it, the reply is lost)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType


class RedisRelay:
    def __init__(self, redis_port: int, trigger: bytes) -> None:
        self.redis_port = redis_port
        self.trigger = trigger
        self.resets_left = 0
        self.resets = 0
        self.dropped = 0  # resets whose chunk never reached Redis
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> RedisRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        except OSError:
            _reset(client_w)
            return
        back = asyncio.ensure_future(self._pump(redis_r, client_w))
        try:
            while chunk := await client_r.read(65536):
                if self.resets_left > 0 and self.trigger in chunk:
                    self.resets_left -= 1
                    self.resets += 1
                    if self.resets % 2:
                        self.dropped += 1
                    else:
                        redis_w.write(chunk)  # Redis gets it; the FIN below comes after the data
                        await redis_w.drain()
                    back.cancel()
                    _reset(client_w)
                    break
                redis_w.write(chunk)
                await redis_w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            back.cancel()
            redis_w.close()
            with contextlib.suppress(Exception):
                await redis_w.wait_closed()
            if not client_w.is_closing():
                client_w.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with an RST (SO_LINGER 0): the peer sees `connection reset`, not an orderly close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
