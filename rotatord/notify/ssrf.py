"""Where webhooks may go: the allowlist, checked on every resolved address (SSRF defence).

``notify.allow`` lists host names (exact, case-insensitive) and networks (CIDR, or a single
address).  An address a consumer's host resolves to is admitted by these rules, in order:

1. Link-local (169.254.0.0/16, fe80::/10) and cloud metadata addresses, multicast, broadcast and
   reserved space are refused always, also when listed, also hidden inside an IPv6 form
   (IPv4-mapped, 6to4, Teredo, NAT64).
2. An address inside a listed network is admitted.
3. An address of a host listed by name is admitted, except the unspecified address (0.0.0.0,
   ``::``), which only a listed network admits.  So a listed name may resolve to a loopback,
   RFC 1918, CGNAT, ULA or IPv4-mapped address: the operator vouched for that name.
4. Everything else is refused: a public address needs its host name or a network listed; a
   loopback / private / CGNAT / ULA / unspecified / IPv4-mapped address needs a listed network or
   a listed name (rule 3).

The check runs after DNS resolution and the connection is made to the checked address only
(:class:`rotatord.notify.delivery.CheckingResolver`), so a name re-bound between check and
connect cannot redirect a request.  :func:`config_problems` runs the part of these rules that
needs no DNS when the configuration is loaded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ..config import ConsumerSettings

__all__ = ["ResolvedAddress", "TargetPolicy", "TargetRefused", "config_problems", "normalise_host"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_net = ipaddress.ip_network
# Cloud instance metadata services.  Most sit in 169.254.0.0/16 (AWS, GCP, Azure, OCI,
# DigitalOcean, ECS task metadata at 169.254.170.2); the others are listed by address.
_METADATA = (
    _net("169.254.169.254/32"),
    _net("fd00:ec2::254/128"),  # AWS IMDS over IPv6
    _net("fd20:ce::254/128"),  # GCP metadata over IPv6
    _net("100.100.100.200/32"),  # Alibaba Cloud
)
_NEVER = (
    ("link-local", _net("169.254.0.0/16")),
    ("link-local", _net("fe80::/10")),
    ("multicast", _net("224.0.0.0/4")),
    ("multicast", _net("ff00::/8")),
    ("reserved", _net("240.0.0.0/4")),  # includes the broadcast address 255.255.255.255
)
_NAT64 = _net("64:ff9b::/96")
_RFC1918 = (_net("10.0.0.0/8"), _net("172.16.0.0/12"), _net("192.168.0.0/16"))
_CGNAT = _net("100.64.0.0/10")
_ULA = _net("fc00::/7")
# Well-known names of metadata services, refused when configured (they resolve to rule-1 space).
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_BAD_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
_CACHE_LIMIT = 100_000


class TargetRefused(OSError):
    """No address of a webhook target passed :class:`TargetPolicy`.  Internal to rotatord.notify:
    the delivery layer turns it into a recorded, retried failure; it never reaches an operator
    as an exception.  An ``OSError`` so that aiohttp's connector treats it as a failed lookup."""


@dataclass(frozen=True)
class ResolvedAddress:
    """One checked address to connect to (the host name stays the TLS server name)."""

    family: int
    address: str
    port: int


def normalise_host(host: str) -> str:
    """Lower-case, without a trailing dot, IDNA-encoded: the form allowlist names compare in."""
    name = host.strip().rstrip(".").lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return name


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(normalise_host(host))
    except ValueError:
        return None


