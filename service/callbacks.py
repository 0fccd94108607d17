"""Which hosts a job's ``callback_url`` may target (webhooks leave the hospital network's API).

A callback is a request the service makes on a client's behalf, so it is a server-side request
forgery risk: a URL naming a cloud metadata endpoint or a link-local address could read credentials.
Those are always refused. ``XMAG_CALLBACK_ALLOWED_HOSTS`` narrows callbacks further to named hosts
(``lis.example.org``), domain suffixes (``*.example.org``) or networks (``10.20.0.0/16``); the LIS
usually sits on a private network, so private addresses are not refused by default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from service.errors import CallbackRefusedError

__all__ = ["check_callback_url"]

# Cloud metadata services answer on link-local addresses and these names.
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: str) -> _Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _allowed(host: str, ip: _Address | None, rule: str) -> bool:
    if "/" in rule:
        try:
            return ip is not None and ip in ipaddress.ip_network(rule, strict=False)
        except ValueError:
            return False
    if rule.startswith("*."):
        return host.endswith(rule[1:]) and host != rule[2:]
    return host == rule.lower()


def check_callback_url(url: str, allowed_hosts: Sequence[str]) -> None:
    """Refuse a callback URL whose host is link-local, a metadata service, or not allowed.

    Raises:
        CallbackRefusedError: with the host and the setting that would allow it.
    """
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    ip = _ip(host)
    if host in _METADATA_HOSTS or (ip is not None and ip.is_link_local):
        raise CallbackRefusedError(
            f"callback_url host {host!r} is link-local or a cloud metadata service; webhooks "
            "never go there. Use the address of your LIS or webhook receiver.",
            host=host,
        )
    if allowed_hosts and not any(_allowed(host, ip, rule) for rule in allowed_hosts):
        raise CallbackRefusedError(
            f"callback_url host {host!r} is not in XMAG_CALLBACK_ALLOWED_HOSTS "
            f"({', '.join(allowed_hosts)}); ask the service's operator to add it.",
            host=host,
        )
