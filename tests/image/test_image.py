"""The container image: built by the Dockerfile, run as a pod runs it.

Outside the default run (tests/conftest.py ignores this directory): `python -m pytest
tests/image` as root, with Debian's docker.io (dockerd) and debootstrap installed;
`.ci/run` does both. It starts a dockerd of its own (engine.py), takes the official
python slim base if a registry serves it, else makes one from Debian packages with
debootstrap (cached under /var/tmp/sidelink-image-cache), builds the image and runs it
`--read-only --user 65532 --cap-drop ALL --network host` against an upstream on
127.0.0.x. Skips without root or dockerd; with CI=true those, or an engine that does
not start, fail instead.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import random
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .engine import Engine, EngineError, base_image, docker_tools, host_cas, image_size

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
TAG = "sidelink:image-test"
MB = 1_000_000  # as `docker images` counts
# What the sidelink layers (the virtual environment) may add to the base.
MAX_ADDED = 45 * MB

pytestmark = pytest.mark.timeout(1500)  # the first run makes the base and compiles


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the image tests must run; .ci/run installs docker.io)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    if os.geteuid() != 0:
        unavailable("the image tests start dockerd, which needs root")
    tools = docker_tools()
    if tools is None:
        unavailable("dockerd or the docker CLI is not installed (apt-get install docker.io)")
        raise AssertionError  # (unreachable)
    daemon = Engine(*tools)
    try:
        daemon.start()
    except EngineError as e:
        daemon.stop()
        unavailable(f"dockerd does not start: {e}")
    try:
        yield daemon
    finally:
        daemon.stop()


class Built:
    def __init__(self, base: str, log: list[str], seconds: float) -> None:
        self.base, self.log, self.seconds = base, log, seconds


@pytest.fixture(scope="module")
def image(engine: Engine) -> Built:
    log: list[str] = []
    started = time.monotonic()
    base = base_image(engine, log)
    args = ["build", "--network", "host", "--build-arg", f"BASE={base}", "-t", TAG]
    if host_cas():  # pip in the build stage trusts what this machine trusts (see engine.py)
        args += ["--build-arg", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt"]
    build_started = time.monotonic()
    engine.run(*args, str(ROOT), timeout=1200)
    log.append(f"image built in {time.monotonic() - build_started:.0f}s")
    built = Built(base, log, time.monotonic() - started)
    print("\n" + "\n".join(log))
    return built


def run(engine: Engine, *args: str, timeout: float = 60) -> str:
    """`docker run` the image as a pod would (plus the given options), its output."""
    result = engine.run("run", "--rm", *HARDENED, *args, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


HARDENED = [
    "--read-only",
    "--user",
    "65532",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--network",
    "host",
]


def test_version_says_compiled(engine: Engine, image: Built) -> None:
    out = run(engine, TAG, "--version")
    assert "compiled" in out and "pure Python" not in out, out


def test_runs_as_nonroot_with_sidelink_run_and_no_compiler(engine: Engine, image: Built) -> None:
    config = json.loads(engine.run("image", "inspect", TAG).stdout)[0]["Config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["sidelink"]
    assert config["Cmd"] == ["run"]
    # The image's own user (no --user given), as a pod without runAsUser gets it:
    whoami = engine.run(
        "run",
        "--rm",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--network",
        "host",
        "--entrypoint",
        "/bin/sh",
        TAG,
        "-c",
        "id -u; id -g",
    ).stdout
    assert whoami.split() == ["65532", "65532"]
    tools = engine.run(
        "run",
        "--rm",
        *HARDENED,
        "--entrypoint",
        "/bin/sh",
        TAG,
        "-c",
        "command -v gcc cc strip pip pip3 || echo none",
        check=False,
    )
    assert tools.stdout.strip() == "none", f"build tools in the final image: {tools.stdout}"


def test_size(engine: Engine, image: Built) -> None:
    total, base = image_size(engine, TAG), image_size(engine, image.base)
    added = total - base
    compressed, compressed_base = compressed_layers(engine, image.base)
    print(
        f"\nimage size: {total / MB:.1f} MB ({(compressed + compressed_base) / MB:.1f} MB "
        f"gzipped, as a registry stores it) on {image.base}, {base / MB:.1f} MB "
        f"({compressed_base / MB:.1f} MB gzipped); the sidelink layers add {added / MB:.1f} MB "
        f"({compressed / MB:.1f} MB gzipped); base and build took {image.seconds:.0f}s"
    )
    assert added <= MAX_ADDED, f"the sidelink layers add {added / MB:.1f} MB"


def compressed_layers(engine: Engine, base: str) -> tuple[int, int]:
    """The gzipped size of the layers the image adds to its base, and of the base's."""

    def layers(ref: str) -> list[str]:
        inspected = json.loads(engine.run("image", "inspect", ref).stdout)[0]
        return list(inspected["RootFS"]["Layers"])

    ours, theirs = layers(TAG), layers(base)
    assert ours[: len(theirs)] == theirs, "the image is not built on its base"
    with tempfile.TemporaryDirectory(prefix="sidelink-save-", dir="/var/tmp") as work:
        archive = Path(work) / "image.tar"
        engine.run("save", "-o", str(archive), TAG, timeout=300)
        with tarfile.open(archive) as tar:
            manifest_file = tar.extractfile("manifest.json")
            assert manifest_file is not None
            files = json.load(manifest_file)[0]["Layers"]  # in the order of RootFS.Layers
            sizes = []
            for name in files:
                member = tar.extractfile(name)
                assert member is not None
                sizes.append(len(gzip.compress(member.read(), compresslevel=6)))
    return sum(sizes[len(theirs) :]), sum(sizes[: len(theirs)])


