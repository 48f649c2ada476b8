"""Pure ACL: every bypass trick known from other egress proxies, no sockets involved."""

from __future__ import annotations

import ipaddress

import pytest

from sandbox.egress.acl import HostError, canonical_host, classify, decide, parse_authority, precheck
from sandbox.egress.rules import EgressPolicy

POLICY = EgressPolicy.model_validate(
    {"rules": [{"host": "allowed.test", "ports": [80, 443]}, {"host": "*.wild.test", "ports": [443]}, {"host": "bücher.test", "ports": [443]}]}
)
PUBLIC = ["93.184.216.34"]  # never connected to: decide() is pure


# ------------------------------------------------------------ canonicalisation


@pytest.mark.parametrize(
    "raw",
    [
        "allowed.test",
        "ALLOWED.TEST",  # case
        "Allowed.Test.",  # trailing dot
        "allowed%2etest",  # percent-encoding
        "%61llowed.test",
        "ａｌｌｏｗｅｄ.test",  # fullwidth letters (UTS-46 maps them)
        "allowed。test",  # ideographic full stop as a label separator
        "allowed．test",  # fullwidth full stop
    ],
)
def test_spellings_of_an_allowed_host_canonicalise_to_it(raw: str) -> None:
    assert canonical_host(raw) == "allowed.test"


@pytest.mark.parametrize(
    "raw",
    [
        "allowed.test\x00.evil.test",  # NUL truncation
        "allowed.test%00.evil.test",
        "allowed.test\r\nX-Injected: 1",  # header injection
        "allowed.test evil.test",  # whitespace
        "allowed.test\tx",
        " allowed.test",
        "allowed.test\\evil.test",  # backslash (WHATWG treats it as '/')
        "allowed.test/evil.test",
        "allowed.test?x",
        "allowed.test#x",
        "allowed..test",  # empty label
        "allowed.test..",
        ".allowed.test",
        "-allowed.test",  # leading hyphen
        "%2561llowed.test",  # double percent-encoding
        "%ff.test",  # percent-encoded non-UTF-8
        "a" * 64 + ".test",  # overlong label
        ("a" * 60 + ".") * 5 + "test",  # overlong name
        "[allowed.test]",  # brackets around a name
        "[::1",  # unbalanced bracket
        "[fe80::1%25eth0]",  # IPv6 zone id
        "xn--zz.test",  # invalid punycode
        "1.2.3.256",  # not an IPv4 address but numeric
        "example.123",  # numeric last label must be IPv4
        "",
        "\u202eallowed.test",  # RTL override
        "allowed.test\u200b",  # zero-width space
    ],
)
def test_hostname_tricks_are_rejected_not_repaired(raw: str) -> None:
    with pytest.raises(HostError):
        canonical_host(raw)


