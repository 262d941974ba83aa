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

INSTALL_HINT = "apt-get install -y wrk haproxy nginx-light curl"
STREAM_HINT = "apt-get install -y libnginx-mod-stream"
# Debian keeps system binaries in sbin, which a non-root PATH may lack.
EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")
VERSION_TIMEOUT = 10.0


@dataclass(frozen=True)
class Tools:
    wrk: str
    curl: str
    nginx: str
    haproxy: str | None  # None when HAProxy is not among the proxies under test


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    path = os.pathsep.join(EXTRA_PATH)
    return shutil.which(name, path=path)


def find_tools(need_haproxy: bool) -> tuple[Tools | None, list[str]]:
    """The tools, or None and the names of the missing ones."""
    names = ["wrk", "curl", "nginx"] + (["haproxy"] if need_haproxy else [])
    paths = {name: which(name) for name in names}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        return None, missing
    return (
        Tools(
            wrk=str(paths["wrk"]),
            curl=str(paths["curl"]),
            nginx=str(paths["nginx"]),
            haproxy=paths.get("haproxy"),
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
    if re.search(r"--with-stream(\s|$)", configure):
        return NginxModules(stream=True, load_line="")
    match = re.search(r"--modules-path=(\S+)", configure)
    modules_dir = Path(match.group(1) if match else "/usr/lib/nginx/modules")
    module = modules_dir / "ngx_stream_module.so"
    if "--with-stream=dynamic" in configure and module.exists():
        return NginxModules(stream=True, load_line=f"load_module {module};\n")
    return NginxModules(stream=False, load_line="")


def versions(tools: Tools) -> dict[str, str]:
    """Short version strings: the part of each tool's banner that names the version."""
    found = {
        "sidelink": _output([sys.executable, "-m", "proxy", "--version"]).removeprefix("sidelink "),
        "wrk": _first(r"wrk (\S+)", _output([tools.wrk, "-v"])),
        "nginx": _first(r"nginx/(\S+)", _output([tools.nginx, "-v"])),
        "curl": _first(r"curl (\S+)", _output([tools.curl, "--version"])),
    }
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
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def git_revision(repo: Path) -> str:
    rev = _output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(repo), "status", "--porcelain", "--", "proxy"])
    return f"{rev} (proxy/ has uncommitted changes)" if dirty else rev
