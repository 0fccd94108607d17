"""Which hosts a job's ``callback_url`` may target, checked when the job is submitted and again,
on the addresses the name resolves to, when the webhook is delivered.

A callback is a request the service makes on a client's behalf, so it is a server-side request
forgery risk: a URL naming a cloud metadata endpoint, a link-local address or the service's own
loopback could read credentials or call its own API. The rules, applied to every address (IPv4
literals in any form ``inet_aton`` accepts, IPv6 literals, IPv4-mapped and NAT64 IPv6 taken as the
IPv4 they carry, and every address a name resolves to):

* always refused: link-local (169.254.0.0/16, fe80::/10), the cloud metadata addresses
  (169.254.169.254, fd00:ec2::254, 100.100.100.200, 168.63.129.16) and names, unspecified,
  multicast, broadcast and reserved addresses;
* loopback (127.0.0.0/8, ::1, ``localhost``) is refused unless a network in
  ``XMAG_CALLBACK_ALLOWED_HOSTS`` contains it (a test rig, never a default);
* ``XMAG_CALLBACK_ALLOWED_HOSTS`` narrows callbacks further to named hosts (``lis.example.org``),
  domain suffixes (``*.example.org``) or networks (``10.20.0.0/16``); the LIS usually sits on a
  private network, so private addresses are not refused by default.

At delivery ``pin_callback`` resolves the host once, checks every address, and returns the URL
with the checked address in place of the name (``Host`` header and TLS server name kept), so a
name cannot resolve to a public address when checked and to an internal one when connected
(DNS rebinding). Redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from service.errors import CallbackRefusedError

__all__ = ["PinnedCallback", "Resolver", "check_callback_url", "pin_callback", "system_resolver"]

# Cloud metadata services answer on link-local addresses, these names and these addresses.
_METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata", "instance-data", "metadata.azure.internal"}
)
_METADATA_IPS = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str, int], Sequence[str]]
"""(host, port) -> the addresses it resolves to, as strings (``system_resolver``)."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _ip(host: str) -> _Address | None:
    """``host`` as an address when it is a literal one, in any form a resolver would accept."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        ip: _Address = ipaddress.ip_address(text)
    except ValueError:
        if not text or ":" in text:
            return None
        try:  # "2852039166", "0xa9.0xfe.0xa9.0xfe", "169.254.43518": inet_aton's forms
            ip = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return _unwrap(ip)


def _unwrap(ip: _Address) -> _Address:
    """The IPv4 address an IPv4-mapped (::ffff:a.b.c.d) or NAT64 (64:ff9b::a.b.c.d) one carries."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def _never(ip: _Address) -> bool:
    """Addresses no callback may reach, whatever the allowlist says."""
    return (
        ip in _METADATA_IPS
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
        or ip == ipaddress.IPv4Address("255.255.255.255")
    )


