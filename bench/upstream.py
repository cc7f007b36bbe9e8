"""The benchmark's upstream: nginx answering every POST with a fixed, byte-valid OpenAI reply.

Three locations on one 127.0.0.1 port (the gateway gets one provider per location, by `baseUrl`):

    /chat/v1/chat/completions    a `chat.completion` JSON document (with usage)        `return 200`
    /stream/v1/chat/completions  a full SSE stream: role chunk, content chunks, finish    `return 200`
                                 chunk, usage chunk (`choices: []`), `data: [DONE]`
    /ttft/v1/chat/completions    the same stream, but nginx flushes the role chunk and the  echo module
                                 first content chunk, then holds the rest for TTFT_HOLD_S

nginx serves the bodies from memory with one worker process, so the upstream costs a few
microseconds of CPU per request (see bench/README.md for the comparison with `python -m sim.upstream`).
`python bench/upstream.py --port N` runs it alone; `--print` shows the bodies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL_CHAT = "bench-chat"
MODEL_STREAM = "bench-stream"
MODEL_TTFT = "bench-ttft"
PATHS = {
    MODEL_CHAT: "/chat/v1/chat/completions",
    MODEL_STREAM: "/stream/v1/chat/completions",
    MODEL_TTFT: "/ttft/v1/chat/completions",
}
PROMPT = "Say hello in one short sentence."
REPLY = "Hello! This is a short fixed reply from the benchmark upstream."
PROMPT_TOKENS = 14
COMPLETION_TOKENS = 18
TTFT_HOLD_S = 0.010  # the ttft location holds the stream this long after the first content chunk
CREATED = 1_700_000_000
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
_NGINX_MAX_TOKEN = 4096  # NGX_CONF_BUFFER: the longest token the config parser accepts


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def usage() -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion_body(model: str = MODEL_CHAT) -> bytes:
    """A `chat.completion` exactly as OpenAI writes it (compact JSON)."""
    doc = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(),
        "system_fingerprint": None,
    }
    return _dumps(doc).encode()


def reply_pieces() -> list[str]:
    """The content split into word-sized pieces (a word and its trailing space), as models stream."""
    words = REPLY.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def stream_events(model: str = MODEL_STREAM) -> list[bytes]:
    """The SSE events of a streamed completion with `stream_options.include_usage`."""

    def chunk(choices: list[dict[str, Any]], usage_value: dict[str, Any] | None) -> bytes:
        doc = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage_value,
        }
        return b"data: " + _dumps(doc).encode() + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    events = [chunk([choice({"role": "assistant", "content": "", "refusal": None})], None)]
    events += [chunk([choice({"content": p})], None) for p in reply_pieces()]
    events.append(chunk([choice({}, "stop")], None))
    events.append(chunk([], usage()))
    events.append(b"data: [DONE]\n\n")
    return events


def stream_body(model: str = MODEL_STREAM) -> bytes:
    return b"".join(stream_events(model))


def _nginx_string(data: bytes) -> str:
    """An nginx single-quoted string; the config parser turns `\\n` back into a newline."""
    text = data.decode()
    for bad in ("'", "\\", "$"):
        if bad in text:
            raise ValueError(f"fixed reply must not contain {bad!r} (nginx quoting / variables)")
    quoted = "'" + text.replace("\n", "\\n") + "'"
    if len(quoted) >= _NGINX_MAX_TOKEN:
        raise ValueError(f"an nginx string is limited to {_NGINX_MAX_TOKEN} bytes; this one has {len(quoted)}")
    return quoted


def nginx_config(port: int, prefix: Path) -> str:
    ttft = stream_events(MODEL_TTFT)
    first = b"".join(ttft[:2])
    rest_echoes = "\n".join(f"            echo -n {_nginx_string(event)};" for event in ttft[2:])
    return f"""# generated by bench/upstream.py
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
load_module {ECHO_MODULE};

events {{
    worker_connections 4096;
    multi_accept on;
}}

http {{
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    tcp_nodelay on;

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {PATHS[MODEL_CHAT]} {{
            default_type application/json;
            return 200 {_nginx_string(completion_body(MODEL_CHAT))};
        }}
        location = {PATHS[MODEL_STREAM]} {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            return 200 {_nginx_string(stream_body(MODEL_STREAM))};
        }}
        location = {PATHS[MODEL_TTFT]} {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            echo_read_request_body;
            echo -n {_nginx_string(first)};
            echo_flush;
            echo_sleep {TTFT_HOLD_S};
{rest_echoes}
        }}
        location / {{
            return 404 '{{"error":{{"message":"unknown path","type":"invalid_request_error"}}}}';
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def missing_tools() -> list[str]:
    missing = []
    if shutil.which("nginx") is None:
        missing.append("nginx (package nginx-light)")
    if not Path(ECHO_MODULE).exists():
        missing.append("nginx echo module (package libnginx-mod-http-echo)")
    return missing


class Nginx:
    """nginx in the foreground with a generated config under `prefix`; stop() ends exactly it."""

    def __init__(self, port: int, prefix: Path) -> None:
        self.port = port
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        for d in ("body", "proxy", "logs"):
            (self.prefix / d).mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chmod(self.prefix / d, 0o777)  # workers run as `nobody` when started as root
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_config(self.port, self.prefix))
        cmd = ["nginx", "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "nginx-error.log")]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx config test failed:\n{check.stderr}")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, proc=self.proc)
        return self

    def pids(self) -> list[int]:
        """The master and its workers (for CPU accounting)."""
        if self.proc is None:
            return []
        pids = [self.proc.pid]
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            pids += [int(c) for c in children]
        except OSError:
            pass
        return pids

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: the master waits for its workers
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--print", action="store_true", help="print the fixed bodies and the nginx config")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(completion_body().decode() + "\n\n" + stream_body().decode())
        sys.stdout.write(nginx_config(args.port, Path("/tmp/feather-bench-nginx")))
        return 0
    if missing_tools():
        print(f"missing: {', '.join(missing_tools())}; run bench/setup.sh", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="feather-bench-nginx-") as tmp, Nginx(args.port, Path(tmp)) as nginx:
        print(f"{nginx.url}{PATHS[MODEL_CHAT]}  {nginx.url}{PATHS[MODEL_STREAM]}  {nginx.url}{PATHS[MODEL_TTFT]}")
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
