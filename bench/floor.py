"""Reference servers: what grpc.aio itself costs, without the gateway's logic.

    python bench/floor.py --mode echo  --port N                 # Chat/StreamChat answer fixed messages
    python bench/floor.py --mode proxy --port N --upstream URL  # + one aiohttp POST to the upstream per call,
                                                                #   response parsed with orjson
    python bench/floor.py --mode paced --port N --chunks 75 --interval 0.2  # StreamChat: a delta every
                                                                #   interval, no upstream (held streams)

Both implement feather.v1.FeatherService from the generated stubs with no interceptors, no ledger, no
logging (only an in-memory count of completed calls per model, which `Usage` reports so the benchmark
can check every call succeeded): `echo` is the floor of any grpc.aio server on this machine, `proxy` the
floor of a grpc.aio + aiohttp gateway (the architecture Feather uses). bench/run.py --floor measures
them next to the gateway under the same load, so the gateway's own cost per call can be read off the
difference. Both benchmarks pass `--tune-gc`: the garbage collector set as `feather-grpc serve` sets it
(start-up frozen, rare full collections), so the servers differ only in their code.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import grpc
import orjson
import upstream

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc


def _reply(content: str) -> pb.ChatResponse:
    return pb.ChatResponse(
        message=pb.Message(role=pb.ROLE_ASSISTANT, content=content),
        finish_reason=pb.FINISH_REASON_STOP,
        provider="floor",
        model=upstream.MODEL_CHAT,
        usage=pb.TokenUsage(input_tokens=upstream.PROMPT_TOKENS, output_tokens=upstream.COMPLETION_TOKENS),
    )


class Counting(pb_grpc.FeatherServiceServicer):
    def __init__(self) -> None:
        self.ok: dict[str, int] = {}

    def done(self, model: str) -> None:
        self.ok[model] = self.ok.get(model, 0) + 1

    async def Usage(self, request: pb.UsageRequest, context: grpc.aio.ServicerContext) -> pb.UsageResponse:
        rows = [pb.UsageRow(model=m, request_count=n, ok_count=n) for m, n in sorted(self.ok.items())]
        total = sum(self.ok.values())
        return pb.UsageResponse(rows=rows, total=pb.UsageRow(request_count=total, ok_count=total))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor serves Chat, StreamChat and Usage")
        raise AssertionError("abort always raises")


class Echo(Counting):
    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        self.done(request.model)
        return _reply(upstream.REPLY)

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatResponse]:
        yield pb.StreamChatResponse(start=pb.StreamStart(provider="floor", model=request.model))
        for piece in upstream.reply_pieces():
            yield pb.StreamChatResponse(delta=pb.ChatDelta(content=piece))
        self.done(request.model)
        yield pb.StreamChatResponse(end=pb.StreamEnd(finish_reason=pb.FINISH_REASON_STOP))


class Paced(Counting):
    """StreamChat as a held stream with nothing behind it: `start`, a "tok " delta every `interval` seconds,
    `chunks` times, then `end`. What grpc.aio itself costs per streamed message at a given rate."""

    def __init__(self, chunks: int, interval: float) -> None:
        super().__init__()
        self._chunks = chunks
        self._interval = interval

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the paced floor serves StreamChat only")
        raise AssertionError("abort always raises")

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatResponse]:
        yield pb.StreamChatResponse(start=pb.StreamStart(provider="floor", model=request.model))
        for _ in range(self._chunks + 1):  # the first delta at once, as the held upstream sends it
            yield pb.StreamChatResponse(delta=pb.ChatDelta(content="tok "))
            await asyncio.sleep(self._interval)
        self.done(request.model)
        yield pb.StreamChatResponse(end=pb.StreamEnd(finish_reason=pb.FINISH_REASON_STOP))


class Proxy(Counting):
    """The least a grpc.aio + aiohttp gateway does: build the JSON, POST it, parse the answer."""

    def __init__(self, base: str, connections: int = 1000) -> None:
        super().__init__()
        self._base = base
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._connections))
        return self._session

    def _body(self, request: pb.ChatRequest | pb.StreamChatRequest, stream: bool) -> bytes:
        body: dict[str, object] = {
            "model": request.model,
            "messages": [{"role": "user", "content": m.content} for m in request.messages],
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        url = self._base + upstream.PATHS[upstream.MODEL_CHAT]
        headers = {"Content-Type": "application/json"}
        async with self.session().post(url, data=self._body(request, False), headers=headers) as resp:
            doc = orjson.loads(await resp.read())
        reply = _reply(doc["choices"][0]["message"]["content"])
        self.done(request.model)
        return reply

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatResponse]:
        url = self._base + upstream.PATHS.get(request.model, upstream.PATHS[upstream.MODEL_STREAM])
        headers = {"Content-Type": "application/json"}
        yield pb.StreamChatResponse(start=pb.StreamStart(provider="floor", model=request.model))
        async with self.session().post(url, data=self._body(request, True), headers=headers) as resp:
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    data = event.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        continue
                    doc = orjson.loads(data)
                    for choice in doc.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield pb.StreamChatResponse(delta=pb.ChatDelta(content=text))
        self.done(request.model)
        yield pb.StreamChatResponse(end=pb.StreamEnd(finish_reason=pb.FINISH_REASON_STOP))


async def serve(
    mode: str, port: int, upstream_url: str, connections: int, chunks: int, interval: float, tune_gc: bool
) -> None:
    server = grpc.aio.server()
    servicer: Counting
    if mode == "echo":
        servicer = Echo()
    elif mode == "paced":
        servicer = Paced(chunks, interval)
    else:
        servicer = Proxy(upstream_url, connections)
    pb_grpc.add_FeatherServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if tune_gc:  # the collector as `feather-grpc serve` sets it, so the two differ only in their code
        from feather_grpc.server.memory import tune_garbage_collector

        tune_garbage_collector()
    print(f"floor {mode} serving on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("echo", "proxy", "paced"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="", help="nginx base URL (proxy mode)")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--connections", type=int, default=1000, help="upstream connection limit (proxy mode)")
    parser.add_argument("--chunks", type=int, default=75, help="deltas per stream (paced mode)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between two deltas (paced mode)")
    parser.add_argument("--tune-gc", action="store_true", help="tune the garbage collector as `serve` does")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.mode, args.port, args.upstream, args.connections, args.chunks, args.interval, args.tune_gc))


if __name__ == "__main__":
    main()
