"""Webhook callbacks cannot be turned against the service's own network (SSRF).

Every unsafe form is refused at submit time when the URL shows it, and at delivery on the addresses
the name resolves to; delivery connects to the address it checked. No traffic leaves the machine:
names are resolved by an injected resolver, or are ``localhost``, and the one receiver listens on
loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from service.callbacks import check_callback_url, pin_callback
from service.errors import CallbackRefusedError
from service.webhooks import deliver

SECRET = "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0"


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:169.254.169.254]/latest/meta-data/",  # IPv4-mapped IPv6
        "http://[::ffff:a9fe:a9fe]/latest/meta-data/",  # the same, in hex
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of the metadata address
        "http://[fd00:ec2::254]/latest/meta-data/",  # AWS metadata over IPv6
        "http://2852039166/latest/meta-data/",  # 169.254.169.254 as one decimal number
        "http://0xa9.0xfe.0xa9.0xfe/",  # ... in dotted hex
        "http://100.100.100.200/",  # Alibaba metadata
        "http://127.0.0.1:8000/v1/jobs",  # the service's own API
        "http://[::1]:8000/v1/jobs",
        "http://[::ffff:127.0.0.1]:8000/v1/jobs",
        "http://localhost:8000/v1/jobs",
        "http://api.localhost/v1/jobs",
        "http://0.0.0.0:8000/",
        "http://metadata.azure.internal/",
    ],
)
def test_unsafe_callback_hosts_are_refused_at_submit_time(url: str) -> None:
    with pytest.raises(CallbackRefusedError) as info:
        check_callback_url(url, [])
    assert info.value.code == "CALLBACK_REFUSED"


def _resolver(table: dict[str, Sequence[str]]) -> Any:
    def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "addresses",
    [
        ["169.254.169.254"],
        ["::ffff:169.254.169.254"],
        ["fd00:ec2::254"],
        ["127.0.0.1"],
        ["::1"],
        ["93.184.215.14", "127.0.0.1"],  # one bad address among good ones: refused
    ],
)
def test_names_that_resolve_to_internal_addresses_are_refused_at_delivery(
    addresses: list[str],
) -> None:
    url = "https://hooks.partner.test/x"
    check_callback_url(url, [])  # the name itself says nothing
    with pytest.raises(CallbackRefusedError, match="resolved to"):
        pin_callback(url, [], resolver=_resolver({"hooks.partner.test": addresses}))


def test_localhost_is_resolved_by_the_system_and_refused() -> None:
    with pytest.raises(CallbackRefusedError):
        pin_callback("http://localhost:9/x", [])


def test_a_name_allowed_by_the_allowlist_still_cannot_reach_metadata_or_loopback() -> None:
    allowed = ["*.partner.test"]
    for bad in ("169.254.169.254", "127.0.0.1"):
        with pytest.raises(CallbackRefusedError):
            pin_callback(
                "https://hooks.partner.test/x",
                allowed,
                resolver=_resolver({"hooks.partner.test": [bad]}),
            )


def test_a_public_name_is_pinned_to_the_address_checked() -> None:
    pinned = pin_callback(
        "https://hooks.partner.test:8443/x?y=1",
        [],
        resolver=_resolver({"hooks.partner.test": ["93.184.215.14", "2606:2800:21f::1"]}),
    )
    assert pinned.url == "https://93.184.215.14:8443/x?y=1"
    assert pinned.host_header == "hooks.partner.test:8443"
    assert pinned.sni_hostname == "hooks.partner.test"
    v6 = pin_callback(
        "http://h.partner.test/x", [], resolver=_resolver({"h.partner.test": ["2606:2800:21f::1"]})
    )
    assert v6.url == "http://[2606:2800:21f::1]/x" and v6.sni_hostname is None


def test_private_ranges_need_the_allowlist_once_it_is_set() -> None:
    resolver = _resolver({"lis.hospital.test": ["10.20.1.5"]})
    pin_callback("http://lis.hospital.test/x", [], resolver=resolver)  # default: LIS allowed
    pin_callback("http://lis.hospital.test/x", ["10.20.0.0/16"], resolver=resolver)
    with pytest.raises(CallbackRefusedError, match="XMAG_CALLBACK_ALLOWED_HOSTS"):
        pin_callback("http://lis.hospital.test/x", ["192.168.0.0/16"], resolver=resolver)


# -- delivery connects to the checked address -----------------------------------------------
class _Receiver:
    def __init__(self) -> None:
        self.hosts: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.hosts.append(str(self.headers.get("host")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_delivery_refuses_loopback_unless_its_network_is_allowed(receiver: _Receiver) -> None:
    url = f"http://hooks.partner.test:{receiver.port}/hook"
    resolver = _resolver({"hooks.partner.test": ["127.0.0.1"]})
    with pytest.raises(CallbackRefusedError):
        deliver(url, "msg_1", "{}", SECRET, timeout_s=5, resolver=resolver)
    assert receiver.hosts == []
    status = deliver(
        url, "msg_2", "{}", SECRET, timeout_s=5, allowed_hosts=["127.0.0.0/8"], resolver=resolver
    )
    # Connected to the pinned address, with the name the client gave as Host.
    assert status == 204 and receiver.hosts == [f"hooks.partner.test:{receiver.port}"]


def test_delivery_never_resolves_twice(receiver: _Receiver) -> None:
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:  # public first, internal afterwards
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["169.254.169.254"]

    deliver(
        f"http://rebind.partner.test:{receiver.port}/hook",
        "msg_3",
        "{}",
        SECRET,
        timeout_s=5,
        allowed_hosts=["127.0.0.0/8"],
        resolver=rebinding,
    )
    assert calls == ["rebind.partner.test"] and len(receiver.hosts) == 1
