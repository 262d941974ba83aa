"""End-to-end tests of the ``sidelink`` command, run as a real subprocess: output and exit codes.

Starting the command costs most of a second, so every invocation is declared up front with
``case(...)`` next to the test that reads it, and one module fixture runs them all at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import stale_sources
from support.manifests import DEPLOYMENT
from support.procs import clean_environ, free_port

from proxy import __version__
from proxy.config import DEFAULT_CONFIG_PATH
from proxy.inject import inject

PYTHON_M = (sys.executable, "-m", "proxy")


def console_script() -> tuple[str, ...]:
    """The installed ``sidelink`` entry point, next to this interpreter (the venv's bin/)."""
    path = Path(sys.executable).parent / "sidelink"
    if not path.exists():
        found = shutil.which("sidelink")
        assert found, "the sidelink console script is not installed (pip install -e .)"
        path = Path(found)
    return (str(path),)


@dataclass(frozen=True)
class Case:
    """One run of the command. In args and env, {dir} is the directory holding the files below,
    {taken} a port on 127.0.0.1 held bound for the whole run, {free} a port nobody holds."""

    args: tuple[str, ...]
    script: bool = False  # the console script instead of `python -m proxy`
    env: tuple[tuple[str, str], ...] = ()
    stdin: str | None = None


CASES: dict[str, Case] = {}


def case(
    name: str,
    *args: str,
    script: bool = False,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> str:
    assert name not in CASES, name
    CASES[name] = Case(args, script, tuple((env or {}).items()), stdin)
    return name


class Results:
    def __init__(
        self, directory: Path, taken: int, runs: dict[str, subprocess.CompletedProcess[str]]
    ) -> None:
        self.dir = directory
        self.taken = taken
        self.runs = runs

    def __getitem__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.runs[name]


def _run(case: Case, directory: Path, taken: int) -> subprocess.CompletedProcess[str]:
    def fill(text: str) -> str:
        return text.format(dir=directory, taken=taken, free=free_port())

    env = clean_environ()
    env.update({k: fill(v) for k, v in case.env})
    command = console_script() if case.script else PYTHON_M
    return subprocess.run(
        [*command, *map(fill, case.args)],
        input=case.stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=directory,  # a scratch directory: nothing a command might write lands in the repo
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Results]:
    if Path(DEFAULT_CONFIG_PATH).exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine and would be read")
    directory = tmp_path_factory.mktemp("cli")
    for name, text in FILES.items():
        (directory / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = int(held.getsockname()[1])
        with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
            futures = {name: pool.submit(_run, c, directory, taken) for name, c in CASES.items()}
            runs = {name: future.result() for name, future in futures.items()}
        yield Results(directory, taken, runs)


def lines(text: str) -> list[str]:
    return text.splitlines()


def checked(out: str) -> dict[str, Any]:
    """The YAML `check` printed (its first line is a YAML comment saying what was checked)."""
    assert out.startswith("# "), out
    doc: dict[str, Any] = yaml.safe_load(out)
    return doc


GOOD = textwrap.dedent(
    """\
    admin:
      listen: "127.0.0.1:9905"
    resolver:
      timeout: 500ms
    defaults:
      retries: 1
      pool:
        max_idle: 8
    routes:
      - name: app1
        listen: 8081
        service: app1-service.namespace-a
        protocol: http
        connect_timeout: 1500ms
      - listen: "127.0.0.1:6379"
        service: redis
        port: 6379
    """
)

BAD = textwrap.dedent(
    """\
    admin:
      listen: "127.0.0.1:9901"
      bogus: 1
    resolver:
      timeout: soon
    routes:
      - listen: 9901
        service: bad_name
        port: 70000
      - service: b
    """
)

BAD_PROBLEMS = [
    "bad.yaml:3: admin.bogus: unknown key (expected one of: listen)",
    "bad.yaml:5: resolver.timeout: must be a duration like 250ms, 1.5s, 5m, 1h, got 'soon'",
    "bad.yaml:7: routes[0].listen: 127.0.0.1:9901 is already used by admin.listen",
    "bad.yaml:8: routes[0].service: must be a DNS name (svc, svc.ns, svc.ns.svc.cluster.local) "
    "or an IP, got 'bad_name'",
    "bad.yaml:9: routes[0].port: must be 1..65535 or a port name, got 70000",
    "bad.yaml:10: routes[1].listen: is required",
]

ROUTE = "8081=app1-service.namespace-a:80/http"

EMPTY = "admin:\n  listen: 127.0.0.1:9901\n"
NO_ROUTES_ANYWHERE = (
    "no routes: no config file (none given with -c FILE or $SIDELINK_CONFIG, and "
    "/etc/sidelink/sidelink.yaml does not exist), and no --route SPEC or $SIDELINK_ROUTES"
)
CONFIG_MAP = textwrap.dedent(
    """\
    apiVersion: v1
    kind: ConfigMap
    metadata:
      name: sidelink-config
    data:
      sidelink.yaml: |
        routes:
          - listen: 8081
            service: app1-service.namespace-a
            protocol: http
    """
)

FILES: dict[str, str | bytes] = {
    "good.yaml": GOOD,
    "bad.yaml": BAD,
    "binary.yaml": b"admin:\n  listen: \xff\xfe\n",
    "empty.yaml": EMPTY,
    "configmap.yaml": CONFIG_MAP,
    "configmap-bad.yaml": CONFIG_MAP.replace("protocol: http", "protocol: udp"),
    # A resolver that gives up fast, and a search list of its own (the machine's stays out).
    "quick-dns.yaml": "resolver:\n  timeout: 200ms\n  search: []\n",
}


# --- --version, usage errors -----------------------------------------------------------

VERSION = [case("version", "--version"), case("version-script", "--version", script=True)]


@pytest.mark.parametrize("name", VERSION)
def test_version(results: Results, name: str) -> None:
    result = results[name]
    assert (result.returncode, result.stderr) == (0, "")
    assert re.fullmatch(rf"sidelink {__version__} \((compiled|pure Python)\)\n", result.stdout)
    assert __version__ == "0.1.0"


USAGE = {
    case("unknown-command", "frobnicate"): "invalid choice: 'frobnicate'",
    case("unknown-flag", "check", "--frob"): "unrecognized arguments: --frob",
    case(
        "bad-log-level", "run", "--log-level", "loud"
    ): "argument --log-level: invalid choice: 'loud'",
    case("no-command"): "usage: sidelink",
}


@pytest.mark.parametrize("name", USAGE)
def test_usage_errors_exit_2(results: Results, name: str) -> None:
    result = results[name]
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert USAGE[name] in result.stderr
    assert "Traceback" not in result.stderr


# --- check ------------------------------------------------------------------------------

CHECK_GOOD = case("check-good", "check", "-c", "{dir}/good.yaml", script=True)


def test_check_prints_the_normalised_config(results: Results) -> None:
    result = results[CHECK_GOOD]
    assert (result.returncode, result.stderr) == (0, "")
    assert lines(result.stdout)[0] == f"# {results.dir}/good.yaml: ok, 2 route(s)"
    out = checked(result.stdout)
    assert out["admin"] == {"listen": "127.0.0.1:9905"}
    assert out["resolver"]["timeout"] == "500ms"
    assert out["resolver"]["max_ttl"] == "1m"  # a default, filled in
    app1, redis = out["routes"]
    assert (app1["name"], app1["listen"], app1["port"], app1["protocol"]) == (
        "app1",
        "127.0.0.1:8081",
        80,
        "http",
    )
    assert (app1["connect_timeout"], app1["retries"], app1["pool"]["max_idle"]) == ("1.5s", 1, 8)
    assert (redis["name"], redis["listen"], redis["port"], redis["protocol"]) == (
        "redis",
        "127.0.0.1:6379",
        6379,
        "tcp",
    )
    assert redis["connect_timeout"] == "2s"  # the built-in default: the file's defaults lack it


CHECK_BAD = case("check-bad", "check", env={"SIDELINK_CONFIG": "{dir}/bad.yaml"})


def test_check_lists_every_problem_one_per_line(results: Results) -> None:
    result = results[CHECK_BAD]
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == BAD_PROBLEMS


CHECK_MISSING = case("check-missing", "check", "-c", "{dir}/missing.yaml")
CHECK_BINARY = case("check-binary", "check", "-c", "{dir}/binary.yaml")


def test_check_unreadable_files(results: Results) -> None:
    for name, where, reason in [
        (CHECK_MISSING, "missing.yaml", "No such file or directory"),
        (CHECK_BINARY, "binary.yaml:2", "not UTF-8 text (invalid start byte)"),  # (its line)
    ]:
        result = results[name]
        assert (result.returncode, result.stdout) == (2, ""), name
        assert lines(result.stderr) == [f"{results.dir}/{where}: cannot read: {reason}"]


CHECK_QUICK = case(
    "check-quick", "check", "--route", "8081=x/http", "--route", "[::1]:6379=redis:6379"
)


def test_check_with_quick_routes_only(results: Results) -> None:
    result = results[CHECK_QUICK]
    assert (result.returncode, result.stderr) == (0, "")
    assert lines(result.stdout)[0] == "# no config file: ok, 2 route(s)"
    x, redis = checked(result.stdout)["routes"]
    assert (x["name"], x["listen"], x["service"], x["port"], x["protocol"]) == (
        "x:8081",
        "127.0.0.1:8081",
        "x",
        80,
        "http",
    )
    assert (redis["listen"], redis["port"], redis["protocol"]) == ("[::1]:6379", 6379, "tcp")


CHECK_ENV_ROUTES = case("check-env-routes", "check", env={"SIDELINK_ROUTES": "8081=a/http,oops"})


def test_check_with_sidelink_routes(results: Results) -> None:
    result = results[CHECK_ENV_ROUTES]
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [
        "$SIDELINK_ROUTES[1]: expected [HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http], got 'oops'"
    ]


# --- run --------------------------------------------------------------------------------

RUN_NO_ROUTES = case("run-no-routes", "run")


def test_run_without_routes_exits_2(results: Results) -> None:
    result = results[RUN_NO_ROUTES]
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [NO_ROUTES_ANYWHERE]


# check and run share one validation: what one refuses, so does the other (issue 12 defect 2).
NO_ROUTES = {
    "check": case("check-no-routes", "check"),
    "check -c empty": case("check-empty", "check", "-c", "{dir}/empty.yaml"),
    "run -c empty": case("run-empty", "run", "-c", "{dir}/empty.yaml", "--admin", "127.0.0.1:0"),
}


@pytest.mark.parametrize("name", NO_ROUTES)
def test_no_routes_is_refused_by_check_and_run_alike(results: Results, name: str) -> None:
    result = results[NO_ROUTES[name]]
    assert (result.returncode, result.stdout) == (2, ""), result
    expected = NO_ROUTES_ANYWHERE
    if "empty" in name:
        expected = (
            f"{results.dir}/empty.yaml: no routes: the file has no routes: list, and no "
            "--route SPEC or $SIDELINK_ROUTES adds one"
        )
    assert lines(result.stderr) == [expected]
    assert "give -c FILE" not in result.stderr


CHECK_CONFIG_MAP = case("check-configmap", "check", "-c", "{dir}/configmap.yaml")
CHECK_CONFIG_MAP_BAD = case("check-configmap-bad", "check", "-c", "{dir}/configmap-bad.yaml")


def test_check_reads_a_config_map_manifest_from_its_data(results: Results) -> None:
    result = results[CHECK_CONFIG_MAP]
    assert (result.returncode, result.stderr) == (0, "")
    assert lines(result.stdout)[0] == (
        f"# {results.dir}/configmap.yaml (ConfigMap sidelink-config, data.sidelink.yaml): "
        "ok, 1 route(s)"
    )
    assert checked(result.stdout)["routes"][0]["service"] == "app1-service.namespace-a"
    bad = results[CHECK_CONFIG_MAP_BAD]
    assert (bad.returncode, bad.stdout) == (2, "")
    # The line is the manifest's own.
    assert lines(bad.stderr) == [
        "configmap-bad.yaml:10: routes[0].protocol: must be one of http | tcp, got 'udp'"
    ]


RUN_BAD_ADMIN = {
    case("run-admin-nope", "run", "--route", "{free}=127.0.0.2:80", "--admin", "nope"): (
        "--admin: must be PORT or IP:PORT "
        "('nope' does not appear to be an IPv4 or IPv6 address), got 'nope'"
    ),
}


@pytest.mark.parametrize("name", RUN_BAD_ADMIN)
def test_run_with_an_invalid_admin_address_exits_2(results: Results, name: str) -> None:
    result = results[name]
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [RUN_BAD_ADMIN[name]]


RUN_ROUTE_TAKEN = case(
    "run-route-taken", "run", "--route", "{taken}=127.0.0.2:80", "--admin", "127.0.0.1:{free}"
)


def test_run_exits_1_when_a_route_port_is_taken(results: Results) -> None:
    result = results[RUN_ROUTE_TAKEN]
    port = results.taken
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in lines(result.stderr) if f"127.0.0.1:{port}" in line]
    assert len(errors) == 1, result.stderr
    assert "cannot" in errors[0]
    assert "in use" in errors[0]


RUN_ADMIN_TAKEN = case(
    "run-admin-taken", "run", "--route", "{free}=127.0.0.2:80", "--admin", "127.0.0.1:{taken}"
)


def test_run_exits_1_when_the_admin_port_is_taken(results: Results) -> None:
    result = results[RUN_ADMIN_TAKEN]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    port = results.taken
    errors = [line for line in lines(result.stderr) if f"127.0.0.1:{port}" in line]
    assert len(errors) == 1, result.stderr
    assert "admin" in errors[0]


RUN_BAD_CONFIG = case(
    "run-bad-config", "run", "-c", "{dir}/bad.yaml", "--admin", "127.0.0.1:{free}"
)


def test_run_with_a_bad_config_exits_2_listing_problems(results: Results) -> None:
    result = results[RUN_BAD_CONFIG]
    assert (result.returncode, result.stdout) == (2, "")
    # --admin moved the admin port, so the route on 9901 no longer clashes with it.
    assert lines(result.stderr) == [p for p in BAD_PROBLEMS if "admin.listen" not in p]


RUN_BAD_CONFIG_JSON = case(
    "run-bad-config-json",
    "run",
    "-c",
    "{dir}/bad.yaml",
    "--admin",
    "127.0.0.1:{free}",
    "--log-format",
    "json",
)


def test_run_with_a_bad_config_and_json_logs_says_each_problem_as_json(results: Results) -> None:
    # (A log pipeline that reads JSON got the lines that explain the exit as plain text.)
    result = results[RUN_BAD_CONFIG_JSON]
    assert (result.returncode, result.stdout) == (2, "")
    entries = [json.loads(line) for line in lines(result.stderr)]
    assert [e["message"] for e in entries] == [p for p in BAD_PROBLEMS if "admin.listen" not in p]
    assert {(e["level"], e["logger"]) for e in entries} == {("error", "sidelink")}


# --- inject -----------------------------------------------------------------------------

INJECT = case("inject", "inject", "-", "--route", ROUTE, stdin=DEPLOYMENT)
# Built by the library, so the CLI run below also shows the two agree. Injected again, from a
# file this time, it must come out unchanged.
INJECTED = inject(DEPLOYMENT, routes=[ROUTE])
INJECT_AGAIN = case("inject-again", "inject", "{dir}/injected.yaml", "--route", ROUTE)
FILES["injected.yaml"] = INJECTED


def test_inject_from_stdin(results: Results) -> None:
    result = results[INJECT]
    assert (result.returncode, result.stderr) == (0, "deployment/web: injected\n")
    spec = yaml.safe_load(result.stdout)["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    (sidecar,) = spec["initContainers"]
    assert (sidecar["name"], sidecar["restartPolicy"]) == ("sidelink", "Always")
    assert {"name": "SIDELINK_ROUTES", "value": ROUTE} in sidecar["env"]
    assert result.stdout == INJECTED

    again = results[INJECT_AGAIN]
    assert (again.returncode, again.stdout, again.stderr) == (
        0,
        INJECTED,
        "deployment/web: unchanged\n",
    )


INJECT_BAD = {
    case("inject-bad-yaml", "inject", stdin="a: [1\n"): (
        "<stdin>:2: document 1: while parsing a flow sequence: "
        "expected ',' or ']', but got '<stream end>'"
    ),
    case("inject-control-character", "inject", stdin='kind: Pod\nmetadata:\n  name: "x\x01"\n'): (
        "<stdin>:3: unacceptable character #x0001: special characters are not allowed"
    ),
    case("inject-binary", "inject", "binary.yaml"): (
        "binary.yaml:2: cannot read: not UTF-8 text (invalid start byte)"
    ),
}


@pytest.mark.parametrize("name", INJECT_BAD)
def test_inject_bad_input_exits_2(results: Results, name: str) -> None:
    result = results[name]
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [INJECT_BAD[name]]


# Arguments refused by the parser, with the usage, before any work: names a pod spec could
# not hold (before any YAML is read), durations a demo cannot run for.
BAD_ARGUMENT = {
    case("inject-config-map-upper", "inject", "-", "--config-map", "Sidelink_Config"): (
        "argument --config-map: must be a ConfigMap name (lowercase letters, digits, '-' and "
        "'.'), got 'Sidelink_Config'"
    ),
    case("inject-config-map-empty", "inject", "-", "--config-map="): (
        "argument --config-map: must be a ConfigMap name (lowercase letters, digits, '-' and "
        "'.'), got ''"
    ),
    case("inject-image-space", "inject", "-", "--image", "sidelink: latest"): (
        "argument --image: must be an image reference, got 'sidelink: latest'"
    ),
    case("webhook-image-empty", "webhook", "--cert", "c", "--key", "k", "--image="): (
        "argument --image: must be an image reference, got ''"
    ),
    case("webhook-config-map-empty", "webhook", "--cert", "c", "--key", "k", "--config-map="): (
        "argument --config-map: must be a ConfigMap name (lowercase letters, digits, '-' and "
        "'.'), got ''"
    ),
    **{
        case(f"demo-duration-{value}", "demo", "--duration", value): (
            f"argument --duration: must be 0.05..3600 seconds, got {value}"
        )
        for value in ("-1", "nan", "inf", "0", "abc")
    },
    case("top-interval-word", "top", "--interval", "abc"): (
        "argument --interval: must be 0.05..3600 seconds, got abc"
    ),
}


@pytest.mark.parametrize("name", BAD_ARGUMENT)
def test_bad_arguments_are_refused_with_the_usage(results: Results, name: str) -> None:
    result = results[name]
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("usage: sidelink ")
    command = name.split("-", maxsplit=1)[0]
    assert lines(result.stderr)[-1] == f"sidelink {command}: error: {BAD_ARGUMENT[name]}"


INJECT_MISSING = case("inject-missing", "inject", "{dir}/nope.yaml")


def test_inject_missing_file_exits_2(results: Results) -> None:
    result = results[INJECT_MISSING]
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [
        f"{results.dir}/nope.yaml: cannot read: No such file or directory"
    ]


# A sidecar that could not start is refused, with the message check gives (issue 12 defect 1).
INJECT_NO_ROUTES = case("inject-no-routes", "inject", "-", stdin=DEPLOYMENT)
INJECT_ROUTE_8081 = case("inject-route-8081", "inject", "-", "--route", "8081", stdin=DEPLOYMENT)
CHECK_ROUTE_8081 = case("check-route-8081", "check", "--route", "8081")
INJECT_REPORT = case(
    "inject-report",
    "inject",
    "-",
    "--route",
    ROUTE,
    stdin="apiVersion: v1\nkind: Service\nmetadata: {name: x}\n---\n" + DEPLOYMENT,
)


def test_inject_refuses_a_sidecar_that_could_not_start(results: Results) -> None:
    result = results[INJECT_NO_ROUTES]
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [
        "no routes: give --route SPEC (repeatable) or --config-map NAME; "
        "a sidecar without routes cannot start"
    ]
    inject_8081, check_8081 = results[INJECT_ROUTE_8081], results[CHECK_ROUTE_8081]
    assert (inject_8081.returncode, inject_8081.stdout) == (2, "")
    assert check_8081.returncode == 2
    assert inject_8081.stderr == check_8081.stderr
    assert lines(inject_8081.stderr) == [
        "--route[0]: expected [HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http], got '8081'"
    ]


def test_inject_says_per_object_what_it_did(results: Results) -> None:
    result = results[INJECT_REPORT]
    assert result.returncode == 0, result.stderr
    assert lines(result.stderr) == ["service/x: skipped", "deployment/web: injected"]
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout)] == ["Service", "Deployment"]


# --- resolve ------------------------------------------------------------------------------

RESOLVE_ENV = case(
    "resolve-env",
    "resolve",
    "app1-service",
    "-c",
    "{dir}/quick-dns.yaml",
    "--nameserver",
    "127.0.0.1:{free}",
    env={"APP1_SERVICE_SERVICE_HOST": "10.0.0.7"},
)


def test_resolve_exits_0_on_an_env_answer_as_run_serves_it(results: Results) -> None:
    result = results[RESOLVE_ENV]
    assert result.returncode == 0, result
    out = lines(result.stdout)
    assert out[0].startswith("nameservers: 127.0.0.1:")
    assert "<" not in result.stdout, "no Python reprs"
    assert "tried:       app1-service." in out
    assert "answered:    - (source: env, from $APP1_SERVICE_SERVICE_HOST)" in out
    assert out[-1] == "address:     10.0.0.7:80"


RESOLVE_REFUSED = {
    case("resolve-bad-name", "resolve", "bad_name!", "--nameserver", "127.0.0.1:{free}"): [
        "NAME: must be a DNS name (svc, svc.ns, svc.ns.svc.cluster.local) or an IP, got 'bad_name!'"
    ],
    case("resolve-bad-port", "resolve", "app1", "--port", "99999"): [
        "--port: must be 1..65535 or a port name, got '99999'"
    ],
    case("resolve-ip-port-name", "resolve", "10.0.0.1", "--port", "http"): [
        "--port: a port name (http) needs a DNS name, not an IP"
    ],
    case("resolve-bad-nameserver", "resolve", "app1", "--nameserver", "dns.example"): [
        "--nameserver: must be IP or IP:PORT "
        "('dns.example' does not appear to be an IPv4 or IPv6 address), got 'dns.example'"
    ],
}


@pytest.mark.parametrize("name", RESOLVE_REFUSED)
def test_resolve_refuses_what_the_config_refuses_before_any_query(
    results: Results, name: str
) -> None:
    result = results[name]
    # Nothing printed: no resolver was made, so no query was sent.
    assert (result.returncode, result.stdout) == (2, ""), result
    assert lines(result.stderr) == RESOLVE_REFUSED[name]


RESOLVE_LOCALHOST = case("resolve-localhost", "resolve", "localhost", "--port", "8080")


def test_resolve_reads_the_hosts_file_first(results: Results) -> None:
    if "localhost" not in Path("/etc/hosts").read_text():
        pytest.skip("this machine's /etc/hosts has no localhost")
    result = results[RESOLVE_LOCALHOST]
    assert result.returncode == 0, result
    out = lines(result.stdout)
    assert "answered:    localhost (source: hosts)" in out
    assert any(re.fullmatch(r"address: +(127\.0\.0\.1|\[::1\]):8080", line) for line in out)


# --- help -----------------------------------------------------------------------------------

HELP = {
    command: case(f"help-{command}", command, "--help")
    for command in ("run", "check", "resolve", "inject", "top", "demo")
}


@pytest.mark.parametrize("command", HELP)
def test_each_command_has_help_with_an_example(results: Results, command: str) -> None:
    result = results[HELP[command]]
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"usage: sidelink {command}")
    assert "example:" in result.stdout
    assert f"  sidelink {command}" in result.stdout.split("example:")[1]
    if command in ("run", "check", "resolve"):
        assert "$SIDELINK_CONFIG" in result.stdout
        assert "$SIDELINK_ROUTES" in result.stdout
    if command == "top":
        assert "default: 127.0.0.1:9901" in result.stdout


