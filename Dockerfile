# Feather gRPC gateway image.
#   docker build -t feather-grpc .
#   docker run --rm -p 50051:50051 -p 9464:9464 --stop-timeout 30 feather-grpc
# The builder stage builds the gateway's and the Python client's wheels and installs them, with the `otel`
# extra, into a virtualenv; the runtime stage is that virtualenv on python:3.11-slim, run as a non-root
# user (uid 10001). Config: mount a feather.config.json at /app/feather.config.json or set FEATHER_CONFIG
# (without one the embedded default serves the mock provider, plus OpenAI/Anthropic when their keys are
# set). The SQLite ledger lives in the /data volume. Give `docker stop` more than the gateway's grace
# period (server.gracePeriodS, 20 s by default): --stop-timeout 30, or stop_grace_period in compose.

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY feather_grpc ./feather_grpc
COPY clients/python ./clients/python
# Two wheels: the gateway and the Python client its CLI (chat, usage, models) depends on. Both are named on
# the command line, so pip takes the client from here, never from an index.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-deps --wheel-dir /dist . ./clients/python \
    && set -- /dist/feather_grpc-*.whl /dist/feather_grpc_client-*.whl \
    && /opt/venv/bin/pip install "$1[otel]" "$2"

FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 feather \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin feather \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=50051 \
    METRICS_PORT=9464 \
    LOG_FORMAT=json \
    LOG_LEVEL=info \
    FEATHER_LEDGER_PATH=/data/feather-usage.db
WORKDIR /app
USER 10001:10001
# 9464 serves every worker's metrics under FEATHER_WORKERS=N|auto too (the supervisor merges them).
EXPOSE 50051 9464
VOLUME ["/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 CMD ["feather-grpc", "health"]
CMD ["feather-grpc", "serve", "--host", "0.0.0.0"]
