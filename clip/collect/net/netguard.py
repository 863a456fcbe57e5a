"""SSRF guard: which resolved addresses the fetcher may connect to.

A URL list scraped from the web can name any host, including ones that resolve to the machine itself, the
local network or a cloud provider's metadata service (which hands out credentials). The fetcher resolves a
host once, asks `address_verdict` about every address it got, and connects only to an address that passed;
the check is a pure function of the address, so it is tested without any network.

    address_verdict("10.1.2.3")                      # "private"
    address_verdict("127.0.0.1", allow_loopback=True)  # None (allowed)
"""

from __future__ import annotations

import ipaddress

# Cloud metadata endpoints. Most sit inside link-local or private ranges anyway; they are named so that the
# verdict says "metadata" and so that allow_loopback never lets one through.
METADATA_ADDRESSES: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync (same host family)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS ECS IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "168.63.129.16",  # Azure wire server
    )
)

# NAT64 well-known prefix: an IPv6 address that carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Shared address space (carrier-grade NAT); Python's is_private leaves it out but it is not the public web.
_SHARED = ipaddress.ip_network("100.64.0.0/10")


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped ::ffff:a.b.c.d, NAT64, 6to4), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    return None


def address_verdict(
    address: str, *, allow_private: bool = False, allow_loopback: bool = False
) -> str | None:
    """None when `address` may be connected to, else why not.

    Reasons: "invalid", "metadata", "loopback", "private", "link_local", "multicast", "reserved",
    "unspecified". `allow_private` lets every non-public address through (loopback, link-local and metadata
    included, as the config documents); `allow_loopback` lets only loopback (127.0.0.0/8, ::1) through.
    """
    try:
        addr = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")
    except ValueError:
        return "invalid"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr in METADATA_ADDRESSES:
            return None if allow_private else "metadata"
        inner = _embedded_ipv4(addr)
        if inner is not None:
            # ::ffff:127.0.0.1 reaches the same socket as 127.0.0.1: judge the IPv4 address it carries.
            return address_verdict(str(inner), allow_private=allow_private, allow_loopback=allow_loopback)
    if addr in METADATA_ADDRESSES:
        return None if allow_private else "metadata"
    if addr.is_loopback:
        return None if (allow_private or allow_loopback) else "loopback"
    if allow_private:
        return None
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_link_local:
        return "link_local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_reserved:
        return "reserved"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _SHARED:
        return "private"
    if addr.is_private or not addr.is_global:
        return "private"
    return None
