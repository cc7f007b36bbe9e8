"""What the gateway reads from an upstream at most, by default (config: maxResponseBytes,
maxStreamEventBytes per provider), and how long an idle upstream connection is kept. Here, below config,
the providers and the server, so any of them can name them."""

from __future__ import annotations

# The most of a JSON reply body an adapter reads: the default gRPC message limit, so a larger reply could
# not be relayed anyway.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024

# The most of one SSE line or event an adapter buffers.
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

# How long the upstream pools keep an idle connection open before closing it.
KEEPALIVE_TIMEOUT_S = 30.0
