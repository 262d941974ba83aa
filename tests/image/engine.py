"""A container engine of the test's own, and a base image made from Debian packages.

`Engine` runs dockerd (Debian's `docker.io`) with its own data root, exec root and socket
under a temporary directory: vfs storage, no iptables, no bridge (containers and builds
use the host's network). `base_image` gives the Dockerfile's default base when a registry
serves it, else one made here with debootstrap (a minimal bookworm with python3), cached
as a rootfs tarball under the cache directory, keyed by everything it is made from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

OFFICIAL_BASE = "python:3.11-slim-bookworm"  # the Dockerfile's default ARG BASE
CACHE = Path(os.environ.get("SIDELINK_IMAGE_CACHE", "/var/tmp/sidelink-image-cache"))
MIRROR = os.environ.get("SIDELINK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get(
    "SIDELINK_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
SUITE = "bookworm"
# What the official slim image has besides python: CA certificates and /etc/services.
PACKAGES = ["python3", "ca-certificates", "netbase"]
# The machine's own extra CAs (a TLS-inspecting egress, a company CA): pip in the build
# stage must trust what the machine trusts. They go into the base's bundle, the Debian way.
HOST_CAS = Path("/usr/local/share/ca-certificates")

# Run in the rootfs after debootstrap: the sources the official images have, the
# security updates, dpkg told to skip docs, man pages and translations (as in the
# official slim images, also for what a build stage installs later), then no caches.
PREPARE = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
rm -f /etc/apt/sources.list
cat > /etc/apt/sources.list.d/debian.sources <<EOF
Types: deb
URIs: @MIRROR@
Suites: @SUITE@ @SUITE@-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: @SECURITY@
Suites: @SUITE@-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
cat > /etc/dpkg/dpkg.cfg.d/docker-slim <<EOF
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat > /etc/apt/apt.conf.d/docker-clean <<EOF
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
EOF
echo 'APT::Install-Recommends "false";' > /etc/apt/apt.conf.d/docker-no-recommends
apt-get update -qq
apt-get -y -qq -o Dpkg::Options::=--force-confold dist-upgrade >/dev/null
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  update-ca-certificates >/dev/null
fi
apt-get clean
find /usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
find /usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/lintian /var/lib/apt/lists/* \
  /var/cache/apt/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/* /tmp/* /root/.cache
: > /etc/resolv.conf
echo localhost > /etc/hostname
"""
RECIPE_VERSION = 1  # bump when the way the rootfs is made changes


class EngineError(RuntimeError):
    """dockerd could not be started (or a docker command failed)."""


def docker_tools() -> tuple[str, str] | None:
    """The paths of dockerd and a docker CLI, or None when either is missing."""
    dockerd = shutil.which("dockerd") or (
        "/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None
    )
    cli = shutil.which("docker")
    return (dockerd, cli) if dockerd and cli else None