@pytest.mark.parametrize(
    "raw,ip",
    [
        ("2130706433", "127.0.0.1"),  # decimal IPv4
        ("0x7f000001", "127.0.0.1"),  # hex
        ("0x7f.1", "127.0.0.1"),  # short hex form
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("127.1", "127.0.0.1"),  # short form
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("[::FFFF:127.0.0.1]", "::ffff:7f00:1"),
        ("::1", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
    ],
)
def test_legacy_and_bracketed_ip_spellings_become_ip_literals(raw: str, ip: str) -> None:
    assert canonical_host(raw) == ip


def test_unicode_name_becomes_its_punycode_a_label() -> None:
    assert canonical_host("BÜCHER.test") == "xn--bcher-kva.test"
    assert canonical_host("b%C3%BCcher.test") == "xn--bcher-kva.test"
    # A homoglyph (Cyrillic 'е') is a different name, so it cannot borrow a rule.
    assert canonical_host("еvil.test") != "evil.test"


@pytest.mark.parametrize(
    "authority,ok,expected",
    [
        ("allowed.test:443", False, ("allowed.test", 443)),
        ("[::1]:443", False, ("::1", 443)),
        ("user:pw@allowed.test", True, ("allowed.test", 80)),
        ("allowed.test@evil.test", True, ("evil.test", 80)),  # the host is after the LAST '@'
        ("allowed.test:80@evil.test:8080", True, ("evil.test", 8080)),
    ],
)
def test_authority_parsing_takes_the_real_host(authority: str, ok: bool, expected: tuple[str, int]) -> None:
    assert parse_authority(authority, 80, allow_userinfo=ok) == expected


@pytest.mark.parametrize(
    "authority",
    [
        "allowed.test@evil.test:443",  # userinfo in CONNECT
        "allowed.test",  # CONNECT needs a port
        "allowed.test:443:22",  # two ports
        "allowed.test:+443",
        "allowed.test: 443",
        "allowed.test:4_43",
        "allowed.test:0",
        "allowed.test:65536",
        "allowed.test:99999999999",
        "::1:443",  # unbracketed IPv6
        "[::1]x:443",
        "allowed.test%3a22:443",  # encoded colon smuggles a port
    ],
)
def test_connect_target_tricks_are_rejected(authority: str) -> None:
    with pytest.raises(HostError):
        parse_authority(authority, None, allow_userinfo=False)


# ------------------------------------------------------------ classification


@pytest.mark.parametrize(
    "addr,category",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "cgnat"),
        ("169.254.1.1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("100.100.100.200", "metadata"),
        ("168.63.129.16", "metadata"),  # Azure WireServer: public address, still refused
        ("fd00:ec2::254", "metadata"),
        ("224.0.0.251", "multicast"),
        ("239.255.255.250", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fe80::1", "link-local"),
        ("fec0::1", "link-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "reserved"),
        ("2001::1", "reserved"),  # Teredo
        ("100::1", "reserved"),
        ("4000::1", "reserved"),  # outside 2000::/3
        # IPv6 forms that embed a forbidden IPv4 are judged by the embedded address
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "metadata"),
        ("::127.0.0.1", "loopback"),  # IPv4-compatible
        ("::ffff:0:10.0.0.1", "private"),  # SIIT
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64
        ("64:ff9b::10.0.0.1", "private"),
        ("64:ff9b:1::1", "reserved"),  # local-use NAT64
        ("2002:7f00:1::", "loopback"),  # 6to4
        ("2002:a9fe:a9fe::1", "metadata"),
    ],
)
def test_non_public_addresses_are_classified(addr: str, category: str) -> None:
    assert classify(ipaddress.ip_address(addr)) == category


@pytest.mark.parametrize("addr", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.216.34", "64:ff9b::808:808"])
def test_public_addresses_pass(addr: str) -> None:
    assert classify(ipaddress.ip_address(addr)) is None


# ------------------------------------------------------------ decisions


def test_no_rules_means_no_network() -> None:
    d = decide(EgressPolicy(), "allowed.test", 443, PUBLIC)
    assert not d.allowed and d.code == "egress-disabled"


def test_allowed_host_and_port() -> None:
    d = decide(POLICY, "allowed.test", 443, PUBLIC)
    assert d.allowed and d.rule == "allowed.test:80,443" and d.addr == PUBLIC[0]


def test_allowed_host_on_disallowed_port() -> None:
    d = decide(POLICY, "allowed.test", 22, PUBLIC)
    assert not d.allowed and d.code == "port-not-allowed" and "22" in d.reason


def test_unlisted_host() -> None:
    d = precheck(POLICY, "evil.test", 443)
    assert not d.allowed and d.code == "no-matching-rule"


@pytest.mark.parametrize("host", ["wild.test", "evilwild.test", "wild.test.evil.test", "sub.wild.test.evil.test"])
def test_wildcard_does_not_match_apex_or_lookalikes(host: str) -> None:
    assert not precheck(POLICY, host, 443).allowed


@pytest.mark.parametrize("host", ["a.wild.test", "a.b.c.wild.test", "A.WILD.TEST."])
def test_wildcard_matches_subdomains(host: str) -> None:
    assert precheck(POLICY, host, 443).allowed


def test_suffix_trick_does_not_match_exact_rule() -> None:
    for host in ["allowed.test.evil.test", "evilallowed.test", "allowed.testevil"]:
        assert not precheck(POLICY, host, 443).allowed


def test_idna_rule_matches_unicode_and_punycode_requests() -> None:
    assert decide(POLICY, "bücher.test", 443, PUBLIC).allowed
    assert decide(POLICY, "xn--bcher-kva.test", 443, PUBLIC).allowed


@pytest.mark.parametrize(
    "answer", [["127.0.0.1"], ["10.0.0.5"], ["169.254.169.254"], ["::1"], ["::ffff:127.0.0.1"], ["fd00:ec2::254"], ["100.100.100.200"], ["0.0.0.0"]]
)
def test_dns_rebinding_to_non_public_address_is_denied(answer: list[str]) -> None:
    d = decide(POLICY, "allowed.test", 443, answer)
    assert not d.allowed and d.code == "non-public-address"


def test_one_bad_answer_among_good_ones_denies() -> None:
    d = decide(POLICY, "allowed.test", 443, ["93.184.216.34", "127.0.0.1"])
    assert not d.allowed and "127.0.0.1" in d.reason


def test_empty_or_garbage_dns_answer_denies() -> None:
    assert decide(POLICY, "allowed.test", 443, []).code == "dns-no-address"
    assert decide(POLICY, "allowed.test", 443, ["not-an-ip"]).code == "dns-bad-answer"


def test_allow_cidrs_admits_a_named_private_range() -> None:
    pol = POLICY.model_copy(update={"allow_cidrs": ["10.0.0.0/8"]})
    pol = EgressPolicy.model_validate(pol.model_dump())
    assert decide(pol, "allowed.test", 443, ["10.1.2.3"]).allowed
    assert not decide(pol, "allowed.test", 443, ["10.1.2.3", "127.0.0.1"]).allowed
    # a mapped spelling of an admitted address is admitted and connected as plain IPv4
    d = decide(pol, "allowed.test", 443, ["::ffff:10.1.2.3"])
    assert d.allowed and d.addr == "10.1.2.3"


def test_broad_allow_cidr_never_opens_metadata() -> None:
    pol = EgressPolicy.model_validate({"rules": [{"host": "allowed.test", "ports": [80]}], "allow_cidrs": ["169.254.0.0/16", "100.64.0.0/10"]})
    assert not decide(pol, "allowed.test", 80, ["169.254.169.254"]).allowed
    assert not decide(pol, "allowed.test", 80, ["100.100.100.200"]).allowed
    assert not decide(pol, "169.254.169.254", 80, []).allowed
    assert decide(pol, "allowed.test", 80, ["169.254.1.1"]).allowed
    exact = EgressPolicy.model_validate({"allow_cidrs": ["169.254.169.254/32"]})
    assert decide(exact, "169.254.169.254", 80, []).allowed


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f.1", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[64:ff9b::7f00:1]", "169.254.169.254", "[fd00:ec2::254]", "10.0.0.1"],
)
def test_ip_literals_without_a_rule_are_denied(host: str) -> None:
    assert not decide(POLICY, host, 80, []).allowed


