"""The webhook target policy: URL shape, allowlist rules per address, real name resolution."""

from __future__ import annotations

import asyncio
import socket

import pytest

from rotatord.config.model import ConsumerSettings
from rotatord.notify.delivery import CheckingResolver
from rotatord.notify.ssrf import TargetPolicy, TargetRefused, config_problems

# 169.254.169.254 written as one 32-bit number: a *name* to aiohttp and to the allowlist, which
# getaddrinfo (inet_aton) resolves to the metadata address without any DNS or /etc/hosts entry.
METADATA_AS_NUMBER = str(169 << 24 | 254 << 16 | 169 << 8 | 254)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://bot.example.com/hooks", None),
        ("http://127.0.0.1:8080/x?y=1", None),
        ("http://[::1]:8080/", None),
        ("ftp://bot.example.com/", "must use http:// or https://"),
        ("file:///etc/passwd", "must use http:// or https://"),
        ("https://user:pw@bot.example.com/", "must not contain credentials"),
        ("https://token@bot.example.com/", "must not contain credentials"),
        ("https:///path-only", "has no host"),
        ("https://bot.example.com:99999/", "is not a valid URL"),
        ("https://bot example.com/", "must not contain whitespace"),
        ("https://bot_.example.com/", "has an invalid host name"),
        ("", "must be an http:// or https:// URL"),
    ],
)
def test_check_url(url: str, problem: str | None) -> None:
    found = TargetPolicy(()).check_url(url)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


@pytest.mark.parametrize(
    ("address", "host", "allow", "admitted"),
    [
        # Rule 1: never, whatever is listed.
        ("169.254.169.254", "169.254.169.254", ["169.254.169.254", "0.0.0.0/0"], False),
        ("169.254.169.254", "metadata.example", ["metadata.example"], False),
        ("169.254.10.1", "x.example", ["x.example", "169.254.0.0/16"], False),
        ("fe80::1", "x.example", ["x.example", "::/0"], False),
        ("fd00:ec2::254", "x.example", ["x.example", "fd00::/8"], False),
        ("100.100.100.200", "x.example", ["x.example", "100.64.0.0/10"], False),
        ("::ffff:169.254.169.254", "x.example", ["x.example", "::/0"], False),
        ("64:ff9b::a9fe:a9fe", "x.example", ["x.example", "::/0"], False),  # NAT64 of 169.254.169.254
        ("2002:a9fe:a9fe::1", "x.example", ["x.example", "::/0"], False),  # 6to4 of 169.254.169.254
        ("224.0.0.1", "x.example", ["x.example", "224.0.0.0/4"], False),
        ("255.255.255.255", "x.example", ["x.example", "0.0.0.0/0"], False),
        # Non-public space: a listed network, or a listed name, admits it.
        ("127.0.0.1", "127.0.0.1", [], False),
        ("127.0.0.1", "127.0.0.1", ["127.0.0.0/8"], True),
        ("127.0.0.1", "localhost", ["10.0.0.0/8"], False),
        ("127.0.0.1", "localhost", ["localhost"], True),
        ("10.1.2.3", "bot.internal", ["bot.internal"], True),
        ("10.1.2.3", "other.internal", ["bot.internal"], False),
        ("10.1.2.3", "other.internal", ["10.1.0.0/16"], True),
        ("100.64.1.1", "x.example", ["192.168.0.0/16"], False),
        ("fd12::1", "x.example", ["fc00::/7"], True),
        ("::ffff:10.0.0.1", "x.example", ["10.0.0.0/8"], True),  # the mapped form is checked too
        ("::ffff:10.0.0.1", "x.example", ["192.168.0.0/16"], False),
        # The unspecified address only by a network, never by a name.
        ("0.0.0.0", "x.example", ["x.example"], False),
        ("0.0.0.0", "x.example", ["0.0.0.0/32"], True),
        # Public addresses: the name or a network must be listed.
        ("93.184.216.34", "bot.example.com", [], False),
        ("93.184.216.34", "bot.example.com", ["BOT.Example.COM."], True),
        ("93.184.216.34", "evil.example.com", ["bot.example.com"], False),
        ("93.184.216.34", "evil.example.com", ["93.184.216.0/24"], True),
    ],
)
def test_address_rules(address: str, host: str, allow: list[str], admitted: bool) -> None:
    problem = TargetPolicy(allow).address_problem(address, host)
    assert (problem is None) is admitted, problem


