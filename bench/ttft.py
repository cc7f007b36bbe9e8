"""Time to first token, through the gateway and straight from the upstream, at concurrency 1.

The upstream's `/ttft` location sends the role chunk and the first content chunk at once, then holds
the rest of the stream for `upstream.TTFT_HOLD_S`: the first token is available immediately, and a
gateway that buffered the stream would show at least the hold time.

- direct: a blocking-socket HTTP/1.1 keep-alive client POSTs the gateway's own JSON body and stops the
  clock when the first SSE chunk carrying non-empty `delta.content` has arrived (the bytes are scanned as
  they come in; the rest of the response is then read to its end so the connection stays reusable).
- gateway: the grpc (C-core, synchronous) Python client calls StreamChat and stops the clock when the
  first message with `delta.content` arrives (after `start`), then drains the stream.

Samples alternate (direct, gateway, direct, ...) so drift hits both alike. Both clients are about the
cheapest Python can do; the gRPC client's own per-message cost (tens of microseconds) is counted as
gateway overhead, so the overhead reported is, if anything, pessimistic.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import loadgen
import upstream

_FIRST_CONTENT = b'"delta":{"content":"'  # the role chunk has `"delta":{"role":...`; this is the first text


class DirectClient:
    def __init__(self, port: int, path: str, body: bytes) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def once(self) -> float:
        """Seconds until the first content chunk; reads the whole (chunked) response."""
        sock = self._sock
        t0 = time.perf_counter()
        sock.sendall(self._request)
        buf = b""
        first: float | None = None
        while True:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("upstream closed the connection")
            buf += data
            if first is None and _FIRST_CONTENT in buf:
                first = time.perf_counter() - t0
            if buf.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked body
                break
        if first is None:
            raise RuntimeError("the upstream stream had no content chunk")
        if b"data: [DONE]" not in buf:
            raise RuntimeError("the upstream stream did not end with [DONE]")
        return first

    def close(self) -> None:
        self._sock.close()


class GatewayClient:
    def __init__(self, port: int, model: str) -> None:
        import grpc

        from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
        from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc

        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._stub = pb_grpc.FeatherServiceStub(self._channel)
        self._request = pb.StreamChatRequest(
            model=model, messages=[pb.Message(role=pb.ROLE_USER, content=upstream.PROMPT)]
        )

    def once(self) -> float:
        t0 = time.perf_counter()
        first: float | None = None
        text = []
        ended = False
        for msg in self._stub.StreamChat(self._request, timeout=10):
            kind = msg.WhichOneof("event")
            if kind == "delta" and msg.delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                text.append(msg.delta.content)
            elif kind == "end":
                ended = True
        if first is None or not ended:
            raise RuntimeError("the gateway stream had no content or no end")
        if "".join(text) != upstream.REPLY:
            raise RuntimeError(f"the gateway stream said {''.join(text)!r}")
        return first

    def close(self) -> None:
        self._channel.close()


@dataclass
class TtftResult:
    samples: int
    warmup: int
    hold_ms: float
    direct_p50_ms: float
    direct_p99_ms: float
    gateway_p50_ms: float
    gateway_p99_ms: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    ratio_p50: float

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def measure(upstream_port: int, gateway_port: int, samples: int = 300, warmup: int = 30) -> TtftResult:
    body = loadgen.openai_body(upstream.MODEL_TTFT, stream=True)
    direct = DirectClient(upstream_port, upstream.PATHS[upstream.MODEL_TTFT], body)
    gateway = GatewayClient(gateway_port, upstream.MODEL_TTFT)
    try:
        for _ in range(warmup):
            direct.once()
            gateway.once()
        d: list[int] = []
        g: list[int] = []
        for _ in range(samples):
            d.append(int(direct.once() * 1e6))
            g.append(int(gateway.once() * 1e6))
    finally:
        direct.close()
        gateway.close()
    d.sort()
    g.sort()
    dp50, dp99 = loadgen.percentile(d, 50) / 1000, loadgen.percentile(d, 99) / 1000
    gp50, gp99 = loadgen.percentile(g, 50) / 1000, loadgen.percentile(g, 99) / 1000
    return TtftResult(
        samples=samples,
        warmup=warmup,
        hold_ms=upstream.TTFT_HOLD_S * 1000,
        direct_p50_ms=dp50,
        direct_p99_ms=dp99,
        gateway_p50_ms=gp50,
        gateway_p99_ms=gp99,
        overhead_p50_ms=gp50 - dp50,
        overhead_p99_ms=gp99 - dp99,
        ratio_p50=gp50 / dp50 if dp50 else float("nan"),
    )
