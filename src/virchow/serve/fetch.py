"""Download of images named by URL, with a destination policy against server-side request forgery.

A row may be an http(s) URL. Before each connection, and again for every redirect, the host is
resolved and every resolved address is checked. Loopback, private, link-local, multicast, reserved,
unspecified, shared (100.64.0.0/10) and other not globally routable addresses are rejected, as are
cloud metadata services. The same addresses written as IPv4-mapped, IPv4-compatible, 6to4 or NAT64
IPv6 addresses are rejected too. The connection then goes to the checked address itself, so a
second DNS answer (DNS rebinding) cannot redirect it. The Host header and the TLS server name stay
the URL's host.

Entries of the allow-list (``fetch_allow``) permit chosen destinations: ``HOST`` or ``HOST:PORT``
(exact name, any resolved address except cloud metadata ones), ``*.DOMAIN`` (subdomains), ``IP``,
``IP:PORT``, ``[IPv6]:PORT`` or a CIDR network (any address in it, metadata addresses included).

Downloads stream with a connect timeout, a total timeout, a size cap and a redirect cap. Proxy
environment variables are ignored, because a proxy would connect to the host on its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import httpx

from virchow import __version__
from virchow.errors import ConfigError
from virchow.serve.errors import BadRequestError, GatewayTimeoutError, PayloadTooLargeError, UnsupportedMediaTypeError

_logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

# Instance metadata and platform endpoints that hand out credentials. AWS, Azure, GCP and Oracle use
# 169.254.169.254 (AWS also fd00:ec2::254), AWS ECS 169.254.170.2, Alibaba 100.100.100.200, and
# Azure's platform endpoint (WireServer) is the public address 168.63.129.16.
CLOUD_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200", "168.63.129.16")
)
CLOUD_METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)

_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598, carrier-grade NAT
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)

# True while an ImageFetcher sends a request, so that the log filter below can recognise httpx's records.
_fetching: contextvars.ContextVar[bool] = contextvars.ContextVar("virchow_fetching", default=False)


class _DropFetchRequestLogs(logging.Filter):
    """Drop httpx's per-request INFO records (they contain the full URL) while an ImageFetcher is sending.

    URL rows can carry access tokens in their query (pre-signed URLs), so they must not reach the log.
    Requests of other httpx clients in the process are logged as usual.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not _fetching.get()