def _networks(allowed_hosts: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for rule in allowed_hosts:
        if "/" in rule:
            try:
                out.append(ipaddress.ip_network(rule.strip(), strict=False))
            except ValueError:
                continue
    return out


def _name_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    for rule in (r.strip().lower() for r in allowed_hosts):
        if "/" in rule:
            continue
        if rule.startswith("*."):
            if host.endswith(rule[1:]) and host != rule[2:]:
                return True
        elif host == rule:
            return True
    return False


def _check_address(host: str, ip: _Address, allowed_hosts: Sequence[str], *, named: bool) -> None:
    """Refuse ``ip`` (``host``'s literal address, or one it resolved to)."""
    nets = _networks(allowed_hosts)
    in_net = any(ip.version == n.version and ip in n for n in nets)
    where = f"{host!r}" if not named else f"{host!r} (resolved to {ip})"
    if _never(ip):
        raise CallbackRefusedError(
            f"callback_url host {where} is link-local, a cloud metadata service or not a "
            "unicast address; webhooks never go there. Use the address of your LIS or webhook "
            "receiver.",
            host=host,
        )
    if ip.is_loopback and not in_net:
        raise CallbackRefusedError(
            f"callback_url host {where} is a loopback address (this machine, the service's own "
            "API); webhooks do not go there unless XMAG_CALLBACK_ALLOWED_HOSTS lists its network.",
            host=host,
        )
    if allowed_hosts and not in_net and not (named and _name_allowed(host, allowed_hosts)):
        raise CallbackRefusedError(
            f"callback_url host {where} is not in XMAG_CALLBACK_ALLOWED_HOSTS "
            f"({', '.join(allowed_hosts)}); ask the service's operator to add it.",
            host=host,
        )


def _host_of(url: str) -> str:
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if not host:
        raise CallbackRefusedError("callback_url has no host.", host="")
    return host


def check_callback_url(
    url: str, allowed_hosts: Sequence[str], *, resolver: Resolver | None = None
) -> None:
    """Refuse a callback URL whose host is never allowed, or not allowed here (submit time).

    A literal address is checked as it is; a name is checked against the metadata and loopback
    names and the allowlist (a name no name rule allows passes when the allowlist has networks
    and every address it resolves to now lies in one). The addresses a name resolves to are
    checked again at delivery (``pin_callback``), where they are used.

    Raises:
        CallbackRefusedError: with the host and the setting that would allow it.
    """
    host = _host_of(url)
    ip = _ip(host)
    if ip is not None:
        _check_address(host, ip, allowed_hosts, named=False)
        return
    if host in _METADATA_HOSTS:
        raise CallbackRefusedError(
            f"callback_url host {host!r} is a cloud metadata service; webhooks never go there. "
            "Use the address of your LIS or webhook receiver.",
            host=host,
        )
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        _check_address(host, ipaddress.IPv4Address("127.0.0.1"), allowed_hosts, named=False)
        return
    if allowed_hosts and not _name_allowed(host, allowed_hosts):
        if _networks(allowed_hosts):
            for ip in _resolve(host, url, resolver):
                _check_address(host, ip, allowed_hosts, named=True)
            return
        raise CallbackRefusedError(
            f"callback_url host {host!r} is not in XMAG_CALLBACK_ALLOWED_HOSTS "
            f"({', '.join(allowed_hosts)}); ask the service's operator to add it.",
            host=host,
        )


def _resolve(host: str, url: str, resolver: Resolver | None) -> list[_Address]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found = (resolver or system_resolver)(host, port)
    except OSError as exc:
        raise CallbackRefusedError(
            f"callback_url host {host!r} does not resolve ({exc}).", host=host
        ) from exc
    addresses = [_unwrap(ipaddress.ip_address(a.split("%", 1)[0])) for a in found]
    if not addresses:
        raise CallbackRefusedError(f"callback_url host {host!r} does not resolve.", host=host)
    return addresses


@dataclass(frozen=True)
class PinnedCallback:
    """A callback URL with its host replaced by the checked address to connect to.

    Attributes:
        url: the URL to request (host = ``address``, bracketed for IPv6).
        host_header: the ``Host`` header to send (the original host and port).
        sni_hostname: the TLS server name to send and verify (https only), else None.
        address: the checked address.
    """

    url: str
    host_header: str
    sni_hostname: str | None
    address: str


def pin_callback(
    url: str, allowed_hosts: Sequence[str], *, resolver: Resolver | None = None
) -> PinnedCallback:
    """Resolve the callback's host once, check every address, and pin the first.

    Raises:
        CallbackRefusedError: the URL, or any address its host resolves to, is refused, or the
            host does not resolve.
    """
    parts = urlsplit(url)
    host = _host_of(url)
    literal = _ip(host)
    if literal is not None:
        check_callback_url(url, allowed_hosts)
        addresses: list[_Address] = [literal]
    else:
        addresses = _resolve(host, url, resolver)  # once: the address checked is the one used
        check_callback_url(url, allowed_hosts, resolver=lambda _h, _p: [str(a) for a in addresses])
        for ip in addresses:  # all of them: a client's resolver may pick any
            _check_address(host, ip, allowed_hosts, named=True)
    ip = addresses[0]
    ip_text = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = f"{ip_text}:{parts.port}" if parts.port else ip_text
    host_header = parts.netloc.rsplit("@", 1)[-1]  # never forward userinfo
    return PinnedCallback(
        url=urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
        host_header=host_header,
        sni_hostname=host if parts.scheme == "https" and literal is None else None,
        address=str(ip),
    )
