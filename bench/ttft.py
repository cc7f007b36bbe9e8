"""Time to first token, through the gateway and straight from the upstream, at concurrency 1.

The upstream's `/ttft` location sends the role chunk and the first content chunk at once, then holds
the rest of the stream for `upstream.TTFT_HOLD_S`: the first token is available immediately, and a
gateway that buffered the stream would show at least the hold time.

- direct: a blocking-socket HTTP/1.1 keep-alive client POSTs the gateway's own JSON body and stops the
  clock when the first SSE chunk carrying non-empty `delta.content` has arrived (the bytes are scanned as
  they come in; the rest of the response is then read to its end so the connection stays reusable).
- gateway: an equally thin client speaking HTTP/2 over a blocking socket (`RawGrpcClient`: preface,
  HEADERS + DATA with the framed StreamChatRequest, no HPACK decoding needed) stops the clock when the
  DATA frame carrying the first message with `delta.content` has arrived, then reads to the trailers.
- also reported: the same through the grpcio Python client (`GrpcioClient`, C-core, synchronous), i.e.
  what a Python caller sees; that client adds its own per-call and per-message costs.

Samples alternate (direct, raw gRPC, grpcio, direct, ...) so drift hits all alike. Every gateway call
is also checked in the ledger by bench/run.py.

Run alone (`.venv/bin/python bench/ttft.py --help`), it starts nginx and a gateway itself and repeats the
measurement in rounds, with the gateway's CPU per StreamChat call (exact, from /proc schedstat) in each;
`--baseline DIR` also runs a gateway from another checkout (e.g. `git archive <commit> | tar -x -C DIR`)
and interleaves the two sample by sample, so that both see the same machine; `--floor` interleaves
bench/floor.py's bare grpc.aio echo and grpc.aio + aiohttp proxy servers too (what grpc.aio alone costs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
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


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY, _WINDOW = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20


class RawGrpcClient:
    """HTTP/2 + gRPC framing by hand on one blocking socket: the thinnest client Python allows."""

    def __init__(self, port: int, model: str) -> None:
        from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb

        self._pb = pb
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self._stream = -1
        big = (1 << 31) - 1
        settings = (4).to_bytes(2, "big") + big.to_bytes(4, "big")  # SETTINGS_INITIAL_WINDOW_SIZE
        self._sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(_SETTINGS, 0, 0, settings)
            + _frame(_WINDOW, 0, 0, (big - 65535).to_bytes(4, "big"))  # no flow control worries
        )
        headers = b"".join(
            _hpack_literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/feather.v1.FeatherService/StreamChat"),
                (":authority", f"127.0.0.1:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        request = pb.StreamChatRequest(model=model, messages=[pb.Message(role=pb.ROLE_USER, content=upstream.PROMPT)])
        self._headers = headers
        self._body = loadgen.grpc_frame(request.SerializeToString())

    def _read_frame(self) -> tuple[int, int, int, bytes]:
        while True:
            if len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) >= 9 + length:
                    head, payload = self._buf[:9], self._buf[9 : 9 + length]
                    self._buf = self._buf[9 + length :]
                    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                    return head[3], head[4], stream, payload
            data = self._sock.recv(65536)
            if not data:
                raise RuntimeError("the gateway closed the connection")
            self._buf += data

    def once(self) -> float:
        pb = self._pb
        self._stream += 2
        sid = self._stream
        t0 = time.perf_counter()
        self._sock.sendall(
            _frame(_HEADERS, _END_HEADERS, sid, self._headers) + _frame(_DATA, _END_STREAM, sid, self._body)
        )
        first: float | None = None
        grpc_buf = b""
        text: list[str] = []
        ended = False
        while True:
            kind, flags, stream, payload = self._read_frame()
            if kind == _SETTINGS and not flags & _ACK:
                self._sock.sendall(_frame(_SETTINGS, _ACK, 0))
            elif kind == _PING and not flags & _ACK:
                self._sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind in (_GOAWAY, _RST) and stream in (0, sid):
                raise RuntimeError(f"the gateway sent {'GOAWAY' if kind == _GOAWAY else 'RST_STREAM'}")
            elif stream == sid and kind == _DATA:
                if flags & _PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                grpc_buf += payload
                while len(grpc_buf) >= 5 and len(grpc_buf) >= 5 + int.from_bytes(grpc_buf[1:5], "big"):
                    n = int.from_bytes(grpc_buf[1:5], "big")
                    msg = pb.StreamChatResponse.FromString(grpc_buf[5 : 5 + n])
                    grpc_buf = grpc_buf[5 + n :]
                    kind_of = msg.WhichOneof("event")
                    if kind_of == "delta" and msg.delta.content:
                        if first is None:
                            first = time.perf_counter() - t0
                        text.append(msg.delta.content)
                    elif kind_of == "end":
                        ended = True
            if stream == sid and kind in (_DATA, _HEADERS) and flags & _END_STREAM:
                break
        if first is None or not ended:
            raise RuntimeError("the gateway stream had no content or no end (see the gateway log / ledger)")
        if "".join(text) != upstream.REPLY:
            raise RuntimeError(f"the gateway stream said {''.join(text)!r}")
        return first

    def close(self) -> None:
        self._sock.close()


class GrpcioClient:
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
    gateway_p50_ms: float  # raw HTTP/2 client
    gateway_p99_ms: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    ratio_p50: float
    grpcio_p50_ms: float  # the grpcio client, for reference
    grpcio_p99_ms: float

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def measure(
    upstream_port: int, gateway_port: int, samples: int = 300, warmup: int = 30, *, grpcio: bool = True
) -> TtftResult:
    """`samples` (+ `warmup`) StreamChat calls through the gateway with each gRPC client, and as many
    direct requests. Without `grpcio` only the raw client calls the gateway (grpcio figures are then 0)."""
    return measure_side_by_side(upstream_port, [gateway_port], samples, warmup, grpcio=grpcio)[0]


def measure_side_by_side(
    upstream_port: int, gateway_ports: list[int], samples: int = 300, warmup: int = 30, *, grpcio: bool = True
) -> list[TtftResult]:
    """`measure` for several gateways at once, their calls interleaved sample by sample (direct, gateway 1,
    gateway 2, ..., direct, ...), so that slow drift of the machine hits all of them alike."""
    body = loadgen.openai_body(upstream.MODEL_TTFT, stream=True)
    direct = DirectClient(upstream_port, upstream.PATHS[upstream.MODEL_TTFT], body)
    raws = [RawGrpcClient(port, upstream.MODEL_TTFT) for port in gateway_ports]
    slows = [GrpcioClient(port, upstream.MODEL_TTFT) for port in gateway_ports] if grpcio else []
    d: list[int] = []
    g: list[list[int]] = [[] for _ in gateway_ports]
    c: list[list[int]] = [[] for _ in gateway_ports]
    try:
        for i in range(warmup + samples):
            t_direct = direct.once()
            # Each gateway goes first as often as the others: whoever follows the direct call may be luckier.
            order = range(len(raws)) if i % 2 == 0 else range(len(raws) - 1, -1, -1)
            t_raw = [0.0] * len(raws)
            for k in order:
                t_raw[k] = raws[k].once()
            t_slow = [slow.once() for slow in slows] or [0.0] * len(raws)
            if i >= warmup:
                d.append(int(t_direct * 1e6))
                for k in range(len(raws)):
                    g[k].append(int(t_raw[k] * 1e6))
                    c[k].append(int(t_slow[k] * 1e6))
    finally:
        direct.close()
        for raw in raws:
            raw.close()
        for slow in slows:
            slow.close()
    d.sort()

    def p(acc: list[int], q: float) -> float:
        return loadgen.percentile(acc, q) / 1000

    out = []
    for gk, ck in zip(g, c, strict=True):
        gk.sort()
        ck.sort()
        out.append(
            TtftResult(
                samples=samples,
                warmup=warmup,
                hold_ms=upstream.TTFT_HOLD_S * 1000,
                direct_p50_ms=p(d, 50),
                direct_p99_ms=p(d, 99),
                gateway_p50_ms=p(gk, 50),
                gateway_p99_ms=p(gk, 99),
                overhead_p50_ms=p(gk, 50) - p(d, 50),
                overhead_p99_ms=p(gk, 99) - p(d, 99),
                ratio_p50=p(gk, 50) / p(d, 50) if p(d, 50) else float("nan"),
                grpcio_p50_ms=p(ck, 50),
                grpcio_p99_ms=p(ck, 99),
            )
        )
    return out


# ---- standalone: rounds of TTFT and CPU per call, optionally A/B against another checkout ----


def schedstat_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of `pid` so far, in nanoseconds resolution (/proc/PID/task/*/schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def _gateway(root: Path | None, name: str, cfg_path: Path, tmp: Path, loop: str) -> Any:
    """A `feather-grpc serve` process (as bench/run.py starts it) from this checkout, or from `root`."""
    import run

    port = upstream.free_port()
    if root is None:
        server = run.Server.gateway(cfg_path, port, tmp / f"{name}.log", loop, {}, name=name)
    else:  # the same, but importing feather_grpc from `root`
        code = f"import sys; sys.path.insert(0, {str(root)!r}); from feather_grpc.cli import main; sys.exit(main())"
        serve = ["serve", "--config", str(cfg_path), "--host", "127.0.0.1", "--port", str(port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(run._GATEWAY_ENV_PREFIXES)}
        env["FEATHER_EVENT_LOOP"] = loop
        server = run.Server(name, [sys.executable, "-c", code, *serve], port, tmp / f"{name}.log", env, is_gateway=True)
    server.wait_ready()
    return server


def main(argv: list[str] | None = None) -> int:
    import run

    parser = argparse.ArgumentParser(prog="bench/ttft.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measurement rounds (default 5)")
    parser.add_argument("--samples", type=int, default=300, help="calls per round and client (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured calls before each round (default 30)")
    parser.add_argument("--grpcio", action="store_true", help="also time the grpcio client (slower rounds)")
    parser.add_argument("--baseline", type=Path, help="checkout to compare with, calls interleaved A/B")
    parser.add_argument(
        "--floor", action="store_true", help="also interleave bench/floor.py's grpc.aio echo and proxy servers"
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop" if run._have_uvloop() else "asyncio")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args(argv)
    missing = upstream.missing_tools()
    if missing:
        print(f"ttft: missing {', '.join(missing)}; run: sudo bench/setup.sh", file=sys.stderr)
        return 2
    rounds: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="feather-ttft-") as t:
        tmp = Path(t)
        nginx = upstream.Nginx(upstream.free_port(), tmp / "nginx").start()
        gateways: list[tuple[str, Any]] = []
        try:
            cfg_path = tmp / "feather.config.json"
            cfg_path.write_text(json.dumps(run.gateway_config(nginx.url, "sqlite", tmp / "bench.db")))
            if args.baseline is not None:
                base_cfg = tmp / "baseline.config.json"
                base_cfg.write_text(json.dumps(run.gateway_config(nginx.url, "sqlite", tmp / "baseline.db")))
                gateways.append(("baseline", _gateway(args.baseline.resolve(), "baseline", base_cfg, tmp, args.loop)))
            gateways.append(("this tree", _gateway(None, "gateway", cfg_path, tmp, args.loop)))
            if args.floor:
                for mode in ("echo", "proxy"):
                    floor = run.Server.floor(mode, upstream.free_port(), nginx.url, tmp / f"{mode}.log", args.loop)
                    gateways.append((f"floor {mode}", floor))
                    floor.wait_ready()
            for n in range(args.rounds):
                cpu0 = [schedstat_cpu_s(gw.proc.pid) for _, gw in gateways]
                results = measure_side_by_side(
                    nginx.port, [gw.port for _, gw in gateways], args.samples, args.warmup, grpcio=args.grpcio
                )
                for (label, gw), r, c0 in zip(gateways, results, cpu0, strict=True):
                    calls = (r.samples + r.warmup) * (2 if args.grpcio else 1)
                    cpu_us = (schedstat_cpu_s(gw.proc.pid) - c0) / calls * 1e6
                    rounds.setdefault(label, []).append({**r.to_json(), "cpu_us_per_call": round(cpu_us, 1)})
                    print(
                        f"round {n + 1} {label:>11}: TTFT overhead p50 {r.overhead_p50_ms:.3f} ms"
                        f" (gateway {r.gateway_p50_ms:.3f}, direct {r.direct_p50_ms:.3f}),"
                        f" p99 {r.overhead_p99_ms:.3f} ms, CPU {cpu_us:.0f} us/call",
                        flush=True,
                    )
        finally:
            for _, gw in gateways:
                gw.stop()
            nginx.stop()
    for label, rows in rounds.items():
        over = [row["overhead_p50_ms"] for row in rows]
        cpu = [row["cpu_us_per_call"] for row in rows]
        print(
            f"{label:>11}: TTFT overhead p50 median {statistics.median(over):.3f} ms"
            f" (range {min(over):.3f}-{max(over):.3f}), CPU median {statistics.median(cpu):.0f} us/call"
            f" (range {min(cpu):.0f}-{max(cpu):.0f}), {len(rows)} rounds of {args.samples}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rounds, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
