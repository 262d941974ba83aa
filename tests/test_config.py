"""Tests for ``proxy.config``: file:line errors, defaults, quick routes, discovery, round trip."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config as config_module
from proxy.config import (
    DEFAULT_CONFIG_PATH,
    MAX_CONFIG_BYTES,
    Config,
    ConfigError,
    ConfigSource,
    Overrides,
    PoolConfig,
    RouteSettings,
    format_duration,
    parse,
    parse_duration,
)

FILE = "sidelink.yaml"

# The example of SPEC.md "Config file", comments dropped.
SPEC_EXAMPLE = """\
admin:
  listen: "0.0.0.0:9901"
resolver:
  nameservers: []
  search: null
  ndots: null
  timeout: 2s
  min_ttl: 1s
  max_ttl: 60s
  stale_ttl: 5m
logging:
  level: info
  format: text
  access_log: false
shutdown:
  drain_delay: 5s
  drain_timeout: 30s
defaults:
  connect_timeout: 2s
  request_timeout: 30s
  idle_timeout: 5m
  head_timeout: 10s
  retries: 2
  balance: p2c
  host: auto
  pool:
    max_idle: 64
    idle_timeout: 60s
    max_lifetime: 5m
routes:
  - name: app1
    listen: "127.0.0.1:8081"
    service: app1-service.namespace-a
    port: 80
    protocol: http
    expose: false
