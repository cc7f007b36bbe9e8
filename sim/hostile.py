"""A hostile HTTP/1.1 upstream: replies too large, endless or compressed, for tests and bench/hostile.py.

Answers every POST (any path, so it can stand in for an OpenAI or Anthropic base URL) with one
`behaviour`, then closes the connection:

- `json-length`: a 200 `application/json` reply declaring `Content-Length: size`, then that many bytes;
- `json-chunked`: the same bytes with chunked framing and no declared length (`size` 0: endless);
- `sse-line`: a 200 `text/event-stream` whose one line (`data: xxx...`) never ends;
- `sse-event`: a 200 `text/event-stream` of short `data:` lines that never make a whole event.

Bodies are written in 64 KiB pieces, each after the previous one was accepted by the kernel, so `sent`
(body bytes per connection) tells how far the client read; `disconnects` counts connections the
client closed before the body ended.

    async with HostileUpstream("json-length", size=300 << 20) as hostile:
        ...  # point a provider's baseUrl at hostile.url + "/v1"

    python -m sim.hostile --behaviour json-length --size 314572800 [--port N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Final, Literal

__all__ = ["Behaviour", "HostileUpstream"]

Behaviour = Literal["json-length", "json-chunked", "sse-line", "sse-event"]
PIECE: Final = 64 * 1024


class HostileUpstream:
    def __init__(self, behaviour: Behaviour, size: int = 0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behaviour = behaviour
        self.size = size
        self.host = host
        self.port = port
        self.connections = 0
        self.disconnects = 0
        self.sent: list[int] = []  # body bytes written per connection, in accept order
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def wait_disconnects(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Until the client has closed `count` connections before their body ended."""
        async with asyncio.timeout(timeout_s):
            while self.disconnects < count:
                self._changed.clear()
                await self._changed.wait()

    async def __aenter__(self) -> HostileUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self.connections
        self.connections += 1
        self.sent.append(0)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            await self._reply(writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnects += 1
            self._changed.set()
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _reply(self, writer: asyncio.StreamWriter, index: int) -> None:
        json_head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        sse_head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        if self.behaviour == "json-length":
            writer.write(f"{json_head}Content-Length: {self.size}\r\n\r\n".encode())
            await self._body(writer, index, b'{"id":"x","pad":"', b"x" * PIECE, chunked=False)
        elif self.behaviour == "json-chunked":
            writer.write(f"{json_head}Transfer-Encoding: chunked\r\n\r\n".encode())
            await self._body(writer, index, b'{"id":"x","pad":"', b"x" * PIECE, chunked=True)
        elif self.behaviour == "sse-line":
            writer.write(sse_head.encode())
            await self._body(writer, index, b"data: ", b"x" * PIECE, chunked=True)
        else:
            writer.write(sse_head.encode())
            line = b"data: " + b"x" * 1000 + b"\n"
            await self._body(writer, index, b"", line * (PIECE // len(line)), chunked=True)

    async def _body(
        self, writer: asyncio.StreamWriter, index: int, first: bytes, piece: bytes, *, chunked: bool
    ) -> None:
        """Writes `first`, then `piece` again and again, up to `size` bytes (forever when 0 and chunked)."""
        remaining = self.size if self.size or not chunked else -1
        data = first + piece[len(first) :]
        while remaining:
            if remaining > 0:
                data = data[:remaining]
                remaining -= len(data)
            writer.write(b"%X\r\n%s\r\n" % (len(data), data) if chunked else data)
            await writer.drain()
            self.sent[index] += len(data)
            data = piece
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _main(args: argparse.Namespace) -> None:
    async with HostileUpstream(args.behaviour, args.size, port=args.port) as hostile:
        print(hostile.port, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--behaviour", choices=["json-length", "json-chunked", "sse-line", "sse-event"], required=True)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args()))
    sys.exit(0)