# -- serving and draining -------------------------------------------------------------


class Upstream(http.server.ThreadingHTTPServer):
    """A tiny HTTP/1.1 server on 127.0.0.x: /hello answers at once, /slow after 3 s."""

    daemon_threads = True

    def __init__(self) -> None:
        self.slow_started = threading.Event()
        for _ in range(50):
            self.host = f"127.0.0.{random.randint(20, 250)}"
            try:
                super().__init__((self.host, 0), Handler)
                break
            except OSError:
                continue
        else:
            raise AssertionError("no free port on 127.0.0.20-250")
        self.port = int(self.server_address[1])


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def do_GET(self) -> None:
        if self.path == "/slow":
            self.server.slow_started.set()
            time.sleep(3)
        body = f"hello from {self.server.host} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serves_a_route_and_drains_on_docker_stop(
    engine: Engine, image: Built, upstream: Upstream
) -> None:
    admin, listen = free_port(), free_port()
    config_dir = Path(tempfile.mkdtemp(prefix="sidelink-image-config-"))
    try:
        config_dir.chmod(0o755)
        (config_dir / "sidelink.yaml").write_text(
            f"admin:\n  listen: 127.0.0.1:{admin}\n"
            "shutdown:\n  drain_delay: 1s\n  drain_timeout: 15s\n"
            "routes:\n"
            f"  - name: upstream\n    listen: 127.0.0.1:{listen}\n"
            f"    service: {upstream.host}\n    port: {upstream.port}\n    protocol: http\n"
        )
        (config_dir / "sidelink.yaml").chmod(0o644)
        name = f"sidelink-image-test-{os.getpid()}"
        engine.run(
            "run",
            "-d",
            "--name",
            name,
            *HARDENED,
            "-v",
            f"{config_dir}:/etc/sidelink:ro",
            TAG,  # the default command: run, with /etc/sidelink/sidelink.yaml
        )
        try:
            serve_and_drain(engine, name, admin, listen, upstream)
        finally:
            engine.run("rm", "-f", name, check=False)
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)


def serve_and_drain(engine: Engine, name: str, admin: int, listen: int, upstream: Upstream) -> None:
    def logs() -> str:
        out = engine.run("logs", name, check=False)
        return out.stdout + out.stderr

    deadline = time.monotonic() + 30
    while True:
        try:
            if get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200:
                break
        except OSError:
            pass
        state = json.loads(engine.run("inspect", name).stdout)[0]["State"]
        assert state["Running"], f"sidelink exited {state['ExitCode']}:\n{logs()}"
        assert time.monotonic() < deadline, f"/readyz not 200 after 30s:\n{logs()}"
        time.sleep(0.1)

    status, body = get(f"http://127.0.0.1:{listen}/hello")
    assert (status, body) == (200, f"hello from {upstream.host} /hello\n"), logs()

    # A request in flight when `docker stop` sends SIGTERM finishes; /readyz turns 503;
    # sidelink exits 0 by itself, well before docker's SIGKILL.
    slow: dict[str, object] = {}

    def call_slow() -> None:
        try:
            slow["answer"] = get(f"http://127.0.0.1:{listen}/slow", timeout=20)
        except OSError as e:
            slow["answer"] = repr(e)

    caller = threading.Thread(target=call_slow)
    caller.start()
    assert upstream.slow_started.wait(10), logs()
    stop_started = time.monotonic()
    stopper = threading.Thread(target=lambda: engine.run("stop", "-t", "25", name, timeout=60))
    stopper.start()
    readiness: list[int] = []
    while stopper.is_alive() and 503 not in readiness:
        with contextlib.suppress(OSError):
            readiness.append(get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0])
        time.sleep(0.05)
    stopper.join(60)
    stopped_in = time.monotonic() - stop_started
    caller.join(30)

    state = json.loads(engine.run("inspect", name).stdout)[0]["State"]
    output = logs()
    assert slow.get("answer") == (200, f"hello from {upstream.host} /slow\n"), output
    assert 503 in readiness, f"/readyz never 503 during the drain: {readiness}\n{output}"
    assert state["ExitCode"] == 0 and not state["OOMKilled"], f"{state}\n{output}"
    assert stopped_in < 20, f"docker stop took {stopped_in:.1f}s (SIGKILL at 25s)\n{output}"
    assert "Traceback" not in output, output
    assert "compiled" in output, f"the start-up log names the build:\n{output}"