# --- the stale-build guard (tests/conftest.py) ------------------------------------------------


def test_the_stale_build_guard_compares_source_text_not_times(tmp_path: Path) -> None:
    package, record = tmp_path / "proxy", tmp_path / "build" / "sources.json"
    (package / "http").mkdir(parents=True)
    source = package / "http" / "h1.py"
    source.write_text("x = 1\n")
    built = package / "http" / "h1.cpython-311-x86_64-linux-gnu.so"
    built.write_bytes(b"\x7fELF")
    os.utime(source, ns=(1_000_000_000, 1_000_000_000))
    assert stale_sources(package, record) == []  # built after its source: its hash is kept

    # A checkout rewrites the file with the same text: newer, yet the build is current.
    source.write_text("x = 1\n")
    assert source.stat().st_mtime_ns > built.stat().st_mtime_ns
    assert stale_sources(package, record) == []
    # An edit is stale, whatever the times say.
    source.write_text("x = 2\n")
    os.utime(source, ns=(1_000_000_000, 1_000_000_000))
    assert stale_sources(package, record) == ["http/h1.py"]
    # A rebuild (a new .so mtime) starts afresh.
    os.utime(built, ns=(2_000_000_000, 2_000_000_000))
    assert stale_sources(package, record) == []
    source.write_text("x = 1\n")
    assert stale_sources(package, record) == ["http/h1.py"]
