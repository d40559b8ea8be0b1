"""The URL address policy, with fake DNS and a fake connection layer.

No test here opens a socket: the resolver is a table, and the transport either fails the test when it
is reached or responds from memory, recording what a real connection would have been sent.
"""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest

from virchow.errors import ConfigError
from virchow.serve.errors import BadRequestError, PayloadTooLargeError
from virchow.serve.fetch import AddressPolicy, ImageFetcher, address_block_reason, parse_allow_entry, resolve_host

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"

BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.7", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fd00:ec2::254", "cloud metadata"),
    ("168.63.129.16", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("100.64.0.1", "shared"),
    ("192.0.2.1", "private"),  # TEST-NET-1 documentation range
    ("2001:db8::1", "private"),  # IPv6 documentation range
    ("::ffff:127.0.0.1", "loopback (IPv4-mapped IPv6)"),
    ("::ffff:10.0.0.1", "private (IPv4-mapped IPv6)"),
    ("::ffff:169.254.169.254", "cloud metadata (IPv4-mapped IPv6)"),
    ("::ffff:192.168.0.1", "private (IPv4-mapped IPv6)"),
    ("::127.0.0.1", "loopback (IPv4-compatible IPv6)"),
    ("::10.1.2.3", "private (IPv4-compatible IPv6)"),
    ("2002:7f00:1::", "loopback (6to4 IPv6)"),
    ("2002:a9fe:a9fe::", "cloud metadata (6to4 IPv6)"),
    ("2002:c0a8:101::1", "private (6to4 IPv6)"),
    ("64:ff9b::7f00:1", "loopback (NAT64 IPv6)"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata (NAT64 IPv6)"),
    ("64:ff9b::ac10:1", "private (NAT64 IPv6)"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("fe80::1%eth0", "scoped"),
]


@pytest.mark.parametrize(("address", "reason"), BLOCKED)
def test_blocked_addresses(address, reason):
    found = address_block_reason(ipaddress.ip_address(address))
    assert found is not None
    assert found.startswith(reason)


@pytest.mark.parametrize("address", [PUBLIC_V4, "8.8.8.8", PUBLIC_V6, "::ffff:8.8.8.8", "2002:808:808::", "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert address_block_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("entry", "host", "network", "port"),
    [
        ("tiles.example.org", "tiles.example.org", None, None),
        ("Tiles.Example.org.", "tiles.example.org", None, None),
        ("localhost:8080", "localhost", None, 8080),
        ("*.example.org", "*.example.org", None, None),
        ("10.0.0.0/8", None, "10.0.0.0/8", None),
        ("127.0.0.1", None, "127.0.0.1/32", None),
        ("127.0.0.1:9000", None, "127.0.0.1/32", 9000),
        ("[::1]:9000", None, "::1/128", 9000),
        ("fd00::/8", None, "fd00::/8", None),
    ],
)
def test_allow_entry_forms(entry, host, network, port):
    parsed = parse_allow_entry(entry)
    assert parsed.host == host
    assert (str(parsed.network) if parsed.network else None) == network
    assert parsed.port == port


@pytest.mark.parametrize("entry", ["", "http://x", "host:port", "a..b", "10.0.0.1:99999", "[::1]:x"])
def test_allow_entry_invalid(entry):
    with pytest.raises(ConfigError):
        parse_allow_entry(entry)


class FakeDns:
    """A resolver table; a name missing from it fails the test instead of reaching real DNS."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list:
        self.lookups.append(host)
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        if host not in self.table:
            pytest.fail(f"unexpected DNS lookup of {host}")
        return [ipaddress.ip_address(address) for address in self.table[host]]


class NoConnection(httpx.AsyncBaseTransport):
    """A transport that fails the test if the fetcher ever tries to connect."""

    def __init__(self) -> None:
        self.attempts: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts.append(request)
        pytest.fail(f"a connection was attempted to {request.url.host}")


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple:
    return status, body, headers or {}


class Recorder(httpx.AsyncBaseTransport):
    """Respond from memory and record each request a real connection would have carried.

    ``answers`` maps a path to ``answer(status, body, headers)``; the body is streamed like a socket's.
    """

    def __init__(self, answers: dict[str, tuple]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body, headers = self.answers[request.url.path]
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


def fetch(url: str, dns: FakeDns, transport: httpx.AsyncBaseTransport, allow=(), **options) -> bytes:
    async def main() -> bytes:
        fetcher = ImageFetcher(AddressPolicy(allow), resolver=dns, transport=transport, **options)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize(("address", "reason"), [entry for entry in BLOCKED if "%" not in entry[0]])
def test_names_resolving_to_blocked_addresses(address, reason):
    dns = FakeDns({"images.example.org": [address]})
    transport = NoConnection()
    with pytest.raises(BadRequestError) as error:
        fetch("https://images.example.org/tile.png", dns, transport)
    assert error.value.code == "url_not_allowed"
    assert reason.split(" (")[0] in error.value.message
    assert dns.lookups == ["images.example.org"]
    assert transport.attempts == []


@pytest.mark.parametrize("address", ["10.1.2.3", "[::ffff:7f00:1]", "[fd00:ec2::254]", "169.254.169.254", "[64:ff9b::a00:1]"])
def test_literal_addresses_rejected_without_connecting(address):
    transport = NoConnection()
    with pytest.raises(BadRequestError):
        fetch(f"http://{address}/latest/meta-data/", FakeDns({}), transport)
    assert transport.attempts == []


def test_any_blocked_address_rejects_name():
    dns = FakeDns({"mixed.example.org": [PUBLIC_V4, "10.0.0.7"]})
    with pytest.raises(BadRequestError, match="10.0.0.7"):
        fetch("http://mixed.example.org/a.png", dns, NoConnection())


def test_metadata_host_name_rejected_before_dns():
    dns = FakeDns({})
    with pytest.raises(BadRequestError, match="cloud metadata"):
        fetch("http://metadata.google.internal/computeMetadata/v1/", dns, NoConnection())
    assert dns.lookups == []


def test_connects_to_checked_address_with_original_host():
    dns = FakeDns({"tiles.example.org": [PUBLIC_V4]})
    recorder = Recorder({"/a.png": answer(200, b"PNGDATA")})
    assert fetch("https://tiles.example.org:8443/a.png?sig=abc", dns, recorder) == b"PNGDATA"
    (request,) = recorder.requests
    assert request.url.host == PUBLIC_V4
    assert request.url.port == 8443
    assert request.url.query == b"sig=abc"
    assert request.headers["host"] == "tiles.example.org:8443"
    assert request.extensions["sni_hostname"] == "tiles.example.org"
    assert request.headers["accept-encoding"] == "identity"


def test_ipv6_destination_is_bracketed():
    dns = FakeDns({"v6.example.org": [PUBLIC_V6]})
    recorder = Recorder({"/a.png": answer(200, b"x")})
    fetch("http://v6.example.org/a.png", dns, recorder)
    assert recorder.requests[0].url.host == PUBLIC_V6
    assert recorder.requests[0].headers["host"] == "v6.example.org"


def test_dns_rebinding_cannot_change_connection():
    """The name is resolved once per hop and the connection goes to the address resolved then."""

    class Rebinding(FakeDns):
        async def __call__(self, host: str, port: int) -> list:
            self.lookups.append(host)
            answer = PUBLIC_V4 if len(self.lookups) == 1 else "127.0.0.1"
            return [ipaddress.ip_address(answer)]

    dns = Rebinding({})
    recorder = Recorder({"/a.png": answer(200, b"x")})
    fetch("http://rebind.example.org/a.png", dns, recorder)
    assert dns.lookups == ["rebind.example.org"]
    assert [request.url.host for request in recorder.requests] == [PUBLIC_V4]


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1/admin",
        "http://[::1]:8080/",
        "http://internal.example.org/secret",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://metadata.google.internal/",
    ],
)
def test_redirect_target_is_checked(location):
    dns = FakeDns({"tiles.example.org": [PUBLIC_V4], "internal.example.org": ["192.168.10.5"]})
    recorder = Recorder({"/a.png": answer(302, headers={"Location": location})})
    with pytest.raises(BadRequestError) as error:
        fetch("http://tiles.example.org/a.png", dns, recorder)
    assert error.value.code == "url_not_allowed"
    assert len(recorder.requests) == 1


def test_redirect_to_other_scheme_rejected():
    dns = FakeDns({"tiles.example.org": [PUBLIC_V4]})
    recorder = Recorder({"/a.png": answer(301, headers={"Location": "file:///etc/passwd"})})
    with pytest.raises(BadRequestError) as error:
        fetch("http://tiles.example.org/a.png", dns, recorder)
    assert error.value.code == "invalid_url"


def test_redirect_cap():
    dns = FakeDns({"tiles.example.org": [PUBLIC_V4]})
    recorder = Recorder({"/a.png": answer(302, headers={"Location": "/a.png"})})
    with pytest.raises(BadRequestError) as error:
        fetch("http://tiles.example.org/a.png", dns, recorder, max_redirects=2)
    assert error.value.code == "too_many_redirects"
    assert len(recorder.requests) == 3


def test_allow_list_network_permits_private_address():
    dns = FakeDns({"tiles.internal": ["10.20.30.40"]})
    recorder = Recorder({"/a.png": answer(200, b"ok")})
    assert fetch("http://tiles.internal/a.png", dns, recorder, allow=["10.20.0.0/16"]) == b"ok"
    assert recorder.requests[0].url.host == "10.20.30.40"


def test_allow_list_host_permits_private_but_not_metadata():
    recorder = Recorder({"/a.png": answer(200, b"ok")})
    assert fetch("http://tiles.internal/a.png", FakeDns({"tiles.internal": ["10.0.0.9"]}), recorder, allow=["tiles.internal"]) == b"ok"
    with pytest.raises(BadRequestError, match="cloud metadata"):
        fetch("http://tiles.internal/a.png", FakeDns({"tiles.internal": ["169.254.169.254"]}), NoConnection(), allow=["tiles.internal"])


def test_allow_list_port_is_enforced():
    dns = FakeDns({})
    with pytest.raises(BadRequestError):
        fetch("http://10.0.0.5:8081/a.png", dns, NoConnection(), allow=["10.0.0.5:8080"])
    recorder = Recorder({"/a.png": answer(200, b"ok")})
    assert fetch("http://10.0.0.5:8080/a.png", dns, recorder, allow=["10.0.0.5:8080"]) == b"ok"


def test_wildcard_allow_matches_subdomains_only():
    dns = FakeDns({"a.tiles.internal": ["10.0.0.1"], "tiles.internal.evil.org": ["10.0.0.2"]})
    recorder = Recorder({"/x.png": answer(200, b"ok")})
    assert fetch("http://a.tiles.internal/x.png", dns, recorder, allow=["*.tiles.internal"]) == b"ok"
    with pytest.raises(BadRequestError):
        fetch("http://tiles.internal.evil.org/x.png", dns, NoConnection(), allow=["*.tiles.internal"])


def test_declared_size_over_cap():
    dns = FakeDns({"tiles.example.org": [PUBLIC_V4]})
    recorder = Recorder({"/a.png": answer(200, b"x" * 5000, {"Content-Length": "5000"})})
    with pytest.raises(PayloadTooLargeError):
        fetch("http://tiles.example.org/a.png", dns, recorder, max_bytes=1000)


def test_fetch_outcomes_are_reported():
    outcomes: list[str] = []

    async def main() -> None:
        dns = FakeDns({"tiles.example.org": [PUBLIC_V4]})
        recorder = Recorder({"/a.png": answer(200, b"x")})
        fetcher = ImageFetcher(AddressPolicy(), resolver=dns, transport=recorder, on_fetch=outcomes.append)
        await fetcher.fetch("http://tiles.example.org/a.png")
        with pytest.raises(BadRequestError):
            await fetcher.fetch("http://10.0.0.1/a.png")
        await fetcher.aclose()

    asyncio.run(main())
    assert outcomes == ["ok", "rejected"]


def test_system_resolver_local_forms():
    """The default resolver, on forms that resolve without a DNS query: IP literals and numeric IPv4."""
    assert asyncio.run(resolve_host("127.0.0.1", 80)) == [ipaddress.ip_address("127.0.0.1")]
    assert asyncio.run(resolve_host("::1", 80)) == [ipaddress.ip_address("::1")]
    assert ipaddress.ip_address("127.0.0.1") in asyncio.run(resolve_host("2130706433", 80))
