"""End-to-end tests of the ``sidelink`` command, run as a real subprocess: output and exit codes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import __version__
from proxy.config import DEFAULT_CONFIG_PATH

from tests.helpers import free_port

PYTHON_M = [sys.executable, "-m", "proxy"]


def console_script() -> list[str]:
    """The installed ``sidelink`` entry point, next to this interpreter (the venv's bin/)."""
    path = Path(sys.executable).parent / "sidelink"
    if not path.exists():
        found = shutil.which("sidelink")
        assert found, "the sidelink console script is not installed (pip install -e .)"
        path = Path(found)
    return [str(path)]


@pytest.fixture(params=["python -m proxy", "sidelink"])
def command(request: pytest.FixtureRequest) -> list[str]:
    return PYTHON_M if request.param == "python -m proxy" else console_script()


@pytest.fixture(autouse=True)
def no_default_file() -> None:
    if Path(DEFAULT_CONFIG_PATH).exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine and would be read")


def sidelink(
    *args: str,
    command: Sequence[str] = PYTHON_M,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the command to completion; the caller's SIDELINK_* variables never leak in."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDELINK_")}
    full_env.update(env or {})
    return subprocess.run(
        [*command, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=30,
        check=False,
    )


def lines(text: str) -> list[str]:
    return text.splitlines()


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


def checked(out: str) -> dict[str, Any]:
    """The YAML `check` printed (its first line is a YAML comment saying what was checked)."""
    assert out.startswith("# "), out
    doc: dict[str, Any] = yaml.safe_load(out)
    return doc


# --- --version, usage errors -----------------------------------------------------------


def test_version(command: list[str]) -> None:
    result = sidelink("--version", command=command)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"sidelink {__version__}\n", "")
    assert __version__ == "0.1.0"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["check", "--frob"], "unrecognized arguments: --frob"),
        (["--frob"], "unrecognized arguments: --frob"),
        (["run", "--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["run", "--route"], "argument --route: expected one argument"),
        ([], "usage: sidelink"),
    ],
)
def test_usage_errors_exit_2(args: list[str], says: str) -> None:
    result = sidelink(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert says in result.stderr
    assert "Traceback" not in result.stderr


# --- check ------------------------------------------------------------------------------


def test_check_prints_the_normalised_config(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    result = sidelink("check", "-c", str(tmp_path / "good.yaml"), command=command)
    assert (result.returncode, result.stderr) == (0, "")
    assert lines(result.stdout)[0] == f"# {tmp_path / 'good.yaml'}: ok, 2 route(s)"
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
    assert redis["connect_timeout"] == "1s"


def test_check_output_is_itself_a_valid_config(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    first = sidelink("check", "-c", str(tmp_path / "good.yaml"))
    assert first.returncode == 0, first.stderr
    (tmp_path / "again.yaml").write_text(first.stdout)
    second = sidelink("check", "-c", str(tmp_path / "again.yaml"))
    assert second.returncode == 0, second.stderr
    assert lines(second.stdout)[1:] == lines(first.stdout)[1:]


def test_check_lists_every_problem_one_per_line(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    result = sidelink("check", "-c", str(tmp_path / "bad.yaml"), command=command)
    assert result.returncode == 2
    assert result.stdout == ""
    assert lines(result.stderr) == BAD_PROBLEMS


def test_check_reads_sidelink_config_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    (tmp_path / "good.yaml").write_text(GOOD)
    env = {"SIDELINK_CONFIG": str(tmp_path / "bad.yaml")}
    result = sidelink("check", env=env)
    assert (result.returncode, lines(result.stderr)) == (2, BAD_PROBLEMS)
    # -c wins over the environment.
    result = sidelink("check", "-c", str(tmp_path / "good.yaml"), env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["missing.yaml", "a-directory"])
def test_check_unreadable_file(name: str, tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    path = tmp_path / name
    result = sidelink("check", "-c", str(path))
    reason = "No such file or directory" if name == "missing.yaml" else "Is a directory"
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [f"{path}: cannot read: {reason}"]


def test_check_never_crashes_on_odd_yaml(tmp_path: Path) -> None:
    path = tmp_path / "odd.yaml"
    path.write_bytes(b"defaults:\n  retries: !!int abc\n  balance: \xff\n")
    result = sidelink("check", "-c", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [f"{path}: cannot read: not UTF-8 text (invalid start byte)"]
    path.write_text("defaults:\n  retries: !!int abc\nroutes: [{<<: {listen: 1}, service: s}]\n")
    result = sidelink("check", "-c", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [
        "odd.yaml:2: defaults.retries: invalid YAML value: "
        "invalid literal for int() with base 10: 'abc'",
        "odd.yaml:3: routes[0].<<: YAML merge keys are not supported "
        "(shared route settings go in defaults:)",
        "odd.yaml:3: routes[0].listen: is required",
    ]


def test_check_with_quick_routes_only(tmp_path: Path) -> None:
    result = sidelink(
        "check", "--route", "8081=x/http", "--route", "[::1]:6379=redis:6379", cwd=tmp_path
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert lines(result.stdout)[0] == "# no config file: ok, 2 route(s)"
    x, redis = checked(result.stdout)["routes"]
    assert (x["name"], x["listen"], x["service"], x["port"], x["protocol"]) == (
        "x",
        "127.0.0.1:8081",
        "x",
        80,
        "http",
    )
    assert (redis["listen"], redis["port"], redis["protocol"]) == ("[::1]:6379", 6379, "tcp")


def test_check_with_sidelink_routes_and_a_bad_one() -> None:
    result = sidelink("check", env={"SIDELINK_ROUTES": "8081=a/http,6379=redis:6379/tcp"})
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in checked(result.stdout)["routes"]] == ["a", "redis"]

    result = sidelink("check", env={"SIDELINK_ROUTES": "8081=a/http,oops"})
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [
        "$SIDELINK_ROUTES[1]: expected [HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http], got 'oops'"
    ]
    # --route replaces $SIDELINK_ROUTES rather than adding to it.
    result = sidelink("check", "--route", "9000=b", env={"SIDELINK_ROUTES": "oops"})
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in checked(result.stdout)["routes"]] == ["b"]


# --- run --------------------------------------------------------------------------------


def test_run_without_routes_exits_2(tmp_path: Path) -> None:
    result = sidelink("run", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == ["no routes: give -c FILE, --route SPEC or $SIDELINK_ROUTES"]


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        (
            "nope",
            "--admin: must be PORT or IP:PORT "
            "('nope' does not appear to be an IPv4 or IPv6 address), got 'nope'",
        ),
        (
            "127.0.0.1:70000",
            "--admin: must be PORT or IP:PORT "
            "(port must be 0..65535, got 70000), got '127.0.0.1:70000'",
        ),
    ],
)
def test_run_with_an_invalid_admin_address_exits_2(admin: str, message: str) -> None:
    result = sidelink("run", "--route", f"{free_port()}=127.0.0.2:80", "--admin", admin)
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [message]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test holds bound, so sidelink cannot have it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_run_exits_1_when_a_route_port_is_taken(command: list[str], taken_port: int) -> None:
    admin = free_port()
    result = sidelink(
        "run",
        "--route",
        f"{taken_port}=127.0.0.2:80",
        "--admin",
        f"127.0.0.1:{admin}",
        command=command,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in lines(result.stderr) if f"127.0.0.1:{taken_port}" in line]
    assert len(errors) == 1, result.stderr
    assert "cannot" in errors[0]
    assert "in use" in errors[0]


def test_run_exits_1_when_the_admin_port_is_taken(taken_port: int) -> None:
    result = sidelink(
        "run", "--route", f"{free_port()}=127.0.0.2:80", "--admin", f"127.0.0.1:{taken_port}"
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in lines(result.stderr) if f"127.0.0.1:{taken_port}" in line]
    assert len(errors) == 1, result.stderr


def test_run_with_a_bad_config_exits_2_listing_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    result = sidelink(
        "run", "-c", str(tmp_path / "bad.yaml"), "--admin", f"127.0.0.1:{free_port()}"
    )
    assert (result.returncode, result.stdout) == (2, "")
    # --admin moved the admin port, so the route on 9901 no longer clashes with it.
    assert lines(result.stderr) == [p for p in BAD_PROBLEMS if "admin.listen" not in p]


# --- inject -----------------------------------------------------------------------------

DEPLOYMENT = textwrap.dedent(
    """\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
    spec:
      template:
        spec:
          containers:
          - name: app
            image: example/web:1
    """
)


def test_inject_from_stdin(command: list[str]) -> None:
    result = sidelink(
        "inject",
        "--route",
        "8081=app1-service.namespace-a:80/http",
        stdin=DEPLOYMENT,
        command=command,
    )
    assert (result.returncode, result.stderr) == (0, "")
    spec = yaml.safe_load(result.stdout)["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    (sidecar,) = spec["initContainers"]
    assert (sidecar["name"], sidecar["restartPolicy"]) == ("sidelink", "Always")
    assert {"name": "SIDELINK_ROUTES", "value": "8081=app1-service.namespace-a:80/http"} in sidecar[
        "env"
    ]

    again = sidelink(
        "inject", "-", "--route", "8081=app1-service.namespace-a:80/http", stdin=result.stdout
    )
    assert (again.returncode, again.stdout) == (0, result.stdout)


def test_inject_classic_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "deploy.yaml").write_text(DEPLOYMENT)
    result = sidelink("inject", str(tmp_path / "deploy.yaml"), "--classic")
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(result.stdout)["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["app", "sidelink"]
    assert "initContainers" not in spec


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [
        (
            "a: [1\n",
            "<stdin>:2: document 1: while parsing a flow sequence: "
            "expected ',' or ']', but got '<stream end>'",
        ),
        (
            "kind: Deployment\nspec:\n  template: 5\n",
            "<stdin>:3: document 1 (Deployment): spec.template must be a mapping, got an integer",
        ),
    ],
)
def test_inject_bad_input_exits_2(stdin: str, expected: str) -> None:
    result = sidelink("inject", stdin=stdin)
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [expected]


def test_inject_missing_file_exits_2(tmp_path: Path) -> None:
    result = sidelink("inject", str(tmp_path / "nope.yaml"))
    assert (result.returncode, result.stdout) == (2, "")
    assert lines(result.stderr) == [
        f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory"
    ]
