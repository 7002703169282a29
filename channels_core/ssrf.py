"""Where the HTTP transport may connect: the SSRF guard's policy.

The check runs on the address actually dialled (the connector asks before
each connect, after DNS), so a hostname resolving to a private address, or
re-resolving to one later, is caught. Blocked by default: every non-public
range, and the IPv6 forms that embed a blocked IPv4 address. The allow-list
(``CHANNELS_EGRESS_ALLOW_CIDRS``) is the only way through; the tests and the
embedded default set ``127.0.0.0/8`` explicitly.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from channels_core.settings import get_settings

__all__ = ["EgressBlocked", "check_address", "blocked_reason", "BLOCKED_NETWORKS"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressBlocked(OSError):
    """Raised at connect time for a forbidden address; never worth a retry."""


BLOCKED_NETWORKS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this' network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fc00::/7", "unique local"),
    ("ff00::/8", "multicast"),
    ("2001:db8::/32", "documentation"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments"),
)

_NETWORKS = tuple((ipaddress.ip_network(cidr), why) for cidr, why in BLOCKED_NETWORKS)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_6TO4 = ipaddress.ip_network("2002::/16")


@lru_cache(maxsize=8)
def _allowed(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(
        ipaddress.ip_network(p.strip(), strict=False) for p in spec.split(",") if p.strip()
    )


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    # IPv4-compatible (deprecated) ::a.b.c.d
    if int(addr) >> 32 == 0 and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def blocked_reason(address: str | IPAddress) -> str | None:
    """Why ``address`` may not be dialled, or ``None`` when it may."""
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        addr = ipaddress.IPv6Address(str(addr).split("%")[0])
    for network in _allowed(get_settings().egress_allow_cidrs):
        if addr.version == network.version and addr in network:
            return None
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_v4(addr)
        if inner is not None:
            reason = blocked_reason(inner)
            return f"{reason} (embedded in {addr})" if reason else None
        if addr in _NAT64_LOCAL:
            return f"{addr} is in the local-use NAT64 range"
    for network, why in _NETWORKS:
        if addr.version == network.version and addr in network:
            return f"{addr} is {why} ({network})"
    return None


def check_address(address: str) -> None:
    reason = blocked_reason(address)
    if reason is not None:
        raise EgressBlocked(f"refused to connect: {reason}")
