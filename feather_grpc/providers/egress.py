"""How the gateway reaches one provider: directly or through an HTTP proxy, trusting which CAs, with which
client certificate. Resolved once from the config and the environment; the HTTP client acts on it.

Proxies follow the conventions curl and requests share:
- `https_proxy`/`HTTPS_PROXY` for https upstreams (a CONNECT tunnel: TLS to the origin runs inside it, so
  the proxy sees neither the request nor the key), `http_proxy`/`HTTP_PROXY` for plain http ones (requests
  in absolute form, through the proxy); the lowercase form wins; empty means unset. `ALL_PROXY` is not read.
- A proxy URL is `http://[user:password@]host[:port]` (no scheme means http; the port defaults to 80);
  the credentials go in `Proxy-Authorization: Basic` and are never logged. TLS to the proxy and SOCKS are
  not supported, and say so instead of being ignored.
- `no_proxy`/`NO_PROXY`: comma- or space-separated; `*` matches every host; a name matches itself and its
  subdomains (a leading `.` or `*.` is ignored, as curl does); an IP address or CIDR block matches IP
  hosts; an entry with `:port` matches that port only. Names are compared case-insensitively and never
  resolved.
- Loopback upstreams (`localhost`, 127.0.0.0/8, ::1) never go through an environment proxy, as in Go's
  net/http (curl and requests would send them to the proxy, which cannot reach this host's loopback): a
  sidecar or local model server keeps working when HTTP_PROXY is set for the whole machine. A provider's
  own `proxy` setting applies whatever the host.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

__all__ = ["Egress", "Proxy", "TlsContexts", "bypasses_proxy", "env_proxy", "parse_proxy", "tls_context"]


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy. `authorization` (a `Proxy-Authorization` value, or "") is never printed."""

    host: str
    port: int
    authorization: str = field(default="", repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Egress:
    """One provider's way out. Equal egresses share connections; different ones never do (a tunnel belongs
    to its origin and proxy, a TLS connection to the identity and trust it was made with)."""

    proxy: Proxy | None = None
    ca_file: str | None = None  # replaces the system CAs for this provider (as curl --cacert does)
    client_cert_file: str | None = None  # mutual TLS
    client_key_file: str | None = None  # None: the key is in client_cert_file

    @property
    def custom_tls(self) -> bool:
        return self.ca_file is not None or self.client_cert_file is not None


DIRECT = Egress()


def parse_proxy(url: str) -> Proxy:
    """A proxy from its URL; `ValueError` says what is wrong (without echoing credentials)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid proxy URL") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ValueError("TLS to the proxy (https://) is not supported")
    if scheme.startswith("socks"):
        raise ValueError("SOCKS proxies are not supported")
    if scheme != "http":
        raise ValueError(f"scheme {parts.scheme!r} is not supported")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("must not have a path or query")
    authorization = ""
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return Proxy(parts.hostname.lower(), port or 80, authorization)


def _env(env: Mapping[str, str], name: str) -> tuple[str, str]:
    """(variable, value) of the lowercase or else uppercase form of `name`; ("", "") when both are unset."""
    for var in (name.lower(), name.upper()):
        value = env.get(var, "").strip()
        if value:
            return var, value
    return "", ""


def env_proxy(url: str, env: Mapping[str, str]) -> tuple[Proxy | None, str]:
    """The proxy the environment names for `url` (None when none applies or NO_PROXY exempts its host),
    and the variable it came from. `ValueError` (naming nothing secret) when that variable is unusable."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    var, value = _env(env, f"{scheme}_proxy")
    if not value:
        return None, ""
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    if _loopback(host) or bypasses_proxy(host, port, _env(env, "no_proxy")[1]):
        return None, ""
    return parse_proxy(value), var


_SEPARATORS = re.compile(r"[,\s]+")


def _loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bypasses_proxy(host: str, port: int, no_proxy: str) -> bool:
    """True when `no_proxy` exempts `host`:`port` from the proxy (see the module docstring)."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in _SEPARATORS.split(no_proxy.lower()):
        if not entry:
            continue
        if entry == "*":
            return True
        entry, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass  # a name never matches an IP host: names are not resolved
            continue
        name = entry.removeprefix("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        address, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return address, int(port) if port.isdigit() else None
    if entry.count(":") == 1:  # name:port or IPv4:port (more colons: a bare IPv6 address)
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """The client TLS context for one provider. Raises `OSError` for a file that cannot be read and
    `ssl.SSLError` for one that is not what it should be (or a key that does not match its certificate)."""
    ctx = ssl.create_default_context(cafile=ca_file)  # cafile given: only those CAs are trusted
    ctx.set_alpn_protocols(["http/1.1"])
    if cert_file is not None:
        # A password callback, or OpenSSL would prompt on the terminal for an encrypted key (and hang a server).
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    return ctx


def _no_password() -> bytes:
    return b""


class TlsContexts:
    """The client TLS context for each egress: `default` (else `ssl.create_default_context()`: system CAs,
    `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), or the one made from the egress's CA bundle and client
    certificate, built once per set of files (the config checked them at load)."""

    def __init__(self, default: ssl.SSLContext | None = None) -> None:
        self._default = default
        self._custom: dict[tuple[str | None, str | None, str | None], ssl.SSLContext] = {}

    def get(self, egress: Egress) -> ssl.SSLContext:
        if egress.custom_tls:
            files = (egress.ca_file, egress.client_cert_file, egress.client_key_file)
            ctx = self._custom.get(files)
            if ctx is None:
                ctx = self._custom[files] = tls_context(*files)
            return ctx
        if self._default is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._default = ctx
        return self._default