def _embedded_v4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries to the same host (mapped, 6to4, Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _never(address: IPAddress) -> str | None:
    """Why rule 1 refuses ``address``, or None."""
    if any(address in net for net in _METADATA):
        return "a cloud metadata address"
    for label, net in _NEVER:
        if address.version == net.version and address in net:
            return f"a {label} address"
    return None


def _category(address: IPAddress) -> str | None:
    """The kind of non-public address (for messages), or None for a public one."""
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "IPv4-mapped"
        if address in _ULA:
            return "unique local (ULA)"
    elif address in _CGNAT:
        return "shared (CGNAT)"
    elif any(address in net for net in _RFC1918):
        return "private (RFC 1918)"
    if not address.is_global:
        return "special-purpose"
    return None


def _parse_url(url: str) -> tuple[str | None, str]:
    """(what is wrong with ``url``, or None; its normalised host)."""
    if not isinstance(url, str) or not url:
        return "must be an http:// or https:// URL", ""
    if _BAD_CHARS.search(url):
        return "must not contain whitespace or control characters", ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL (check the host and port)", ""
    if parts.scheme.lower() not in ("http", "https"):
        return "must use http:// or https://", ""
    if "@" in parts.netloc:
        return "must not contain credentials (user:password@); the signature authenticates rotatord", ""
    if not parts.hostname:
        return "has no host", ""
    if port == 0:
        return "has port 0", ""
    host = normalise_host(parts.hostname)
    if _literal(host) is None and not _valid_name(host):
        return "has an invalid host name", host
    return None, host


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


class TargetPolicy:
    """The compiled ``notify.allow`` list.  Immutable; safe to share between tasks and threads."""

    def __init__(self, allow: Sequence[str]) -> None:
        if isinstance(allow, str):
            raise TypeError("allow is a sequence of host names and networks, not one string")
        names: set[str] = set()
        networks: list[IPNetwork] = []
        self.problems: list[str] = []
        for idx, entry in enumerate(allow):
            text = entry.strip()
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            name = normalise_host(text)
            if "/" in text or not _valid_name(name) or _literal(name) is not None:
                self.problems.append(f"notify.allow[{idx}]: {entry!r} is neither a host name nor a network (CIDR)")
            elif name in _METADATA_NAMES:
                self.problems.append(f"notify.allow[{idx}]: {entry!r} is a cloud metadata service, never allowed")
            else:
                names.add(name)
        self.names = frozenset(names)
        self.networks = tuple(networks)
        self._targets: dict[str, str | None] = {}
        self._hosts: dict[str, str | None] = {}

    def __repr__(self) -> str:
        return f"TargetPolicy(names={sorted(self.names)!r}, networks={[str(n) for n in self.networks]!r})"

    def name_allowed(self, host: str) -> bool:
        return normalise_host(host) in self.names

    def _in_networks(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)

    def address_problem(self, address: IPAddress | str, host: str) -> str | None:
        """Why ``address`` (one of ``host``'s) is refused, or None when it is allowed."""
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        embedded = _embedded_v4(addr)
        for candidate in (addr, embedded):
            if candidate is not None and (why := _never(candidate)) is not None:
                return f"{addr} is {why}, always refused"
        if self._in_networks(addr) or (embedded is not None and self._in_networks(embedded)):
            return None
        category = _category(addr)
        if self.name_allowed(host) and category != "unspecified":
            return None
        name = normalise_host(host)
        if category is None:
            return f"{addr} (of {name}) is not in notify.allow: list the host name or a network"
        if _literal(name) is not None:
            return f"{addr} is a {category} address, allowed only by a network in notify.allow"
        return f"{addr} is a {category} address (of {name}), allowed only by listing the name or a network"

    def check_url(self, url: str) -> str | None:
        """What is wrong with ``url`` as a webhook target, or None.  No DNS, no allowlist."""
        return _parse_url(url)[0]

    def target_problem(self, url: str) -> str | None:
        """:meth:`check_url` plus every rule that needs no DNS (a literal address, a name that
        no entry could admit).  What :func:`config_problems` reports for each consumer.

        Every delivery asks, so answers are kept per URL and per host (the policy is immutable).
        """
        try:
            return self._targets[url]
        except KeyError:
            pass
        problem, host = _parse_url(url)
        if problem is None:
            try:
                problem = self._hosts[host]
            except KeyError:
                problem = self._hosts[host] = self._host_problem(host)
        if len(self._targets) >= _CACHE_LIMIT:
            self._targets.clear()
            self._hosts.clear()
        self._targets[url] = problem
        return problem

    def _host_problem(self, host: str) -> str | None:
        literal = _literal(host)
        if literal is not None:
            return self.address_problem(literal, host)
        if host in _METADATA_NAMES:
            return f"{host} is a cloud metadata service, always refused"
        if host not in self.names and not self.networks:
            return f"host {host!r} is not in notify.allow: list it by name (or a network its addresses are in)"
        return None

    def check_addresses(self, host: str, addresses: Sequence[ResolvedAddress]) -> list[ResolvedAddress]:
        """The allowed subset of ``addresses``; TargetRefused (naming every refusal) if none is."""
        allowed: list[ResolvedAddress] = []
        reasons: list[str] = []
        for item in addresses:
            problem = self.address_problem(item.address.split("%", 1)[0], host)
            if problem is None:
                allowed.append(item)
            elif problem not in reasons:
                reasons.append(problem)
        if not allowed:
            raise TargetRefused("refused by notify.allow: " + "; ".join(reasons or ["no address"]))
        return allowed

    async def resolve(self, host: str, port: int, family: int = socket.AF_UNSPEC) -> list[ResolvedAddress]:
        """Resolve ``host`` (getaddrinfo in the loop's executor) and keep the allowed addresses.

        Raises TargetRefused when none is allowed, ``socket.gaierror`` when the name does not
        resolve.  A literal address is checked without a lookup.
        """
        literal = _literal(host)
        if literal is not None:
            fam = socket.AF_INET if literal.version == 4 else socket.AF_INET6
            return self.check_addresses(host, [ResolvedAddress(fam, str(literal), port)])
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        found: list[ResolvedAddress] = []
        for fam, _type, _proto, _canon, sockaddr in infos:
            item = ResolvedAddress(int(fam), str(sockaddr[0]), int(sockaddr[1]))
            if item not in found:
                found.append(item)
        return self.check_addresses(host, found)


def config_problems(consumers: Mapping[str, ConsumerSettings], allow: Sequence[str]) -> list[str]:
    """Problems of ``notify.allow`` and of every consumer URL, each naming its field, for the
    configuration's cross-check.  Empty when every target could be admitted (DNS decides the rest
    at connect time)."""
    policy = TargetPolicy(allow)
    problems = list(policy.problems)
    for name, consumer in consumers.items():
        problem = policy.target_problem(consumer.url)
        if problem is not None:
            problems.append(f"consumers.{name}.url: {problem}")
    return problems
