"""The own HTTP/1.1 client on asyncio protocols: the providers' default way to reach an upstream
(the interface it implements, its errors and the per-attempt context are in providers/http_client.py).

Modules: `client` (HttpClient, Endpoint: request heads, the stale-connection resend), `pool` (keep-alive
pools, sockets, DNS, TLS), `connection` (the protocol that parses responses), `response` (body reading,
decoding, backpressure, giving the connection back), `tunnel` (CONNECT through an HTTP proxy).

Why not aiohttp: on the benchmark machine one aiohttp `ClientSession.post` per gRPC call costs ~380-420 µs
of CPU over a bare grpc.aio echo server (bench/floor.py `proxy`), this client ~110 µs, most of it the
send/receive system calls; alone, 64 concurrent POSTs to nginx cost 95-115 µs of CPU each through
aiohttp and 17-35 µs through this client. An LLM call needs none of aiohttp's request/response objects,
header multidicts, stream readers and separate body write: this client does one `transport.write` per
request and parses the response in `data_received`, waking the caller once when the body comes with
the head.

Scope, deliberately small:
- POST with a `Content-Length` body; the request head is pre-encoded per `Endpoint` (method, path,
  Host, User-Agent, `Accept-Encoding: identity` and the provider's static headers: content type, auth)
  and only the length is formatted per request. Identity because a compressing server buffers SSE
  events (time to first token) and LLM replies are small; a server that compresses anyway (`gzip`,
  `deflate`) is decoded as the body is read, in steps of at most `DECODE_STEP` bytes so a compression
  bomb never inflates more than that at once; any other coding fails the read (`UnsupportedEncoding`).
- `read(limit)` refuses a body over `limit` bytes (after decoding): a `Content-Length` over it before
  any byte is read, otherwise as soon as the limit is passed; either way the connection is closed.
- Responses: status line and headers (names lowercased; only a few are ever looked at), bodies framed
  by Content-Length, chunked transfer coding (extensions and trailers skipped) or the end of the
  connection; 1xx interim responses skipped; `Connection: close` and HTTP/1.0 honoured.
- A keep-alive pool per (owner, scheme, host, port), the owner being the provider that opened the
  endpoint: at most its `max_connections` (default `max_per_host`; callers beyond it wait in FIFO
  order), idle connections reused last-in first-out and closed after `keepalive_timeout_s` idle; a
  connection the server closes while idle is discarded at once.
- Body chunks are delivered as they arrive (`async for chunk in response`); when the consumer lags more
  than `HIGH_WATER` bytes behind, the socket stops being read until it catches up.
- A response whose body was not read to the end is never pooled: `Response.close()` (and any failure or
  cancellation) aborts its connection, so the upstream sees the disconnect at once. A response read to
  the end returns its connection to the pool by itself, before the consumer has even looked at the data.
  A caller done with a body that has not quite ended (an SSE stream's last event came, the chunked
  terminator has not) can `release_after_end()`: the end is awaited briefly, then the connection pooled.
- TLS for https (`ssl.create_default_context()`, SNI, ALPN `http/1.1`), or a provider's own CA bundle and
  client certificate; an HTTP proxy per `Egress` (providers/egress.py): a CONNECT tunnel for https (TLS to
  the origin inside it), absolute-form requests for plain http. The pool key includes the egress, so a
  tunnelled connection only ever carries requests to its own origin. No redirects, no cookies, no request
  timeouts: callers bound calls with `asyncio.timeout`, and cancellation at any
  point (connect, TLS handshake, waiting for a connection, reading) closes what was opened.

Resending on a stale connection: a request sent on a *reused* connection that fails before a single
byte of the response arrived because the server closed that connection (EOF or reset) is sent once
more on a freshly opened one. That is the signature of the keep-alive race (the server's idle timeout
closed the connection as we reused it), in which the server never processed the request. POST is not
idempotent, and RFC 9112 §9.3.1 allows an automatic retry only when the client can tell the request was
not applied: a server that read the request and then died without answering would see it twice. For
this gateway that is acceptable: a completion has no side effect beyond its cost, and the engine retries
an `UPSTREAM_READ_ERROR` (the same failure on a fresh connection) anyway. Failures after a response byte
arrived, and failures on a fresh connection, are never resent here.
"""