class Engine:
    """dockerd of its own: started in the background, stopped and removed by stop()."""

    def __init__(self, dockerd: str, cli: str) -> None:
        self.dockerd, self.cli = dockerd, cli
        self.root = Path(tempfile.mkdtemp(prefix="sidelink-dockerd-", dir="/var/tmp"))
        self.socket = self.root / "docker.sock"
        self.log = self.root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.root / "cli"),  # no credentials or contexts of the machine
            "DOCKER_BUILDKIT": "0",  # the classic builder: any CLI, no buildx plugin needed
        }

    def start(self, timeout: float = 90.0) -> None:
        (self.root / "cli").mkdir()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.dockerd,
                    "--storage-driver=vfs",
                    "--iptables=false",
                    "--ip-masq=false",
                    "--bridge=none",
                    f"--data-root={self.root / 'data'}",
                    f"--exec-root={self.root / 'exec'}",
                    f"--pidfile={self.root / 'dockerd.pid'}",
                    f"--host=unix://{self.socket}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"dockerd exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                probe = self.run(
                    "version", "--format", "{{.Server.Version}}", check=False, timeout=10
                )
                if probe.returncode == 0:
                    return
            time.sleep(0.2)
        raise EngineError(f"dockerd not answering after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        stdin: int | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` against this engine; its output, or EngineError naming it."""
        result = subprocess.run(
            [self.cli, *args],
            env=self.env,
            stdin=stdin,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise EngineError(
                f"docker {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def stop(self) -> None:
        """Stop every container, then dockerd; unmount what it left; remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.run("ps", "-aq", check=False, timeout=30).stdout.split()
                if ids:
                    self.run("rm", "-f", *ids, check=False, timeout=60)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for mount in reversed(mounts_under(self.root)):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


def image_size(engine: Engine, ref: str) -> int:
    return int(engine.run("image", "inspect", "--format", "{{.Size}}", ref).stdout)


# -- the base image ---------------------------------------------------------------------


def base_image(engine: Engine, log: list[str]) -> str:
    """The base to build on: $SIDELINK_IMAGE_BASE if set ("debootstrap" forces that route),
    else the official slim image when it can be pulled, else one made with debootstrap."""
    wanted = os.environ.get("SIDELINK_IMAGE_BASE", "")
    if wanted and wanted != "debootstrap":
        engine.run("pull", wanted, timeout=300)
        return with_host_cas(engine, wanted, log)
    if not wanted:
        pulled = engine.run("pull", OFFICIAL_BASE, check=False, timeout=120)
        if pulled.returncode == 0:
            log.append(f"base: {OFFICIAL_BASE} (pulled)")
            return with_host_cas(engine, OFFICIAL_BASE, log)
        log.append(f"base: {OFFICIAL_BASE} cannot be pulled ({last_line(pulled.stderr)})")
    return debootstrap_base(engine, log)


def host_cas() -> list[Path]:
    return sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []


def with_host_cas(engine: Engine, base: str, log: list[str]) -> str:
    """The base plus the machine's extra CAs (if any), for pip in the build stage."""
    cas = host_cas()
    if not cas:
        return base
    with tempfile.TemporaryDirectory(prefix="sidelink-base-ca-") as context:
        (Path(context) / "cas").mkdir()
        for ca in cas:
            shutil.copy(ca, Path(context) / "cas" / ca.name)
        (Path(context) / "Dockerfile").write_text(
            f"FROM {base}\nCOPY cas/ /usr/local/share/ca-certificates/\n"
            "RUN update-ca-certificates\n"
        )
        tag = "sidelink-base:with-host-cas"
        engine.run("build", "--network", "host", "-t", tag, context, timeout=300)
    log.append(f"base: {base} + {len(cas)} CA(s) of this machine")
    return tag


def recipe_key() -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirror": MIRROR,
        "security": SECURITY_MIRROR,
        "packages": PACKAGES,
        "prepare": PREPARE,
        "cas": [hashlib.sha256(ca.read_bytes()).hexdigest() for ca in host_cas()],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def debootstrap_base(engine: Engine, log: list[str]) -> str:
    """A bookworm base with python3 from Debian packages, imported from a cached rootfs."""
    key = recipe_key()
    tag = f"sidelink-base:{SUITE}-{key}"
    tarball = CACHE / f"rootfs-{SUITE}-{key}.tar"
    if tarball.exists() and os.environ.get("SIDELINK_IMAGE_REFRESH") != "1":
        log.append(f"base: debootstrap rootfs from the cache ({tarball})")
    else:
        started = time.monotonic()
        make_rootfs(tarball)
        log.append(
            f"base: debootstrap rootfs made in {time.monotonic() - started:.0f}s ({tarball})"
        )
    engine.run(
        "import",
        "--change",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        "ENV LANG=C.UTF-8",
        "--change",
        'CMD ["python3"]',
        str(tarball),
        tag,
        timeout=300,
    )
    return tag


def make_rootfs(tarball: Path) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise EngineError("debootstrap is not installed (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    rootfs = work / "rootfs"
    try:
        sh(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(rootfs),
                MIRROR,
            ],
            timeout=900,
        )
        for ca in host_cas():
            shutil.copy(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
        shutil.copy("/etc/resolv.conf", rootfs / "etc/resolv.conf")  # for apt in the chroot
        script = (
            PREPARE.replace("@MIRROR@", MIRROR)
            .replace("@SECURITY@", SECURITY_MIRROR)
            .replace("@SUITE@", SUITE)
        )
        sh(["chroot", str(rootfs), "/bin/sh", "-c", script], timeout=900)
        partial = tarball.with_suffix(".partial")
        sh(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."],
            timeout=300,
        )
        partial.replace(tarball)
        for old in CACHE.glob(f"rootfs-{SUITE}-*.tar"):  # superseded recipes
            if old != tarball:
                old.unlink()
    finally:
        for mount in reversed(mounts_under(work)):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def sh(args: Sequence[str], timeout: float) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise EngineError(
            f"{' '.join(args[:3])}... exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