"""


def yml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def problems(text: str | None, routes: tuple[str, ...] = (), **kw: object) -> list[str]:
    """Every problem parse() reports; fails the test if it accepts the input."""
    with pytest.raises(ConfigError) as info:
        parse(text, FILE, routes, **kw)  # type: ignore[arg-type]
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(text: str | None, routes: tuple[str, ...] = (), **kw: object) -> str:
    found = problems(text, routes, **kw)
    assert len(found) == 1, found
    return found[0]


def route_yaml(**keys: object) -> str:
    """A file with one route holding ``keys`` (listen and service filled in unless given)."""
    keys = {"listen": 8081, "service": "svc", **keys}
    lines = ["routes:"]
    for i, (k, v) in enumerate(keys.items()):
        lines.append(f"  {'- ' if i == 0 else '  '}{k}: {v}")
    return "\n".join(lines) + "\n"


# --- valid files -----------------------------------------------------------------------


def test_spec_example_parses_to_the_documented_values() -> None:
    config = parse(SPEC_EXAMPLE, FILE)
    assert config.admin.listen == "0.0.0.0:9901"
    assert config.resolver.nameservers == ()
    assert config.resolver.search is None
    assert config.resolver.ndots is None
    assert (config.resolver.timeout, config.resolver.min_ttl) == (2.0, 1.0)
    assert (config.resolver.max_ttl, config.resolver.stale_ttl) == (60.0, 300.0)
    assert config.shutdown.drain_delay == 5.0
    assert config.shutdown.drain_timeout == 30.0
    assert config.defaults == RouteSettings()  # the example spells out every default
    (route,) = config.routes
    assert (route.name, route.listen, route.service) == (
        "app1",
        "127.0.0.1:8081",
        "app1-service.namespace-a",
    )
    assert (route.port, route.protocol, route.expose) == (80, "http", False)
    assert config.source == FILE


@pytest.mark.parametrize("text", [None, "", "# only a comment\n", "---\n"])
def test_empty_input_is_all_defaults(text: str | None) -> None:
    assert dataclasses.replace(parse(text, FILE), source=None) == Config()


def test_config_is_frozen() -> None:
    config = parse(SPEC_EXAMPLE, FILE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].listen_port = 1  # type: ignore[misc]


def test_an_absolute_path_is_shown_by_its_file_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse("bogus: 1\n", "/etc/sidelink/sidelink.yaml")
    assert info.value.problems[0].startswith("sidelink.yaml:1: bogus: ")


def test_bare_listen_port_binds_loopback_and_resolver_lists_are_read() -> None:
    config = parse(
        yml(
            """
            admin: {listen: "127.0.0.1:9000"}
            resolver:
              nameservers: ["10.0.0.10", "10.0.0.11:5353", "[fd00::a]:53"]
              search: [ns1.svc.cluster.local, svc.cluster.local]
              ndots: 5
            routes:
              - {listen: 8081, service: svc}
              - {listen: "8082", service: svc.ns, port: "8080"}
              - {listen: "[::1]:8083", service: "grpc.ns", port: grpc-web}
            """
        ),
        FILE,
    )
    assert config.resolver.nameservers == (("10.0.0.10", 53), ("10.0.0.11", 5353), ("fd00::a", 53))
    assert config.resolver.search == ("ns1.svc.cluster.local", "svc.cluster.local")
    assert config.resolver.ndots == 5
    assert [(r.listen_host, r.listen_port, r.port) for r in config.routes] == [
        ("127.0.0.1", 8081, 80),
        ("127.0.0.1", 8082, 8080),
        ("::1", 8083, "grpc-web"),
    ]
    assert config.routes[2].listen == "[::1]:8083"


# --- error shapes: file:line: key.path: message --------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "admin:\n  listen: [1\nlogging: {}\n",
            "sidelink.yaml:3: invalid YAML: while parsing a flow sequence: expected ',' or ']', "
            "but got ':'",
        ),
        (
            "routes:\n  - listen: 1\n   service: s\n",
            "sidelink.yaml:3: invalid YAML: while parsing a block collection: "
            "expected <block end>, but found '<block mapping start>'",
        ),
        (
            "logging:\n\tlevel: info\n",
            "sidelink.yaml:2: invalid YAML: while scanning for the next token: "
            "found character '\\t' that cannot start any token",
        ),
        (
            "admin: {}\n---\nadmin: {}\n",
            "sidelink.yaml:2: invalid YAML: "
            "expected a single document in the stream, but found another document",
        ),
        (
            'admin: {}\nlogging:\n  level: "info\n',
            "sidelink.yaml:4: invalid YAML: "
            "while scanning a quoted scalar: found unexpected end of stream",
        ),
        (
            "admin: {}\nroutes: *nothing\n",
            "sidelink.yaml:2: invalid YAML: found undefined alias 'nothing'",
        ),
    ],
)
def test_broken_yaml_names_the_line(text: str, expected: str) -> None:
    assert problems(text) == [expected]


EXPECTED_TOP = "admin, resolver, logging, shutdown, defaults, routes"
EXPECTED_SETTINGS = (
    "connect_timeout, request_timeout, idle_timeout, head_timeout, retries, balance, outlier, "
    "retry_budget, slow_start, host, pool, upstream_protocol, http2"
)
EXPECTED_POOL = "max_idle, idle_timeout, max_lifetime"
EXPECTED_ROUTE = f"name, listen, service, port, protocol, expose, {EXPECTED_SETTINGS}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "admin: {}\nadmn: {}\n",
            f"sidelink.yaml:2: admn: unknown key (expected one of: {EXPECTED_TOP})",
        ),
        (
            "admin:\n  listen: 9901\n  port: 1\n",
            "sidelink.yaml:3: admin.port: unknown key (expected one of: listen)",
        ),
        (
            "resolver:\n  nameserver: [10.0.0.1]\n",
            "sidelink.yaml:2: resolver.nameserver: unknown key (expected one of: "
            "nameservers, search, ndots, timeout, min_ttl, max_ttl, stale_ttl)",
        ),
        (
            "logging:\n  level: info\n  colour: true\n",
            "sidelink.yaml:3: logging.colour: unknown key (expected one of: level, format, "
            "access_log)",
        ),
        (
            "shutdown:\n  grace: 5s\n",
            "sidelink.yaml:2: shutdown.grace: unknown key (expected one of: drain_delay, "
            "drain_timeout)",
        ),
        (
            "defaults:\n  retry: 1\n",
            f"sidelink.yaml:2: defaults.retry: unknown key (expected one of: {EXPECTED_SETTINGS})",
        ),
        (
            "defaults:\n  pool:\n    max_idle: 1\n    size: 3\n",
            f"sidelink.yaml:4: defaults.pool.size: unknown key (expected one of: {EXPECTED_POOL})",
        ),
        (
            "routes:\n  - listen: 1\n    service: s\n    upstream: x\n",
            f"sidelink.yaml:4: routes[0].upstream: unknown key (expected one of: {EXPECTED_ROUTE})",
        ),
        (
            "routes:\n  - {listen: 1, service: s}\n  - listen: 2\n    service: t\n    pool: "
            "{max_idel: 1}\n",
            f"sidelink.yaml:5: routes[1].pool.max_idel: unknown key (expected one of: "
            f"{EXPECTED_POOL})",
        ),
    ],
)
def test_unknown_keys_at_every_level(text: str, expected: str) -> None:
    assert problems(text) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("admin: {}\nlogging: {}\nadmin: {}\n", "sidelink.yaml:3: admin: duplicate key"),
        (
            "logging:\n  level: info\n  level: debug\n",
            "sidelink.yaml:3: logging.level: duplicate key",
        ),
        (
            "defaults:\n  pool:\n    max_idle: 1\n    max_idle: 2\n",
            "sidelink.yaml:4: defaults.pool.max_idle: duplicate key",
        ),
        (
            "routes:\n  - listen: 1\n    service: a\n    service: b\n",
            "sidelink.yaml:4: routes[0].service: duplicate key",
        ),
    ],
)
def test_duplicate_keys(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_a_duplicate_key_keeps_the_first_value_and_reports_once() -> None:
    found = problems("shutdown:\n  drain_delay: 1s\n  drain_delay: 2s\n  drain_delay: 3s\n")
    assert found == [
        "sidelink.yaml:3: shutdown.drain_delay: duplicate key",
        "sidelink.yaml:4: shutdown.drain_delay: duplicate key",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a string where an int belongs
        (
            'defaults:\n  retries: "3"\n',
            "sidelink.yaml:2: defaults.retries: must be an integer 0..10, got '3'",
        ),
        (
            "defaults:\n  pool:\n    max_idle: lots\n",
            "sidelink.yaml:3: defaults.pool.max_idle: must be an integer 0..100000, got 'lots'",
        ),
        # a bool where an int belongs (YAML 1.1 true/yes are both booleans)
        (
            "defaults:\n  retries: true\n",
            "sidelink.yaml:2: defaults.retries: must be an integer 0..10, got True",
        ),
        (
            "resolver:\n  ndots: yes\n",
            "sidelink.yaml:2: resolver.ndots: must be an integer 0..15, got True",
        ),
        (
            "routes:\n  - listen: 1\n    service: s\n    pool: {max_idle: false}\n",
            "sidelink.yaml:4: routes[0].pool.max_idle: must be an integer 0..100000, got False",
        ),
        ("defaults:\n  retries: 11\n", "sidelink.yaml:2: defaults.retries: must be 0..10, got 11"),
        # a list where a mapping belongs
        ("admin: [listen]\n", "sidelink.yaml:1: admin: must be a mapping"),
        ("defaults:\n  - retries: 1\n", "sidelink.yaml:2: defaults: must be a mapping"),
        (
            "routes:\n  - listen: 1\n    service: s\n    pool: [1]\n",
            "sidelink.yaml:4: routes[0].pool: must be a mapping",
        ),
        ("routes:\n  - [1, 2]\n", "sidelink.yaml:2: routes[0]: must be a mapping"),
        (
            "routes:\n  -\n  - {listen: 1, service: a}\n",
            "sidelink.yaml:2: routes[0]: is empty: a route is a mapping (listen, service)",
        ),
        ("- admin\n", "sidelink.yaml:1: (top level): must be a mapping"),
        # a mapping where a list belongs, and other scalars of the wrong kind
        ("routes: {listen: 1}\n", "sidelink.yaml:1: routes: must be a list"),
        (
            "resolver:\n  nameservers: 10.0.0.1\n",
            'sidelink.yaml:2: resolver.nameservers: must be a list of "IP" or "IP:PORT", got '
            "'10.0.0.1'",
        ),
        (
            "resolver:\n  search: cluster.local\n",
            "sidelink.yaml:2: resolver.search: must be a list of domain names, or null, got "
            "'cluster.local'",
        ),
        (
            "logging:\n  access_log: 1\n",
            "sidelink.yaml:2: logging.access_log: must be true or false, got 1",
        ),
        (
            "logging:\n  level: loud\n",
            "sidelink.yaml:2: logging.level: must be one of debug | info | warning | error, got "
            "'loud'",
        ),
        (
            "defaults:\n  balance: random\n",
            "sidelink.yaml:2: defaults.balance: must be one of p2c | ewma | round_robin, got "
            "'random'",
        ),
        (
            route_yaml(protocol="udp"),
            "sidelink.yaml:4: routes[0].protocol: must be one of http | tcp, got 'udp'",
        ),
        (
            route_yaml(expose='"yes"'),
            "sidelink.yaml:4: routes[0].expose: must be true or false, got 'yes'",
        ),
        (
            route_yaml(name='""'),
            "sidelink.yaml:4: routes[0].name: must be a non-empty string, got ''",
        ),
        *(
            (
                route_yaml(name=name),
                f"sidelink.yaml:4: routes[0].name: must be 1..253 printable characters, no"
                f" space, got {shown}",
            )
            for name, shown in (
                ('"a\\nb"', "'a\\nb'"),
                ('"my route"', "'my route'"),
                ("x" * 254, repr("x" * 254)),
            )
        ),
    ],
)
def test_wrong_types(text: str, expected: str) -> None:
    assert problems(text) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # values YAML itself cannot build: a config error with a line, never a traceback
        (
            "defaults:\n  retries: !!int abc\n",
            "sidelink.yaml:2: defaults.retries: invalid YAML value: "
            "invalid literal for int() with base 10: 'abc'",
        ),
        (
            "logging:\n  level: !!python/object:os.system x\n",
            "sidelink.yaml:2: logging.level: invalid YAML value: could not determine a "
            "constructor for the tag 'tag:yaml.org,2002:python/object:os.system'",
        ),
        (
            "admin: {}\n!custom k: 1\n",
            "sidelink.yaml:2: (top level): invalid YAML value: could not determine a "
            "constructor for the tag '!custom'",
        ),
        (
            "defaults: &d\n  retries: 1\nroutes:\n  - <<: *d\n    listen: 1\n    service: s\n",
            "sidelink.yaml:4: routes[0].<<: YAML merge keys are not supported "
            "(shared route settings go in defaults:)",
        ),
    ],
)
def test_values_yaml_cannot_construct_are_problems(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_a_value_yaml_cannot_construct_does_not_hide_later_problems() -> None:
    found = problems("defaults:\n  retries: !!int abc\n  balance: !!int xyz\n  host: ''\n")
    assert [p.split(": ")[0:2] for p in found] == [
        ["sidelink.yaml:2", "defaults.retries"],
        ["sidelink.yaml:3", "defaults.balance"],
        ["sidelink.yaml:4", "defaults.host"],
    ]


# --- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("0.5h", 1800.0),
        (".5s", 0.5),
        ("2", 2.0),
        ("2.25", 2.25),
        ('"3"', 3.0),
        ('" 40 ms "', 0.04),
    ],
)
def test_durations(written: str, seconds: float) -> None:
    config = parse(
        f"defaults:\n  connect_timeout: {written}\n  pool:\n    max_lifetime: {written}\n", FILE
    )
    assert config.defaults.connect_timeout == pytest.approx(seconds, rel=1e-12)
    assert config.defaults.pool.max_lifetime == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("5x", "must be a duration like 250ms, 1.5s, 5m, 1h, got '5x'"),
        ("-1s", "must be a duration like 250ms, 1.5s, 5m, 1h, got '-1s'"),
        ("-3", "must not be negative, got -3"),
        ("1.5.2s", "must be a duration like 250ms, 1.5s, 5m, 1h, got '1.5.2s'"),
        ("ms", "must be a duration like 250ms, 1.5s, 5m, 1h, got 'ms'"),
        ("5 minutes", "must be a duration like 250ms, 1.5s, 5m, 1h, got '5 minutes'"),
        ("1d", "must be a duration like 250ms, 1.5s, 5m, 1h, got '1d'"),
        ('""', "must be a duration like 250ms, 1.5s, 5m, 1h, got ''"),
        ("true", "must be a duration like 250ms, 1.5s, 5m, 1h, got True"),
        ("[1s]", "must be a duration like 250ms, 1.5s, 5m, 1h, got ['1s']"),
        (".inf", "must be a finite duration (at most 100 years), got inf"),
        (".nan", "must be a finite duration (at most 100 years), got nan"),
        ("1" * 400, "must be a finite duration (at most 100 years), got " + "1" * 400),
        ("0", "must be greater than zero, got 0"),
        ("0ms", "must be greater than zero, got '0ms'"),
    ],
)
def test_bad_durations(written: str, message: str) -> None:
    assert problems(f"resolver:\n  timeout: {written}\n") == [
        f"sidelink.yaml:2: resolver.timeout: {message}"
    ]


def test_zero_is_a_valid_delay_and_stale_ttl() -> None:
    config = parse(
        "resolver:\n  min_ttl: 0\n  stale_ttl: 0s\nshutdown:\n  drain_delay: 0ms\n", FILE
    )
    assert (config.resolver.min_ttl, config.resolver.stale_ttl, config.shutdown.drain_delay) == (
        0,
        0,
        0,
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (0.0011, "1.1ms"),
        (1.5, "1.5s"),
        (90.0, "90s"),
        (300.0, "5m"),
        (3600.0, "1h"),
        (5400.0, "90m"),
        (1234.567, "1234.567s"),
        (1e-5, "0.01ms"),
    ],
)
def test_format_duration_is_short_and_exact(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "": Decimal(1),
}


@settings(max_examples=300, deadline=None)
@given(
    whole=st.integers(0, 100_000),
    fraction=st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,6}", fullmatch=True)),
    unit=st.sampled_from(sorted(_UNITS)),
)
def test_property_durations_parse_to_the_right_seconds_and_format_back(
    whole: int, fraction: str, unit: str
) -> None:
    text = f"{whole}{fraction}{unit}"
    seconds = parse_duration(text)
    expected = float(Decimal(f"{whole}{fraction}") * _UNITS[unit])
    assert math.isclose(seconds, expected, rel_tol=1e-12, abs_tol=1e-15), text
    formatted = format_duration(seconds)
    assert parse_duration(formatted) == seconds, (text, formatted)
    # And it reads back through a config file too, as `sidelink check` output is reused.
    assert parse(f"shutdown:\n  drain_delay: {formatted}\n", FILE).shutdown.drain_delay == seconds


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=3e9, allow_nan=False, allow_infinity=False))
def test_property_any_float_duration_formats_to_text_that_parses_back_exactly(
    seconds: float,
) -> None:
    formatted = format_duration(seconds)
    assert "e" not in formatted.lower().rstrip("ms")  # no exponent notation: the parser has none
    assert parse_duration(formatted) == seconds, formatted


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_property_plain_digits_are_decimals_rendering(number: float) -> None:
    # What format_duration builds on: repr's shortest digits, written out without an
    # exponent, exactly as decimal would (sidelink no longer loads decimal to do it).
    text = format(Decimal(repr(number)), "f")
    assert config_module._plain(number) == (text.rstrip("0").rstrip(".") if "." in text else text)


def test_parse_duration_rejects_booleans_and_negatives_directly() -> None:
    for value in (True, False, -1, -0.5, None, "1 h 5 m"):
        with pytest.raises(ValueError):
            parse_duration(value)


# --- ports, listen addresses, ttl order --------------------------------------------------


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ("80", 80),
        ('"8080"', 8080),
        (65535, 65535),
        ("http", "http"),
        ("grpc-web", "grpc-web"),
        ("h2c", "h2c"),
        ("'80a'", "80a"),
    ],
)
def test_upstream_port_number_or_name(port: object, expected: int | str) -> None:
    assert parse(route_yaml(port=port), FILE).routes[0].port == expected


@pytest.mark.parametrize(
    "port",
    ["0", "70000", "-1", "Bad_Name", "http-", "a-very-long-port-name", "a--b", "1.5", "true"],
)
def test_bad_upstream_ports(port: str) -> None:
    got = yaml.safe_load(f"x: {port}")["x"]
    shown = repr(got) if isinstance(got, str) else str(got)
    assert problems(route_yaml(port=port)) == [
        f"sidelink.yaml:4: routes[0].port: must be 1..65535 or a port name, got {shown}"
    ]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("70000", "must be 0..65535, got 70000"),
        (
            '"127.0.0.1:70000"',
            "must be PORT or IP:PORT (port must be 0..65535, got 70000), got '127.0.0.1:70000'",
        ),
        (
            '"127.0.0.1:http"',
            "must be PORT or IP:PORT (port must be 0..65535, got http), got '127.0.0.1:http'",
        ),
        (
            "my-host:80",
            "must be PORT or IP:PORT ('my-host' does not appear to be an IPv4 or IPv6 address), "
            "got 'my-host:80'",
        ),
        ('"127.0.0.1"', "must be PORT or IP:PORT (a port is required), got '127.0.0.1'"),
        ("[8081]", "must be PORT or IP:PORT, got [8081]"),
    ],
)
def test_bad_listen_addresses(listen: str, expected: str) -> None:
    assert problems(route_yaml(listen=listen)) == [f"sidelink.yaml:2: routes[0].listen: {expected}"]


def test_admin_listen_errors_and_localhost() -> None:
    assert problems('admin:\n  listen: "127.0.0.1:70000"\n') == [
        "sidelink.yaml:2: admin.listen: must be PORT or IP:PORT "
        "(port must be 0..65535, got 70000), got '127.0.0.1:70000'"
    ]
    config = parse('admin:\n  listen: "localhost:9000"\n', FILE)
    assert config.admin.listen == "127.0.0.1:9000"


def test_min_ttl_must_not_exceed_max_ttl() -> None:
    assert problems("resolver:\n  max_ttl: 30s\n  min_ttl: 2m\n") == [
        "sidelink.yaml:3: resolver.min_ttl: must not exceed max_ttl"
    ]
    # Only max_ttl written, under the default min_ttl of 1s: the line is max_ttl's.
    assert problems("resolver:\n  timeout: 1s\n  max_ttl: 500ms\n") == [
        "sidelink.yaml:3: resolver.max_ttl: must not be less than min_ttl (1s)"
    ]
    config = parse("resolver:\n  min_ttl: 30s\n  max_ttl: 30s\n", FILE)
    assert config.resolver.min_ttl == config.resolver.max_ttl == 30.0


def test_every_bad_nameserver_is_named() -> None:
    (problem,) = problems(
        'resolver:\n  nameservers: ["10.0.0.10", "dns.local", "10.0.0.1:99999"]\n'
    )
    assert problem.startswith(
        'sidelink.yaml:2: resolver.nameservers: must be a list of "IP" or "IP:PORT" '
        "('dns.local': 'dns.local' does not appear to be an IPv4 or IPv6 address; "
        "'10.0.0.1:99999': port must be 0..65535, got 99999), got "
    ), problem


def test_base_ejection_must_not_exceed_max_ejection_in_defaults_or_a_route() -> None:
    assert problems("defaults:\n  outlier:\n    base_ejection: 1m\n") == [
        "sidelink.yaml:3: defaults.outlier.base_ejection: must not exceed max_ejection"
    ]
    # A route that lowers only max_ejection, under the base it inherits: its own line.
    text = "defaults:\n  outlier:\n    base_ejection: 5s\n" + route_yaml(
        outlier="{max_ejection: 2s}"
    )
    assert problems(text) == [
        "sidelink.yaml:7: routes[0].outlier.max_ejection: must not be less than base_ejection (5s)"
    ]
    # A route that writes no outlier section is not blamed for its defaults.
    assert problems("defaults:\n  outlier:\n    base_ejection: 1m\n" + route_yaml()) == [
        "sidelink.yaml:3: defaults.outlier.base_ejection: must not exceed max_ejection"
    ]
    (route,) = parse(route_yaml(outlier="{base_ejection: 30s, max_ejection: 30s}"), FILE).routes
    assert route.settings.outlier.base_ejection == route.settings.outlier.max_ejection == 30.0


# --- exposure and listener clashes -------------------------------------------------------


@pytest.mark.parametrize(
    "listen", ['"0.0.0.0:8081"', '"10.1.2.3:8081"', '"[::]:8081"', '"[fd00::1]:8081"']
)
def test_non_loopback_listen_needs_expose(listen: str) -> None:
    address = listen.strip('"')  # each is written in its normal form already
    assert problems(route_yaml(listen=listen)) == [
        f"sidelink.yaml:2: routes[0].listen: {address} is not a loopback address; "
        "set expose: true to listen on it"
    ]
    route = parse(route_yaml(listen=listen, expose="true"), FILE).routes[0]
    assert route.expose is True
    assert route.listen == address


@pytest.mark.parametrize("listen", ['"127.0.0.1:8081"', '"127.0.0.2:8081"', '"[::1]:8081"', "8081"])
def test_loopback_listen_needs_no_expose(listen: str) -> None:
    assert parse(route_yaml(listen=listen), FILE).routes[0].expose is False


def test_two_routes_on_one_address() -> None:
    text = yml(
        """
        routes:
          - name: a
            service: a
            listen: 8081
          - name: b
            service: b
            listen: "127.0.0.1:8081"
        """
    )
    # The line is the second route's listen key, not where the route starts.
    assert problems(text) == [
        "sidelink.yaml:7: routes[1].listen: 127.0.0.1:8081 is already used by routes[0].listen"
    ]


def test_wildcard_and_loopback_on_the_same_port_clash() -> None:
    text = yml(
        """
        admin: {listen: "127.0.0.1:9901"}
        routes:
          - {listen: "0.0.0.0:8081", expose: true, service: a}
          - {listen: "127.0.0.1:8081", service: b}
          - {listen: "127.0.0.1:8082", service: c}
          - {listen: "[::]:8082", expose: true, service: d}
        """
    )
    assert problems(text) == [
        "sidelink.yaml:4: routes[1].listen: 127.0.0.1:8081 is already used by routes[0].listen",
        "sidelink.yaml:6: routes[3].listen: [::]:8082 is already used by routes[2].listen",
    ]


def test_distinct_addresses_on_one_port_and_ephemeral_ports_do_not_clash() -> None:
    text = yml(
        """
        admin: {listen: "127.0.0.1:0"}
        routes:
          - {listen: "127.0.0.1:8081", service: a}
          - {listen: "127.0.0.2:8081", service: b}
          - {listen: "[::1]:8081", service: c}
          - {listen: 0, service: d}
          - {listen: 0, service: e}
        """
    )
    assert [r.listen for r in parse(text, FILE).routes] == [
        "127.0.0.1:8081",
        "127.0.0.2:8081",
        "[::1]:8081",
        "127.0.0.1:0",
        "127.0.0.1:0",
    ]


def test_a_route_on_the_admin_port() -> None:
    # The default admin address is 0.0.0.0:9901, which covers 127.0.0.1:9901 too.
    assert problems(route_yaml(listen=9901)) == [
        "sidelink.yaml:2: routes[0].listen: 127.0.0.1:9901 is already used by admin.listen"
    ]
    text = 'admin: {listen: "127.0.0.1:9000"}\n' + route_yaml(listen='"127.0.0.1:9000"')
    assert problems(text) == [
        "sidelink.yaml:3: routes[0].listen: 127.0.0.1:9000 is already used by admin.listen"
    ]
    # Moving the admin elsewhere frees the port.
    assert parse('admin: {listen: "127.0.0.1:9000"}\n' + route_yaml(listen=9901), FILE).routes


def test_a_quick_route_on_a_file_routes_port() -> None:
    assert problems(route_yaml(listen=8081), ("8081=other",)) == [
        "--route[0].listen: 127.0.0.1:8081 is already used by routes[0].listen"
    ]


# --- required keys, service names, route names ----------------------------------------------


def test_listen_and_service_are_required() -> None:
    text = yml(
        """
        routes:
          - name: a
            service: a
          - name: b
            listen: 8082
          - name: c
        """
    )
    assert problems(text) == [
        "sidelink.yaml:2: routes[0].listen: is required",
        "sidelink.yaml:4: routes[1].service: is required",
        "sidelink.yaml:6: routes[2].listen: is required",
        "sidelink.yaml:6: routes[2].service: is required",
    ]


@pytest.mark.parametrize(
    "service",
    ["bad_name", "-svc", "svc-", "svc..ns", "a" * 64, "'svc ns'", '""', "8080", "[svc]", "Ünïcode"],
)
def test_invalid_service_names(service: str) -> None:
    got = yaml.safe_load(f"x: {service}")["x"]
    shown = repr(got) if isinstance(got, str) else str(got)
    assert problems(route_yaml(service=service)) == [
        "sidelink.yaml:3: routes[0].service: must be a DNS name "
        f"(svc, svc.ns, svc.ns.svc.cluster.local) or an IP, got {shown}"
    ]


@pytest.mark.parametrize(
    "service",
    [
        "svc",
        "app1-service.namespace-a",
        "svc.ns.svc",
        "svc.ns.svc.cluster.local.",
        "10.0.0.7",
        '"fd00::7"',
        "A-Upper",
    ],
)
def test_valid_service_names(service: str) -> None:
    assert (
        parse(route_yaml(service=service), FILE).routes[0].service
        == yaml.safe_load(f"x: {service}")["x"]
    )


def test_duplicate_route_names() -> None:
    text = yml(
        """
        routes:
          - {name: app, listen: 1, service: a}
          - listen: 2
            service: b
            name: app
          - {listen: 3, service: redis}
          - {name: redis, listen: 4, service: c}
        """
    )
    assert problems(text) == [
        "sidelink.yaml:5: routes[1].name: 'app' is already the name of routes[0]",
        "sidelink.yaml:7: routes[3].name: 'redis' is already the name of routes[2]",
    ]


# --- everything at once -----------------------------------------------------------------


def test_all_problems_are_reported_at_once_sorted_by_line() -> None:
    text = yml(
        """
        admin:
          listen: "127.0.0.1:9000"
        resolver:
          timeout: soon
          max_ttl: 10s
          min_ttl: 20s
        logging:
          level: loud
          colour: true
        defaults:
          retries: "3"
          pool:
            max_idle: -1
        routes:
          - name: a
            listen: "0.0.0.0:9000"
            service: bad_name
            port: 70000
          - name: a
            listen: 8081
          - bogus: 1
        """
    )
    assert problems(text, ("nope", "8081=svc/udp")) == [
        "sidelink.yaml:4: resolver.timeout: must be a duration like 250ms, 1.5s, 5m, 1h, got "
        "'soon'",
        "sidelink.yaml:6: resolver.min_ttl: must not exceed max_ttl",
        "sidelink.yaml:8: logging.level: must be one of debug | info | warning | error, got 'loud'",
        "sidelink.yaml:9: logging.colour: unknown key (expected one of: level, format, access_log)",
        "sidelink.yaml:11: defaults.retries: must be an integer 0..10, got '3'",
        "sidelink.yaml:13: defaults.pool.max_idle: must be 0..100000, got -1",
        "sidelink.yaml:16: routes[0].listen: 0.0.0.0:9000 is not a loopback address; "
        "set expose: true to listen on it",
        "sidelink.yaml:16: routes[0].listen: 0.0.0.0:9000 is already used by admin.listen",
        "sidelink.yaml:17: routes[0].service: must be a DNS name "
        "(svc, svc.ns, svc.ns.svc.cluster.local) or an IP, got 'bad_name'",
        "sidelink.yaml:18: routes[0].port: must be 1..65535 or a port name, got 70000",
        "sidelink.yaml:19: routes[1].service: is required",
        f"sidelink.yaml:21: routes[2].bogus: unknown key (expected one of: {EXPECTED_ROUTE})",
        "sidelink.yaml:21: routes[2].listen: is required",
        "sidelink.yaml:21: routes[2].service: is required",
        "--route[0]: expected [HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http], got 'nope'",
        "--route[1]: protocol: must be tcp or http, got 'udp' (in '8081=svc/udp')",
    ]


def test_an_invalid_admin_override_is_a_problem() -> None:
    assert one_problem(None, overrides=Overrides(admin="nope")) == (
        "--admin: must be PORT or IP:PORT ('nope' does not appear to be an IPv4 or IPv6 address), "
        "got 'nope'"
    )
    config = parse(
        'admin: {listen: "0.0.0.0:9901"}\n',
        FILE,
        overrides=Overrides(admin="9000", log_level="debug"),
    )
    assert (config.admin.listen, config.logging.level) == ("127.0.0.1:9000", "debug")


# --- defaults inheritance ---------------------------------------------------------------


def test_routes_inherit_defaults_and_override_single_keys() -> None:
    text = yml(
        """
        defaults:
          connect_timeout: 2s
          retries: 5
          balance: round_robin
          host: preserve
          pool:
            max_idle: 10
            idle_timeout: 30s
        routes:
          - name: plain
            listen: 1
            service: a
          - name: tuned
            listen: 2
            service: b
            retries: 0
            request_timeout: 1m
            host: api.example
            pool:
              max_idle: 3
        """
    )
    config = parse(text, FILE, ("3=c",))
    inherited = RouteSettings(
        connect_timeout=2.0,
        retries=5,
        balance="round_robin",
        host="preserve",
        pool=PoolConfig(max_idle=10, idle_timeout=30.0),
    )
    assert config.defaults == inherited
    plain, tuned, quick = config.routes
    assert plain.settings == inherited
    assert quick.settings == inherited  # quick routes take the file's defaults too
    assert tuned.settings == dataclasses.replace(
        inherited,
        retries=0,
        request_timeout=60.0,
        host="api.example",
        # only max_idle is overridden: idle_timeout still comes from defaults, max_lifetime
        # from the built-in default
        pool=PoolConfig(max_idle=3, idle_timeout=30.0, max_lifetime=300.0),
    )


def test_a_bad_default_falls_back_without_hiding_route_problems() -> None:
    text = "defaults:\n  retries: x\n" + route_yaml(retries=20)
    assert problems(text) == [
        "sidelink.yaml:2: defaults.retries: must be an integer 0..10, got 'x'",
        "sidelink.yaml:6: routes[0].retries: must be 0..10, got 20",
    ]


# --- quick routes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "8081=app1-service.namespace-a:80/http",
            ("127.0.0.1", 8081, "app1-service.namespace-a", 80, "http", False),
        ),
        ("6379=redis:6379/tcp", ("127.0.0.1", 6379, "redis", 6379, "tcp", False)),
        ("127.0.0.1:9000=svc", ("127.0.0.1", 9000, "svc", 80, "tcp", False)),
        ("localhost:9000=svc", ("127.0.0.1", 9000, "svc", 80, "tcp", False)),
        ("[::1]:9000=svc:8080", ("::1", 9000, "svc", 8080, "tcp", False)),
        ("9000=svc", ("127.0.0.1", 9000, "svc", 80, "tcp", False)),
        ("8081=svc:http/http", ("127.0.0.1", 8081, "svc", "http", "http", False)),
        ("9000=10.0.0.7:8080/http", ("127.0.0.1", 9000, "10.0.0.7", 8080, "http", False)),
        ("  9000=svc  ", ("127.0.0.1", 9000, "svc", 80, "tcp", False)),
        # naming a non-loopback host is the opt-in to expose it
        ("0.0.0.0:9000=svc", ("0.0.0.0", 9000, "svc", 80, "tcp", True)),
        ("[::]:9000=svc/http", ("::", 9000, "svc", 80, "http", True)),
    ],
)
def test_quick_routes(spec: str, expected: tuple[object, ...]) -> None:
    config = parse(None, FILE, (spec,))
    (r,) = config.routes
    assert (r.listen_host, r.listen_port, r.service, r.port, r.protocol, r.expose) == expected
    assert r.name == f"{r.service}:{r.listen_port}"
    assert r.settings == RouteSettings()
    assert config.source is None


SYNTAX = "expected [HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http]"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("svc", f"{SYNTAX}, got 'svc'"),
        ("=svc", f"{SYNTAX}, got '=svc'"),
        ("8081=", f"{SYNTAX}, got '8081='"),
        ("8081", f"{SYNTAX}, got '8081'"),
        ("http=svc", f"{SYNTAX}, got 'http=svc'"),
        ("8081=svc/HTTP", f"{SYNTAX}, got '8081=svc/HTTP'"),
        ("8081=svc:80:90", "port: must be 1..65535 or a port name (in '8081=svc:80:90')"),
        ("70000=svc", "listen: must be 0..65535 (in '70000=svc')"),
        ("8081=svc:0", "port: must be 1..65535 or a port name (in '8081=svc:0')"),
        ("8081=svc:99999", "port: must be 1..65535 or a port name (in '8081=svc:99999')"),
        ("8081=svc:Bad_Name", "port: must be 1..65535 or a port name (in '8081=svc:Bad_Name')"),
        ("8081=svc/udp", "protocol: must be tcp or http, got 'udp' (in '8081=svc/udp')"),
        ("8081=bad_svc", "service: not a DNS name or IP address: 'bad_svc' (in '8081=bad_svc')"),
        (
            "my-host:8081=svc",
            "listen: 'my-host' does not appear to be an IPv4 or IPv6 address (in "
            "'my-host:8081=svc')",
        ),
    ],
)
def test_bad_quick_routes_name_their_origin(spec: str, expected: str) -> None:
    assert problems(None, ("9000=ok", spec)) == [f"--route[1]: {expected}"]
    assert problems(None, (spec,), quick_origin="$SIDELINK_ROUTES") == [
        f"$SIDELINK_ROUTES[0]: {expected}"
    ]


def test_a_quick_route_with_several_problems_lists_each() -> None:
    assert problems(None, ("70000=bad_svc:0/udp",)) == [
        "--route[0]: listen: must be 0..65535 (in '70000=bad_svc:0/udp')",
        "--route[0]: service: not a DNS name or IP address: 'bad_svc' (in '70000=bad_svc:0/udp')",
        "--route[0]: port: must be 1..65535 or a port name (in '70000=bad_svc:0/udp')",
        "--route[0]: protocol: must be tcp or http, got 'udp' (in '70000=bad_svc:0/udp')",
    ]


def test_two_quick_routes_on_one_port() -> None:
    assert problems(None, ("8081=a", "127.0.0.1:8081=b")) == [
        "--route[1].listen: 127.0.0.1:8081 is already used by --route[0].listen"
    ]


def test_a_default_name_depends_on_its_route_alone() -> None:
    """Adding a route never renames another: its name is its metric label (issue 12 defect 3)."""
    text = yml(
        """
        routes:
          - {listen: 8082, service: app}
          - {name: explicit, listen: 8083, service: redis}
        """
    )
    alone = parse(None, FILE, ("18081=127.0.0.2:18080/http",))
    assert [r.name for r in alone.routes] == ["127.0.0.2:18081"]
    two = parse(None, FILE, ("18081=127.0.0.2:18080/http", "18082=127.0.0.2:18080/http"))
    assert [r.name for r in two.routes] == ["127.0.0.2:18081", "127.0.0.2:18082"]
    # A file route is named after its service, a quick route after service and listen port.
    config = parse(text, FILE, ("9000=redis", "9001=db/tcp", "9002=app"))
    assert [r.name for r in config.routes] == [
        "app",
        "explicit",
        "redis:9000",
        "db:9001",
        "app:9002",
    ]


def test_unnamed_file_routes_to_one_service_must_be_named() -> None:
    text = yml(
        """
        routes:
          - {listen: 8081, service: redis}
          - {listen: 8082, service: redis}
        """
    )
    assert problems(text) == [
        "sidelink.yaml:3: routes[1].name: 'redis' is already the name of routes[0] "
        "(routes to one service need a name:)"
    ]


# --- discovery --------------------------------------------------------------------------


@pytest.fixture
def no_default_file() -> None:
    if Path(DEFAULT_CONFIG_PATH).exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")


@pytest.mark.usefixtures("no_default_file")
def test_discover_precedence(tmp_path: Path) -> None:
    flag = tmp_path / "flag.yaml"
    env_file = tmp_path / "env.yaml"
    flag.write_text(route_yaml(name="from-flag"))
    env_file.write_text(route_yaml(name="from-env"))
    environ = {"SIDELINK_CONFIG": str(env_file), "SIDELINK_ROUTES": "9000=env-svc"}

    # -c wins over $SIDELINK_CONFIG; --route wins over $SIDELINK_ROUTES.
    source = ConfigSource.discover(str(flag), ["9001=flag-svc"], environ=environ)
    assert (source.path, source.quick_routes, source.quick_origin) == (
        str(flag),
        ("9001=flag-svc",),
        "--route",
    )
    config = source.load()
    assert [r.name for r in config.routes] == ["from-flag", "flag-svc:9001"]
    assert config.source == str(flag)

    # Without -c and --route, the environment answers.
    source = ConfigSource.discover(None, [], environ=environ)
    assert (source.path, source.quick_routes, source.quick_origin) == (
        str(env_file),
        ("9000=env-svc",),
        "$SIDELINK_ROUTES",
    )
    assert [r.name for r in source.load().routes] == ["from-env", "env-svc:9000"]

    # Nothing at all (and an empty $SIDELINK_CONFIG counts as unset): no file, no routes.
    for env in ({}, {"SIDELINK_CONFIG": "", "SIDELINK_ROUTES": " "}):
        source = ConfigSource.discover(None, [], environ=env)
        assert (source.path, source.quick_routes) == (None, ())
        config = source.load(require_routes=False)
        assert (config.routes, config.source) == ((), None)


@pytest.mark.usefixtures("no_default_file")
def test_sidelink_routes_is_a_comma_list_and_errors_name_it() -> None:
    source = ConfigSource.discover(
        None, [], environ={"SIDELINK_ROUTES": "8081=a:80/http, 6379=redis:6379/tcp,,"}
    )
    config = source.load()
    assert [(r.listen_port, r.service, r.port, r.protocol) for r in config.routes] == [
        (8081, "a", 80, "http"),
        (6379, "redis", 6379, "tcp"),
    ]
    bad = ConfigSource.discover(None, [], environ={"SIDELINK_ROUTES": "8081=a,8082=b_c"})
    with pytest.raises(ConfigError) as info:
        bad.load()
    assert info.value.problems == [
        "$SIDELINK_ROUTES[1]: service: not a DNS name or IP address: 'b_c' (in '8082=b_c')"
    ]


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        ConfigSource(str(missing)).load()
    assert info.value.problems == [f"{missing}: cannot read: No such file or directory"]

    with pytest.raises(ConfigError) as info:
        ConfigSource(str(tmp_path)).load()
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"admin:\n  listen: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        ConfigSource(str(binary)).load()
    assert info.value.problems == [f"{binary}:2: cannot read: not UTF-8 text (invalid start byte)"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            'routes:\n  - listen: 8081\n    service: a\n    name: "\x07"\n',
            "4: unacceptable character #x0007",
        ),
        ("routes:\n  - listen: 8081\x00\n", "2: unacceptable character #x0000"),
    ],
)
def test_a_character_yaml_refuses_is_one_line_with_its_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "ctl.yaml")
    [line] = info.value.problems
    assert line.startswith(f"ctl.yaml:{problem}: "), line


def test_load_names_problems_by_file_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("routes:\n  - listen: 1\n")
    with pytest.raises(ConfigError) as info:
        ConfigSource(str(path)).load()
    assert info.value.problems == ["mine.yaml:2: routes[0].service: is required"]


# --- round trip -------------------------------------------------------------------------


ROUND_TRIP = yml(
    """
    admin: {listen: "[::1]:9902"}
    resolver:
      nameservers: ["10.0.0.10", "[fd00::a]:5353"]
      search: [ns1.svc.cluster.local, cluster.local]
      ndots: 2
      timeout: 1234567ms
      min_ttl: 0
      max_ttl: 1.5h
      stale_ttl: 0.001s
    logging: {level: debug, format: json, access_log: true}
    shutdown: {drain_delay: 0, drain_timeout: 90s}
    defaults:
      connect_timeout: 250ms
      retries: 0
      balance: round_robin
      host: preserve
      pool: {max_idle: 0, idle_timeout: 1.25s, max_lifetime: 2h}
    routes:
      - {name: app1, listen: 8081, service: app1-service.namespace-a, protocol: http, retries: 4}
      - listen: "0.0.0.0:8082"
        expose: true
        service: grpc-backend.ns
        port: grpc
        pool: {max_idle: 7}
      - {listen: "[::1]:8083", service: "svc.ns.svc.cluster.local.", host: api.example}
    """
)


@pytest.mark.parametrize(
    ("text", "routes"),
    [
        (ROUND_TRIP, ("9000=svc.ns.svc.cluster.local.:http/http", "[::]:9001=redis:6379")),
        (SPEC_EXAMPLE, ()),
        (None, ("8081=a", "8082=a")),
        ("", ()),
    ],
)
def test_to_dict_round_trips_through_yaml(text: str | None, routes: tuple[str, ...]) -> None:
    first = parse(text, FILE, routes)
    dumped = yaml.safe_dump(first.to_dict(), sort_keys=False)
    second = parse(dumped, "normalised.yaml")
    assert dataclasses.replace(second, source=None) == dataclasses.replace(first, source=None)
    assert second.to_dict() == first.to_dict()


def test_to_dict_is_normalised() -> None:
    out = parse(ROUND_TRIP, FILE).to_dict()
    assert list(out) == ["admin", "resolver", "logging", "shutdown", "defaults", "routes"]
    assert out["admin"] == {"listen": "[::1]:9902"}
    assert out["resolver"]["nameservers"] == ["10.0.0.10:53", "[fd00::a]:5353"]
    assert out["resolver"]["timeout"] == "1234.567s"
    assert out["resolver"]["max_ttl"] == "90m"
    assert out["resolver"]["stale_ttl"] == "1ms"
    assert out["defaults"]["connect_timeout"] == "250ms"
    assert out["defaults"]["pool"] == {"max_idle": 0, "idle_timeout": "1.25s", "max_lifetime": "2h"}
    app1, ip, svc = out["routes"]
    assert app1["listen"] == "127.0.0.1:8081"
    assert (app1["retries"], app1["balance"], app1["connect_timeout"]) == (
        4,
        "round_robin",
        "250ms",
    )
    assert (ip["name"], ip["expose"], ip["port"], ip["pool"]["max_idle"]) == (
        "grpc-backend.ns",
        True,
        "grpc",
        7,
    )
    assert ip["pool"]["idle_timeout"] == "1.25s"
    assert (svc["listen"], svc["name"], svc["port"], svc["protocol"]) == (
        "[::1]:8083",
        "svc.ns.svc.cluster.local.",
        80,
        "tcp",
    )


def test_a_port_name_needs_a_dns_service() -> None:
    with pytest.raises(ConfigError) as e:
        parse("routes:\n  - {listen: 8081, service: 10.0.0.7, port: http}\n", "s.yaml")
    assert e.value.problems == [
        "s.yaml:2: routes[0].port: a port name needs a DNS name as service (SRV)"
    ]
    with pytest.raises(ConfigError) as e:
        parse(None, "s.yaml", ["8081=10.0.0.7:http"])
    assert e.value.problems == [
        "--route[0]: port: a port name needs a DNS name as service (SRV) (in '8081=10.0.0.7:http')"
    ]


# --- each key declared once ----------------------------------------------------------------


def accepted(text: str) -> list[str]:
    """The keys an "unknown key" problem lists for the mapping that ``text`` writes into."""
    (found,) = problems(text)
    return found.split("(expected one of: ")[1].rstrip(")").split(", ")


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        ("nope: 1\n", lambda d: d),
        ("admin: {nope: 1}\n", lambda d: d["admin"]),
        ("resolver: {nope: 1}\n", lambda d: d["resolver"]),
        ("logging: {nope: 1}\n", lambda d: d["logging"]),
        ("shutdown: {nope: 1}\n", lambda d: d["shutdown"]),
        ("defaults: {nope: 1}\n", lambda d: d["defaults"]),
        ("defaults: {pool: {nope: 1}}\n", lambda d: d["defaults"]["pool"]),
        (route_yaml(nope=1), lambda d: d["routes"][0]),
        (route_yaml(pool="{nope: 1}"), lambda d: d["routes"][0]["pool"]),
    ],
)
def test_the_keys_a_file_may_write_are_the_keys_check_prints(
    text: str, printed: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    normalised = parse(route_yaml(), FILE).to_dict()
    assert accepted(text) == list(printed(normalised))


def test_every_key_printed_reads_back_and_a_changed_one_is_seen() -> None:
    """Each printed key is read into the config: changing it in the file changes the config."""
    base = parse(route_yaml(), FILE)
    out = base.to_dict()
    changed = {
        **out["defaults"],
        "connect_timeout": "3s",
        "request_timeout": "4s",
        "idle_timeout": "5s",
        "head_timeout": "6s",
        "retries": 7,
        "balance": "round_robin",
        "host": "preserve",
        "pool": {"max_idle": 8, "idle_timeout": "9s", "max_lifetime": "10s"},
    }
    assert set(changed) == set(out["defaults"])
    text = yaml.safe_dump({**out, "defaults": changed, "routes": []}, sort_keys=False)
    assert parse(text, FILE).defaults == RouteSettings(
        connect_timeout=3.0,
        request_timeout=4.0,
        idle_timeout=5.0,
        head_timeout=6.0,
        retries=7,
        balance="round_robin",
        host="preserve",
        pool=PoolConfig(max_idle=8, idle_timeout=9.0, max_lifetime=10.0),
    )
    # A route written with every key inherits nothing, and prints what it was given.
    route = {**out["routes"][0], **changed, "name": "r", "listen": "127.0.0.1:8090"}
    text = yaml.safe_dump({"routes": [route]}, sort_keys=False)
    assert parse(text, FILE).to_dict()["routes"] == [route]


# --- loading: limits, no routes, ConfigMap manifests --------------------------------------


def test_a_file_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(route_yaml() + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as info:
        ConfigSource(str(path)).load()
    assert info.value.problems == [
        f"{path}: too large: a config file may hold at most 1048576 bytes (1 MiB)"
    ]
    path.write_text(route_yaml())  # a normal file still loads
    assert ConfigSource(str(path)).load().routes


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,
        "a: " + "{b: " * 3000,
        "resolver:\n  nameservers: " + "[" * 3000 + "]" * 3000 + "\n",  # deep in a known key
    ],
    ids=["sequences", "mappings", "a-value"],
)
def test_a_document_nested_too_deeply_is_a_config_error(text: str) -> None:
    """PyYAML's RecursionError must not escape as a traceback (issue 13 defect 5)."""
    assert problems(text) == ["sidelink.yaml: invalid YAML: nested too deeply"]


