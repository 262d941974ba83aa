"""The external tools the benchmark drives, their versions, and the machine it runs on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.configs import NginxModules

INSTALL_HINT = "apt-get install -y wrk haproxy nginx-light curl nghttp2-client"
STREAM_HINT = "apt-get install -y libnginx-mod-stream"
# Debian keeps system binaries in sbin, which a non-root PATH may lack.
EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")
VERSION_TIMEOUT = 10.0


@dataclass(frozen=True)
class Tools:
    wrk: str | None  # None when the HTTP/1.1 and tcp scenarios do not run (--suite h2)
    curl: str | None
    nginx: str
    haproxy: str | None  # None when HAProxy is not among the proxies under test
    h2load: str | None = None  # None when the HTTP/2 scenarios do not run (--suite h1)


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    path = os.pathsep.join(EXTRA_PATH)
    return shutil.which(name, path=path)


def find_tools(
    need_haproxy: bool, *, h1: bool = True, h2: bool = True
) -> tuple[Tools | None, list[str]]:
    """The tools, or None and the names of the missing ones. ``h1``: the HTTP/1.1, tcp and
    bulk scenarios run (wrk, curl); ``h2``: the HTTP/2 ones (h2load)."""
    names = ["nginx"] + (["wrk", "curl"] if h1 else []) + (["h2load"] if h2 else [])
    names += ["haproxy"] if need_haproxy else []
    paths = {name: which(name) for name in names}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        return None, missing
    return (
        Tools(
            wrk=paths.get("wrk"),
            curl=paths.get("curl"),
            nginx=str(paths["nginx"]),
            haproxy=paths.get("haproxy"),
            h2load=paths.get("h2load"),
        ),
        [],
    )


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=VERSION_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (done.stdout + done.stderr).strip()


def nginx_modules(nginx: str) -> NginxModules:
    """Whether this nginx can proxy TCP: stream built in, or the dynamic module installed."""
    configure = _output([nginx, "-V"])
    # HTTP/2 is opt-in at build time; the grpc module (grpc_pass) is built unless opted out.
    http2 = "--with-http_v2_module" in configure
    grpc = "--without-http_grpc_module" not in configure
    if re.search(r"--with-stream(\s|$)", configure):
        return NginxModules(stream=True, load_line="", http2=http2, grpc=grpc)
    match = re.search(r"--modules-path=(\S+)", configure)
    modules_dir = Path(match.group(1) if match else "/usr/lib/nginx/modules")
    module = modules_dir / "ngx_stream_module.so"
    if "--with-stream=dynamic" in configure and module.exists():
        load = f"load_module {module};\n"
        return NginxModules(stream=True, load_line=load, http2=http2, grpc=grpc)
    return NginxModules(stream=False, load_line="", http2=http2, grpc=grpc)


def versions(tools: Tools) -> dict[str, str]:
    """Short version strings: the part of each tool's banner that names the version."""
    found = {
        "sidelink": _output([sys.executable, "-m", "proxy", "--version"]).removeprefix("sidelink "),
        "nginx": _first(r"nginx/(\S+)", _output([tools.nginx, "-v"])),
    }
    if tools.wrk is not None:
        found["wrk"] = _first(r"wrk (\S+)", _output([tools.wrk, "-v"]))
    if tools.curl is not None:
        found["curl"] = _first(r"curl (\S+)", _output([tools.curl, "--version"]))
    if tools.h2load is not None:
        found["h2load"] = _first(r"nghttp2/(\S+)", _output([tools.h2load, "--version"]))
        try:
            found["grpcio"] = importlib.metadata.version("grpcio")
        except importlib.metadata.PackageNotFoundError:
            found["grpcio"] = "not installed (no gRPC scenario)"
    if tools.haproxy is not None:
        found["haproxy"] = _first(r"version (\S+)", _output([tools.haproxy, "-v"]))
    try:
        found["uvloop"] = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        found["uvloop"] = "not installed (sidelink runs on the default asyncio loop)"
    return found


def _first(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    return match.group(1) if match else text.splitlines()[0] if text else "unknown"


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": interpreter(),
    }


def interpreter() -> str:
    """The Python sidelink runs on here (the benchmark starts it with its own): version,
    executable, and whether libpython is a shared library or inside the executable. Its
    build counts for much: Debian's python3 and the official python images (the image's
    two bases) are built with PGO and LTO; a source build with default options (pyenv's,
    say) is not, and runs sidelink's HTTP/2 path markedly slower (RESULTS.md, ninth
    session)."""
    try:
        shared = "libpython" in Path("/proc/self/maps").read_text()
    except OSError:
        linkage = ""
    else:
        linkage = ", libpython shared" if shared else ", libpython in the executable"
    version = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{version} ({os.path.realpath(sys.executable)}{linkage})"


def git_revision(repo: Path) -> str:
    rev = _output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(repo), "status", "--porcelain", "--", "proxy"])
    return f"{rev} (proxy/ has uncommitted changes)" if dirty else rev