def test_ip_literal_rule_still_refuses_non_public_address() -> None:
    pol = EgressPolicy.model_validate({"rules": [{"host": "127.0.0.1", "ports": [80]}, {"host": "93.184.216.34", "ports": [80]}]})
    d = decide(pol, "127.0.0.1", 80, [])
    assert not d.allowed and d.code == "non-public-address"
    assert decide(pol, "93.184.216.34", 80, ["127.0.0.1"]).allowed  # literal: resolver answer ignored


def test_ip_literal_in_allow_cidrs_is_allowed_with_mapped_forms() -> None:
    pol = EgressPolicy.model_validate({"allow_cidrs": ["127.0.0.2/32"]})
    for host in ["127.0.0.2", "[::ffff:127.0.0.2]", "0x7f.0.0.2"]:
        d = decide(pol, host, 8080, [])
        assert d.allowed and d.addr == "127.0.0.2" and d.rule == "cidr:127.0.0.2/32", host
    assert not decide(pol, "127.0.0.3", 8080, []).allowed


def test_names_are_not_allowed_by_cidr_alone() -> None:
    # Otherwise the proxy would have to resolve arbitrary names (DNS exfiltration).
    pol = EgressPolicy.model_validate({"allow_cidrs": ["127.0.0.2/32"]})
    assert precheck(pol, "anything.test", 80).code == "no-matching-rule"


def test_denial_header_is_safe_ascii() -> None:
    d = decide(POLICY, "allowed.test\r\nSet-Cookie: x", 80, [])
    assert not d.allowed
    assert "\r" not in d.header() and "\n" not in d.header()
