"""The supervisor's /metrics under `serve --workers N`: every worker's series on one port, labelled `worker`.

Each worker serves its own registry on a loopback port; a scrape of METRICS_PORT asks all of them at once
and answers one exposition, each sample with a `worker` label, so one scrape target (a pod's one
annotated port) sees every core's calls. A worker that does not answer within the timeout is left out of
that scrape and counted in `feather_metrics_workers_missing`, rather than failing the whole scrape.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import urllib.request
from collections.abc import Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

_TIMEOUT_S = 5.0


# Each worker binds a free loopback port (METRICS_PORT=0) and writes it to the file this names, so that no
# fixed port range can collide with another process's; the supervisor reads the files at each scrape.
PORT_FILE_ENV = "FEATHER_METRICS_PORT_FILE"


def report_port(path: str, port: int) -> None:
    """A worker's side: writes its bound metrics port, whole or not at all (the supervisor may read it now)."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(str(port))
    os.replace(partial, path)


def reported_port(path: str) -> int | None:
    """The supervisor's side: the port a worker reported, or None before it has (or if it never will)."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class WorkerMetrics(Collector):
    """Collects every worker's samples, adding `worker="i"`."""

    def __init__(self, port_files: Sequence[str]) -> None:
        self.port_files = list(port_files)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(self.port_files), 16) or 1)

    def collect(self) -> Iterable[Metric]:
        texts = list(self._pool.map(_fetch, self.port_files))
        merged: dict[str, Metric] = {}
        missing = 0
        for index, text in enumerate(texts):
            if text is None:
                missing += 1
                continue
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    into.samples.append(s._replace(labels={**s.labels, "worker": str(index)}))
        yield from merged.values()
        yield GaugeMetricFamily(
            "feather_metrics_workers_missing", "Workers whose metrics this scrape could not read.", value=missing
        )


def _fetch(port_file: str) -> str | None:
    port = reported_port(port_file)
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=_TIMEOUT_S) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


def serve_merged(host: str, port: int, worker_port_files: Sequence[str]) -> tuple[ThreadingHTTPServer, int]:
    """Serves the merged /metrics on host:port (0: a free port) on a daemon thread; returns the server
    and the bound port."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerMetrics(worker_port_files))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per scrape is noise

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="feather-metrics-merge", daemon=True).start()
    return server, int(server.server_address[1])