def _install_log_filter() -> None:
    httpx_logger = logging.getLogger("httpx")
    if not any(isinstance(existing, _DropFetchRequestLogs) for existing in httpx_logger.filters):
        httpx_logger.addFilter(_DropFetchRequestLogs())


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """Return the IPv4 address that an IPv6 address carries and the name of the form, or None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, "IPv4-mapped"
    if address.sixtofour is not None:
        return address.sixtofour, "6to4"
    if address in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address)), "IPv4-compatible"
    return None


def address_block_reason(address: IPAddress) -> str | None:
    """Return why the default policy rejects ``address`` (for example ``loopback``), or None if it is public."""
    if address in CLOUD_METADATA_ADDRESSES:
        return "cloud metadata"

    # IPv6 forms that carry an IPv4 address take the verdict of that address.
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "scoped (zone index)"
        embedded = embedded_ipv4(address)
        if embedded is not None:
            inner, form = embedded
            reason = address_block_reason(inner)
            return f"{reason} ({form} IPv6)" if reason else None
        if address in _NAT64_LOCAL_USE:
            return "local-use NAT64"

    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED_ADDRESS_SPACE:
        return "shared (carrier-grade NAT)"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "not globally routable"
    return None


@dataclass(frozen=True)
class AllowEntry:
    """One ``fetch_allow`` entry: a host name (``*.`` for subdomains) or a network, optionally with a port."""

    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches_host(self, host: str, port: int) -> bool:
        if self.host is None or (self.port is not None and self.port != port):
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def matches_address(self, address: IPAddress, port: int) -> bool:
        if self.network is None or (self.port is not None and self.port != port):
            return False
        return address.version == self.network.version and address in self.network


def parse_allow_entry(entry: str) -> AllowEntry:
    """Parse one ``fetch_allow`` entry.

    Raises:
        ConfigError: the entry matches no accepted form; the message lists them.
    """
    text = entry.strip().lower().rstrip(".")
    forms = "use HOST, HOST:PORT, *.DOMAIN, IP, IP:PORT, [IPv6]:PORT or a CIDR network such as 10.0.0.0/8"
    if not text:
        raise ConfigError(f"empty fetch_allow entry: {forms}")
    try:
        return AllowEntry(network=ipaddress.ip_network(text, strict=False))
    except ValueError:
        pass
    host, port = text, None
    if text.startswith("["):
        inside, _, rest = text[1:].partition("]")
        host = inside
        if rest:
            port = _parse_port(rest.removeprefix(":"), entry, forms)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _parse_port(port_text, entry, forms)
    try:
        return AllowEntry(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    name = host.removeprefix("*.")
    if not name or not all(label and len(label) <= 63 for label in name.split(".")) or ":" in name or "/" in name:
        raise ConfigError(f"invalid fetch_allow entry {entry!r}: {forms}")
    return AllowEntry(host=host, port=port)


def _parse_port(text: str, entry: str, forms: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"invalid port in fetch_allow entry {entry!r}: {forms}")
    return int(text)


class AddressPolicy:
    """Decide which destinations may be fetched: public addresses plus the allow-list."""

    def __init__(self, allow: Sequence[str] = ()) -> None:
        self.entries = [parse_allow_entry(entry) for entry in allow]

    def host_allowed(self, host: str, port: int) -> bool:
        return any(entry.matches_host(host, port) for entry in self.entries)

    def check_host(self, host: str, port: int) -> None:
        """Reject cloud metadata host names before they are resolved, unless allow-listed.

        Raises:
            BadRequestError: the host is a metadata service name.
        """
        if host in CLOUD_METADATA_HOSTS and not self.host_allowed(host, port):
            raise BadRequestError(f"URL host {host} is a cloud metadata service; it is never fetched", code="url_not_allowed")

    def check_addresses(self, host: str, port: int, addresses: Sequence[IPAddress]) -> None:
        """Check every resolved address of ``host``.

        Raises:
            BadRequestError: an address is rejected; the message names it, the reason and the fix.
        """
        host_allowed = self.host_allowed(host, port)
        for address in addresses:
            if any(entry.matches_address(address, port) for entry in self.entries):
                continue
            if host_allowed and address not in CLOUD_METADATA_ADDRESSES:
                continue
            reason = address_block_reason(address)
            if reason is not None:
                destination = host if host == str(address) else f"{host} ({address})"
                raise BadRequestError(
                    f"URL host {destination} port {port} is a {reason} address, which is not fetched; the server's "
                    "fetch_allow setting can permit it",
                    code="url_not_allowed",
                )


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # ASCII (IDNA) host name or IP address text, lower case, without brackets
    port: int
    host_header: str


def _parse_target(text: str | httpx.URL) -> _Target:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BadRequestError(f"invalid URL: {exc}", code="invalid_url") from None
    if url.scheme not in ("http", "https"):
        raise BadRequestError(f"URL scheme {url.scheme!r} is not supported: use http or https", code="invalid_url")
    if url.userinfo:
        raise BadRequestError("URLs with a user name or password are not accepted", code="invalid_url")
    host = unquote(url.raw_host.decode("ascii")).lower().rstrip(".")
    if not host:
        raise BadRequestError("URL has no host", code="invalid_url")
    port = url.port or (443 if url.scheme == "https" else 80)
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if url.port is None else f"{bracketed}:{url.port}"
    return _Target(url=url, host=host, port=port, host_header=host_header)


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Resolve ``host`` with the system resolver; IP literals are returned without a lookup.

    Raises:
        BadRequestError: the name does not resolve.
    """
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise BadRequestError(f"URL host {host} could not be resolved: {exc}", code="fetch_failed") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _default_ssl_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # certifi is a dependency of httpx, but fall back to the system store
        return ssl.create_default_context()


def direct_transport() -> httpx.AsyncHTTPTransport:
    """Return the transport of URL downloads: direct connections, no retries, no keep-alive.

    Keep-alive is off because a pooled connection is keyed by the IP address, and reusing it for another
    host name on the same address would send that host's request over the first host's TLS session.
    """
    return httpx.AsyncHTTPTransport(verify=_default_ssl_context(), retries=0, limits=httpx.Limits(max_keepalive_connections=0))


