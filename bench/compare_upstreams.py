"""Which fast upstream should the benchmark use? Measures each candidate alone, straight from h2load.

Candidates: nginx with the fixed replies of bench/upstream.py, and the project's simulator
(`python -m sim.upstream`, aiohttp). For each: requests/s and CPU microseconds per request of the
upstream process at concurrency 64 (HTTP/1.1 keep-alive, as the gateway talks to it), Chat and stream
bodies, plus p50 at concurrency 1. The upstream shares 2 cores with the gateway and h2load, so its CPU
per request is what matters: every microsecond it burns is taken from the gateway under test.

    .venv/bin/python bench/compare_upstreams.py     # ~15 s; writes bench/results/upstreams.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import loadgen
import upstream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


# per body kind ("chat", "stream"): the figures of each run
Figures = dict[str, dict[str, float]]


def _measure(name: str, base: str, chat_path: str, stream_path: str, pids: list[int], tmp: Path) -> Figures:
    chat_body = tmp / "chat.json"
    stream_body = tmp / "stream.json"
    chat_body.write_bytes(loadgen.openai_body(upstream.MODEL_CHAT, stream=False))
    stream_body.write_bytes(loadgen.openai_body(upstream.MODEL_STREAM, stream=True))
    out: Figures = {}
    for kind, path, body in (("chat", chat_path, chat_body), ("stream", stream_path, stream_body)):
        url = base + path
        loadgen.run_h2load(
            f"{name}-{kind}-warm", url, body, loadgen.JSON_HEADERS, clients=8, requests=2000, h1=True, log_dir=tmp
        )
        c64 = loadgen.run_h2load(
            f"{name}-{kind}-c64",
            url,
            body,
            loadgen.JSON_HEADERS,
            clients=64,
            requests=30_000,
            h1=True,
            log_dir=tmp,
            watch={"upstream": pids},
        )
        c1 = loadgen.run_h2load(
            f"{name}-{kind}-c1", url, body, loadgen.JSON_HEADERS, clients=1, requests=5_000, h1=True, log_dir=tmp
        )
        out[kind] = {
            "c64_rps": round(c64.rps),
            "c64_cpu_us_per_request": c64.cpu_us_per_request["upstream"],
            "c64_cpu_cores_busy": round(c64.cpu["upstream"] / c64.elapsed_s, 2),
            "c1_rps": round(c1.rps),
            "c1_p50_us": c1.p50_us,
            "c1_p99_us": c1.p99_us,
        }
    return out


def main() -> int:
    if not loadgen.have_h2load() or upstream.missing_tools():
        print("bench: h2load / nginx missing; run bench/setup.sh first", file=sys.stderr)
        return 2
    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="feather-bench-up-") as t:
        tmp = Path(t)
        with upstream.Nginx(upstream.free_port(), tmp / "nginx") as nginx:
            results["nginx"] = _measure(
                "nginx",
                nginx.url,
                upstream.PATHS[upstream.MODEL_CHAT],
                upstream.PATHS[upstream.MODEL_STREAM],
                nginx.pids(),
                tmp,
            )
        port = upstream.free_port()
        sim = subprocess.Popen(
            [sys.executable, "-m", "sim.upstream", "--port", str(port), "--reply", upstream.REPLY],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            upstream.wait_port(port, proc=sim)
            path = "/v1/chat/completions"
            results["sim.upstream"] = _measure("sim", f"http://127.0.0.1:{port}", path, path, [sim.pid], tmp)
        finally:
            sim.terminate()
            sim.wait(timeout=10)
    print(
        f"{'upstream':<14}{'body':<8}{'c64 req/s':>11}{'CPU us/req':>12}{'cores':>7}{'c1 req/s':>10}{'c1 p50 us':>11}"
    )
    for name, kinds in results.items():
        for kind, r in kinds.items():
            print(
                f"{name:<14}{kind:<8}{r['c64_rps']:>11}{r['c64_cpu_us_per_request']:>12}"
                f"{r['c64_cpu_cores_busy']:>7}{r['c1_rps']:>10}{r['c1_p50_us']:>11.0f}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "upstreams.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