@pytest.mark.usefixtures("no_default_file")
def test_no_routes_names_what_was_looked_at(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("admin:\n  listen: 127.0.0.1:9901\n")
    with pytest.raises(ConfigError) as info:
        ConfigSource.discover(str(empty), environ={}).load()
    assert info.value.problems == [
        f"{empty}: no routes: the file has no routes: list, and no --route SPEC or "
        "$SIDELINK_ROUTES adds one"
    ]
    with pytest.raises(ConfigError) as info:
        ConfigSource.discover(None, environ={}).load()
    assert info.value.problems == [
        "no routes: no config file (none given with -c FILE or $SIDELINK_CONFIG, and "
        "/etc/sidelink/sidelink.yaml does not exist), and no --route SPEC or $SIDELINK_ROUTES"
    ]
    # resolve needs no routes; a quick route fills an empty file.
    assert ConfigSource.discover(str(empty), environ={}).load(require_routes=False).routes == ()
    assert ConfigSource.discover(str(empty), ["9000=a"], environ={}).load().routes


CONFIG_MAP = yml(
    """
    apiVersion: v1
    kind: Service
    metadata: {name: other}
    ---
    apiVersion: v1
    kind: ConfigMap
    metadata:
      name: sidelink-config
    data:
      sidelink.yaml: |
        routes:
          - listen: 8081
            service: app1
            port: 70000
    """
)


def test_a_config_map_manifest_is_read_from_its_data() -> None:
    good = CONFIG_MAP.replace("70000", "80")
    config = parse(good, FILE)
    assert [(r.name, r.port) for r in config.routes] == [("app1", 80)]
    assert config.embedded == "ConfigMap sidelink-config, data.sidelink.yaml"
    # Problems name the manifest's own lines.
    assert problems(CONFIG_MAP) == [
        "sidelink.yaml:14: routes[0].port: must be 1..65535 or a port name, got 70000"
    ]


def test_a_config_map_without_the_key_says_what_it_holds() -> None:
    text = yml(
        """
        kind: ConfigMap
        metadata: {name: app-config}
        data: {config.yaml: "x", other: "y"}
        """
    )
    assert problems(text) == [
        "sidelink.yaml:1: a ConfigMap manifest without data.sidelink.yaml, the key the sidecar "
        "reads (/etc/sidelink/sidelink.yaml); "
        "ConfigMap app-config has data keys: config.yaml, other"
    ]


def test_the_example_config_documents_every_key() -> None:
    """config/sidelink.yaml is said to hold every key (issue 12 defect 8)."""
    example = Path(__file__).resolve().parent.parent / "config" / "sidelink.yaml"

    def keys(value: object, path: str = "") -> set[str]:
        found: set[str] = set()
        if isinstance(value, dict):
            for key, child in value.items():
                where = f"{path}.{key}" if path else str(key)
                found |= {where} | keys(child, where)
        elif isinstance(value, list):
            for item in value:
                found |= keys(item, f"{path}[]")
        return found

    # What check prints holds every key; a route's settings are documented under defaults.
    printed = keys(parse("routes: [{listen: 1, service: a}]", FILE).to_dict())
    settings = {k.removeprefix("defaults.") for k in printed if k.startswith("defaults.")}
    wanted = {k for k in printed if k.removeprefix("routes[].") not in settings}
    assert "routes[].expose" in wanted
    assert wanted - keys(yaml.safe_load(example.read_text())) == set()