class ImageFetcher:
    """Download image bytes from http(s) URLs under an :class:`AddressPolicy`.

    Args:
        policy: destinations that may be contacted.
        connect_timeout_s: TCP and TLS connect timeout of one connection.
        total_timeout_s: time limit of one URL, DNS and redirects included.
        max_bytes: size limit of the downloaded body.
        max_redirects: redirects followed; each target is checked like the first.
        resolver: ``async (host, port) -> addresses``; the system resolver by default.
        transport: httpx transport; the default one connects directly, without proxies or retries.
        on_fetch: called with ``ok``, ``rejected``, ``too_large``, ``timeout`` or ``failed`` per URL.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        connect_timeout_s: float = 5.0,
        total_timeout_s: float = 20.0,
        max_bytes: int = 16 * 1024 * 1024,
        max_redirects: int = 3,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_fetch: Callable[[str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.total_timeout_s = total_timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self._resolve = resolver or resolve_host
        self._on_fetch = on_fetch
        _install_log_filter()
        self._client = httpx.AsyncClient(
            transport=transport if transport is not None else direct_transport(),
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(total_timeout_s, connect=connect_timeout_s),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        """Return the body of ``url`` after following at most ``max_redirects`` checked redirects.

        Raises:
            BadRequestError: the URL is invalid or not allowed, the connection fails, or the host responds with an error status.
            PayloadTooLargeError: the body is larger than ``max_bytes``.
            UnsupportedMediaTypeError: the body is content-encoded (compressed), which is not accepted.
            GatewayTimeoutError: the download took longer than ``total_timeout_s``.
        """
        outcome = "failed"
        token = _fetching.set(True)
        try:
            data = await asyncio.wait_for(self._fetch(url), timeout=self.total_timeout_s)
            outcome = "ok"
            return data
        except asyncio.TimeoutError:
            outcome = "timeout"
            raise GatewayTimeoutError(
                f"downloading the image took longer than {self.total_timeout_s:g} s", code="fetch_timeout"
            ) from None
        except BadRequestError as exc:
            outcome = "rejected" if exc.code in ("url_not_allowed", "invalid_url") else "failed"
            raise
        except PayloadTooLargeError:
            outcome = "too_large"
            raise
        finally:
            _fetching.reset(token)
            if self._on_fetch is not None:
                self._on_fetch(outcome)

    async def _fetch(self, url: str) -> bytes:
        target = _parse_target(url)
        for _hop in range(self.max_redirects + 1):
            self.policy.check_host(target.host, target.port)
            addresses = await self._resolve(target.host, target.port)
            if not addresses:
                raise BadRequestError(f"URL host {target.host} resolved to no address", code="fetch_failed")
            self.policy.check_addresses(target.host, target.port, addresses)
            body, location = await self._get_any(target, addresses)
            if location is None:
                return body
            target = _parse_target(target.url.join(location))
        raise BadRequestError(f"URL redirected more than {self.max_redirects} times", code="too_many_redirects")

    async def _get_any(self, target: _Target, addresses: Sequence[IPAddress]) -> tuple[bytes, str | None]:
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._get(target, address)
            except httpx.ConnectError as exc:
                last_error = exc
                _logger.debug("connecting to %s (%s) failed: %s", target.host, address, exc)
        raise BadRequestError(
            f"could not connect to URL host {target.host} port {target.port}: {last_error}", code="fetch_failed"
        )

    async def _get(self, target: _Target, address: IPAddress) -> tuple[bytes, str | None]:
        pinned = target.url.copy_with(host=str(address))
        extensions = {}
        if target.url.scheme == "https" and target.host != str(address):
            extensions["sni_hostname"] = target.host
        headers = {
            "Host": target.host_header,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
            "User-Agent": f"virchow-serve/{__version__}",
        }
        try:
            async with self._client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                if response.status_code in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise BadRequestError(
                            f"URL host {target.host} sent a redirect without a Location header", code="fetch_failed"
                        )
                    return b"", location
                if response.status_code != 200:
                    raise BadRequestError(
                        f"URL host {target.host} responded with HTTP {response.status_code}", code="fetch_failed"
                    )
                return await self._read_body(target, response), None
        except httpx.ConnectError:
            raise
        except httpx.TimeoutException as exc:
            raise GatewayTimeoutError(f"URL host {target.host} timed out ({type(exc).__name__})", code="fetch_timeout") from None
        except httpx.HTTPError as exc:
            raise BadRequestError(f"downloading from URL host {target.host} failed: {type(exc).__name__}", code="fetch_failed") from None

    async def _read_body(self, target: _Target, response: httpx.Response) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UnsupportedMediaTypeError(
                f"URL host {target.host} sent a {encoding}-encoded body; only unencoded image files are accepted",
                code="unsupported_content_encoding",
            )
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLargeError(
                f"the image at URL host {target.host} has {declared} bytes, over the limit of {self.max_bytes}",
                code="image_too_large",
            )
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received > self.max_bytes:
                raise PayloadTooLargeError(
                    f"the image at URL host {target.host} is larger than the limit of {self.max_bytes} bytes",
                    code="image_too_large",
                )
            chunks.append(chunk)
        return b"".join(chunks)