def test_bad_allow_entries_are_reported_by_index() -> None:
    policy = TargetPolicy(["10.0.0.0/8", "bot.example.com", "10.0.0.0/33", "*.example.com", "metadata.google.internal"])
    assert policy.problems == [
        "notify.allow[2]: '10.0.0.0/33' is neither a host name nor a network (CIDR)",
        "notify.allow[3]: '*.example.com' is neither a host name nor a network (CIDR)",
        "notify.allow[4]: 'metadata.google.internal' is a cloud metadata service, never allowed",
    ]
    assert policy.names == frozenset({"bot.example.com"})
    with pytest.raises(TypeError):
        TargetPolicy("10.0.0.0/8")


def consumer(url: str) -> ConsumerSettings:
    return ConsumerSettings(url=url, signing_secret="bot-webhook")


def test_config_problems_name_the_field() -> None:
    consumers = {
        "ok": consumer("https://bot.example.com/hook"),
        "unlisted": consumer("https://other.example.com/hook"),
        "loop": consumer("http://127.0.0.1:9000/hook"),
        "meta": consumer("http://169.254.169.254/latest"),
        "gce": consumer("http://metadata.google.internal/computeMetadata/v1/"),
    }
    assert config_problems(consumers, ["bot.example.com"]) == [
        "consumers.unlisted.url: host 'other.example.com' is not in notify.allow: "
        "list it by name (or a network its addresses are in)",
        "consumers.loop.url: 127.0.0.1 is a loopback address, allowed only by a network in notify.allow",
        "consumers.meta.url: 169.254.169.254 is a cloud metadata address, always refused",
        "consumers.gce.url: metadata.google.internal is a cloud metadata service, always refused",
    ]
    # With a network listed, an unlisted name may still be admitted by its addresses (DNS decides).
    problems = config_problems(consumers, ["bot.example.com", "10.0.0.0/8", "127.0.0.1"])
    assert [p.split(":")[0] for p in problems] == ["consumers.meta.url", "consumers.gce.url"]


def test_resolve_keeps_only_allowed_addresses_of_a_real_lookup() -> None:
    async def lookups() -> None:
        assert [a.address for a in await TargetPolicy(["localhost"]).resolve("localhost", 80)] == ["127.0.0.1"]
        assert [a.address for a in await TargetPolicy(["127.0.0.1/32"]).resolve("localhost", 80)] == ["127.0.0.1"]
        with pytest.raises(TargetRefused, match=r"127\.0\.0\.1 is a loopback address"):
            await TargetPolicy(["10.0.0.0/8"]).resolve("localhost", 80)
        # A listed name that resolves to the metadata address is refused all the same.
        with pytest.raises(TargetRefused, match="cloud metadata address, always refused"):
            await TargetPolicy([METADATA_AS_NUMBER]).resolve(METADATA_AS_NUMBER, 80)
        with pytest.raises(socket.gaierror):
            await TargetPolicy(["no-such-host.invalid"]).resolve("no-such-host.invalid", 80)

    asyncio.run(lookups())


def test_the_aiohttp_resolver_hands_out_checked_addresses_under_the_original_name() -> None:
    async def lookups() -> None:
        resolver = CheckingResolver(TargetPolicy(["localhost"]))
        (result,) = await resolver.resolve("localhost", 8080, socket.AF_UNSPEC)
        assert (result["hostname"], result["host"], result["port"]) == ("localhost", "127.0.0.1", 8080)
        with pytest.raises(TargetRefused):
            await CheckingResolver(TargetPolicy([METADATA_AS_NUMBER])).resolve(METADATA_AS_NUMBER, 80)
        await resolver.close()

    asyncio.run(lookups())
