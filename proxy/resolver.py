"""Service discovery through /etc/hosts and DNS, kept off the request path.

Names are looked up as libc does with ``hosts: files dns``: the hosts file first (the
name as written, no search list), then DNS. A :class:`Watch` follows one (service, port)
pair: it expands a short name through the search list once, then queries the name that
answered directly; it refreshes ahead of the (clamped) TTL in the background, serves the
last good answer for ``stale_ttl`` while DNS fails, re-resolves early (at most once a
second) when the forwarders report a dead endpoint, and falls back to the
``<SVC>_SERVICE_HOST`` variables Kubernetes injects while DNS has never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from proxy.addr import Address, is_ip, join_host_port
from proxy.config import ResolverConfig
from proxy.metrics import Metrics

log = logging.getLogger("sidelink.resolver")


# Refresh when this fraction of the TTL has passed, so the next answer is in hand
# before the current one expires.
REFRESH_AT = 0.75
# A dead endpoint may trigger a re-resolution at most this often per name.
EARLY_REFRESH_INTERVAL = 1.0
# Retry delays after a failed lookup: doubling from the first to the cap.
RETRY_BACKOFF_FIRST = 0.25
RETRY_BACKOFF_MAX = 5.0
MAX_SRV_TARGETS = 64
# Rounds over the nameservers before a lookup gives up (resolv.conf's attempts:2).
ATTEMPTS = 2
# How far a failed name's CNAME chain is followed to tell a loop (as resolvers bound it).
MAX_CNAME_HOPS = 8
HOSTS_PATH = "/etc/hosts"
# The hosts file has no TTL: an answer from it is looked at again this often (clamped like a
# TTL), which costs a stat() while the file is unchanged.
HOSTS_TTL = 5.0
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class DnsError(Exception):
    """A lookup that gave no usable answer; ``result`` is its metric label."""

    def __init__(self, result: str, message: str, names_tried: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.result = result
        self.names_tried = names_tried


@dataclass(frozen=True, slots=True)
class Resolution:
    service: str
    names_tried: tuple[str, ...]
    answered_name: str | None
    endpoints: tuple[Address, ...]
    ttl: float  # clamped into [min_ttl, max_ttl]
    record_ttl: int  # as the server sent it
    source: str  # hosts | dns | env | static

    @property
    def headless(self) -> bool:
        """A ClusterIP Service answers with exactly one address; a headless one with one per pod."""
        return self.source == "dns" and len({a for a, _ in self.endpoints}) != 1


class Resolver:
    """The configured DNS client: nameservers, search list and ndots, and the watches."""

    def __init__(
        self,
        config: ResolverConfig,
        metrics: Metrics | None = None,
        environ: Mapping[str, str] = os.environ,
        hosts_path: str | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.environ = environ
        self.hosts = HostsFile(HOSTS_PATH if hosts_path is None else hosts_path)
        self._dns = dns.asyncresolver.Resolver(configure=False)
        self._dns.cache = None
        self._watches: dict[tuple[str, int | str], Watch] = {}
        self.configure(config)

    def configure(self, config: ResolverConfig) -> None:
        """Take ``config``: at the start, and when a reload changes it. The watches go on
        (their routes keep their connections), each looking its name up again at once: the
        search list may now expand it otherwise."""
        self.config = config
        system = _system_resolver()
        if config.nameservers:
            servers = list(config.nameservers)
        else:
            servers = [(str(ns), 53) for ns in (system.nameservers if system else [])]
        self.nameservers = tuple(servers)
        if config.search is not None:
            self.search = tuple(dns.name.from_text(s) for s in config.search)
        else:
            self.search = tuple(system.search) if system else ()
        ndots = config.ndots
        if ndots is None:
            ndots = system.ndots if system is not None and system.ndots is not None else 1
        self.ndots = ndots
        self._dns.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
        # As resolv.conf's timeout: each server's time to answer one try, the servers asked
        # in turn, ATTEMPTS rounds (a dead first server is passed over, a lost datagram is
        # sent again). Before, the whole lookup had one timeout, all of it spent on the
        # first server.
        self._dns.timeout = config.timeout
        self._dns.lifetime = config.timeout * max(1, len(servers)) * ATTEMPTS
        self.namespace = _own_namespace(self.environ, self.search)
        for watch in self._watches.values():
            watch.renew()

    def __repr__(self) -> str:
        servers = ", ".join(join_host_port(h, p) for h, p in self.nameservers)
        search = " ".join(s.to_text() for s in self.search)
        return f"<Resolver nameservers=[{servers}] search=[{search}] ndots={self.ndots}>"

    def candidates(self, service: str) -> list[str]:
        """The absolute names to try, in order, as a stub resolver would (resolv.conf(5))."""
        name = dns.name.from_text(service)
        if service.endswith("."):
            return [name.to_text()]
        relative = dns.name.from_text(service, origin=None)
        expanded = [relative.concatenate(domain).to_text() for domain in self.search]
        if len(relative.labels) - 1 >= self.ndots:
            return [name.to_text(), *expanded]
        return [*expanded, name.to_text()]

    async def lookup(
        self, service: str, port: int | str, answered_name: str | None = None
    ) -> Resolution:
        """Resolve once. Raises DnsError; counts the result in the service's metrics."""
        if is_ip(service):
            if isinstance(port, str):
                raise DnsError("error", f"a port name ({port}) needs a DNS name, not an IP")
            return Resolution(service, (), None, ((service, port),), 0.0, 0, "static")
        if isinstance(port, int):  # the hosts file has no SRV records: a port name asks DNS
            addresses = self.hosts.lookup(service)
            if addresses:
                name = service.rstrip(".")
                endpoints = tuple((a, port) for a in addresses)
                return Resolution(
                    service, (name,), name, endpoints, self.clamp(HOSTS_TTL), 0, "hosts"
                )
        stats = self.metrics.service(service)
        try:
            resolution = await self._lookup(service, port, answered_name)
        except DnsError as e:
            stats.lookups[e.result] += 1
            raise
        stats.lookups["ok"] += 1
        return resolution

    def watch(self, service: str, port: int | str) -> Watch:
        """The shared watch for (service, port), started on first use."""
        key = (service, port)
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = Watch(self, service, port)
            watch.start()
        watch.users += 1
        return watch

    def release(self, watch: Watch) -> None:
        watch.users -= 1
        if watch.users <= 0:
            self._watches.pop((watch.service, watch.port), None)
            watch.stop()

    def env_endpoints(self, service: str, port: int | str) -> tuple[Address, ...]:
        """What Kubernetes' ``<SVC>_SERVICE_HOST``/``_PORT`` variables say, if they are ours.

        Kubernetes only injects them for Services of the pod's own namespace, so a name
        that spells out another namespace never matches.
        """
        labels = service.lower().rstrip(".").split(".")
        if len(labels) > 1 and labels[1] != self.namespace:
            return ()
        if len(labels) > 2 and labels[2] != "svc":
            return ()
        prefix = labels[0].upper().replace("-", "_")
        host = self.environ.get(f"{prefix}_SERVICE_HOST", "")
        if not is_ip(host):
            return ()
        if isinstance(port, int):
            return ((host, port),)
        named = self.environ.get(f"{prefix}_SERVICE_PORT_{port.upper().replace('-', '_')}", "")
        return ((host, int(named)),) if named.isdigit() else ()

    def clamp(self, ttl: float) -> float:
        return min(max(ttl, self.config.min_ttl), self.config.max_ttl)

    async def _lookup(self, service: str, port: int | str, answered_name: str | None) -> Resolution:
        names = [answered_name] if answered_name else self.candidates(service)
        tried: list[str] = []
        nxdomain = 0
        for name in names:
            # (The names queried, as tried: a port name's SRV names, which dig would be given.)
            query = f"_{port}._tcp.{name}" if isinstance(port, str) else name
            tried.append(query)
            try:
                if isinstance(port, str):
                    found = await self._srv(query)
                else:
                    found = await self._addresses(name, port)
            except dns.resolver.NXDOMAIN:
                nxdomain += 1
                continue
            except dns.exception.Timeout as e:
                raise DnsError("timeout", f"{name}: timed out ({e})", tuple(tried)) from e
            except (dns.exception.DNSException, OSError) as e:
                why = _describe(e)
                if isinstance(e, dns.resolver.NoNameservers):
                    why = await self._cname_loop(name) or why
                raise DnsError("error", f"{name}: {why}", tuple(tried)) from e
            if found is None:
                continue
            endpoints, ttl = found
            return Resolution(
                service, tuple(tried), name, endpoints, self.clamp(ttl), int(ttl), "dns"
            )
        what = "NXDOMAIN" if nxdomain == len(tried) else "no addresses"
        raise DnsError("nxdomain", f"{', '.join(tried)}: {what}", tuple(tried))

    async def _cname_loop(self, name: str) -> str | None:
        """Why a name failed everywhere, when it is a CNAME chain that comes back on itself
        (resolvers answer that with SERVFAIL, as for any other failure)."""
        chain = [dns.name.from_text(name)]
        for _ in range(MAX_CNAME_HOPS):
            try:
                answer = await self._dns.resolve(
                    chain[-1], "CNAME", search=False, raise_on_no_answer=False
                )
            except dns.exception.DNSException:
                return None
            if not answer.rrset:
                return None
            target = answer.rrset[0].target
            if target in chain:
                return "CNAME loop: " + " -> ".join(n.to_text() for n in [*chain, target])
            chain.append(target)
        return f"CNAME chain longer than {MAX_CNAME_HOPS}"

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        return await self._dns.resolve(name, rdtype, search=False, raise_on_no_answer=False)

    async def _addresses(self, name: str, port: int) -> tuple[tuple[Address, ...], float] | None:
        """A records, else AAAA; None when the name exists but has neither."""
        for rdtype in ("A", "AAAA"):
            answer = await self._query(name, rdtype)
            if answer.rrset:
                addresses = sorted({rd.address for rd in answer.rrset})
                return tuple((a, port) for a in addresses), answer.chaining_result.minimum_ttl
        return None

    async def _srv(self, name: str) -> tuple[tuple[Address, ...], float] | None:
        answer = await self._query(name, "SRV")
        if not answer.rrset:
            return None
        ttl = float(answer.chaining_result.minimum_ttl)
        glue: dict[dns.name.Name, list[str]] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                glue.setdefault(rrset.name, []).extend(rd.address for rd in rrset)
                ttl = min(ttl, rrset.ttl)
        # The lowest priority with an address wins (RFC 2782; Kubernetes gives every record
        # the same one). A target on port 0 is no endpoint.
        for priority in sorted({rd.priority for rd in answer.rrset}):
            targets = sorted(
                {(rd.target, rd.port) for rd in answer.rrset if rd.priority == priority and rd.port}
            )
            endpoints: set[Address] = set()
            for target, port in targets[:MAX_SRV_TARGETS]:
                addresses = glue.get(target)
                if addresses is not None:
                    endpoints.update((a, port) for a in addresses)
                    continue
                try:
                    found = await self._addresses(target.to_text(), port)
                except dns.resolver.NXDOMAIN:
                    continue  # (a target gone: the others, or the next priority, serve)
                if found is not None:
                    endpoints.update(found[0])
                    ttl = min(ttl, found[1])
            if endpoints:
                return tuple(sorted(endpoints)), ttl
        return None


class Watch:
    """The live answer for one (service, port), kept fresh by a background task."""

    def __init__(self, resolver: Resolver, service: str, port: int | str) -> None:
        self.resolver = resolver
        self.service = service
        self.port = port
        self.users = 0
        self.endpoints: tuple[Address, ...] = ()
        self.source = "dns"
        self.answered_name: str | None = None
        self.last_resolved: float | None = None  # wall clock, for /routes
        self.last_error: str | None = None
        self.ttl = 0.0
        self._expires = 0.0  # monotonic: end of the current answer's TTL
        self._last_attempt = -EARLY_REFRESH_INTERVAL
        # An IP literal is not looked up: it gets no DNS series.
        self._stats = None if is_ip(service) else resolver.metrics.service(service)
        self._listeners: list[Callable[[tuple[Address, ...]], None]] = []
        self._resolved = asyncio.Event()
        self._looked_up = asyncio.Event()  # a lookup has ended, with addresses or not
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Watch {self.service}:{self.port} source={self.source} "
            f"endpoints={len(self.endpoints)} answered={self.answered_name}>"
        )

    @property
    def resolved(self) -> bool:
        """True once any source has given addresses (the route may then be ready)."""
        return self._resolved.is_set()

    @property
    def ttl_remaining(self) -> float | None:
        if self.source != "dns" or self.last_resolved is None:
            return None
        return max(0.0, self._expires - time.monotonic())

    def subscribe(self, listener: Callable[[tuple[Address, ...]], None]) -> None:
        self._listeners.append(listener)
        listener(self.endpoints)

    def unsubscribe(self, listener: Callable[[tuple[Address, ...]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def wait_resolved(self, timeout: float) -> bool:
        """Whether the name has addresses; at first, once its first lookup has ended
        (waiting ``timeout`` at most). A name whose lookups fail is not waited for."""
        if not self._resolved.is_set() and not self._looked_up.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._looked_up.wait(), timeout)
        return self._resolved.is_set()

    def nudge(self) -> None:
        """An endpoint failed: re-resolve soon (the loop enforces the rate limit)."""
        if self._task is not None:
            self._wake.set()

    def renew(self) -> None:
        """The resolver's settings changed: look the name up again now, from the search
        list on (the answer in hand serves meanwhile)."""
        self.answered_name = None
        self._last_attempt = -EARLY_REFRESH_INTERVAL
        self.nudge()

    def start(self) -> None:
        if is_ip(self.service) and isinstance(self.port, int):
            self.source = "static"
            self._set(((self.service, self.port),))
            return
        env = self.resolver.env_endpoints(self.service, self.port)
        if env:
            self.source = "env"
            self._set(env)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._stats is not None:
            self._stats.by_port.pop(self.port, None)

    async def _run(self) -> None:
        backoff = RETRY_BACKOFF_FIRST
        while True:
            self._last_attempt = time.monotonic()
            try:
                resolution = await self.resolver.lookup(self.service, self.port, self.answered_name)
            except DnsError as e:
                self.last_error = str(e)
                log.warning("dns lookup for %s failed: %s", self.service, e)
                if e.result == "nxdomain":
                    # The name that answered is gone: expand the search list again next time.
                    self.answered_name = None
                delay = backoff
                backoff = min(backoff * 2, RETRY_BACKOFF_MAX)
                if self.source in ("dns", "hosts") and self.endpoints:
                    stale_ttl = self.resolver.config.stale_ttl  # (a reload may change it)
                    stale_left = self._expires + stale_ttl - time.monotonic()
                    if stale_left <= 0:
                        log.warning("dropping stale endpoints of %s", self.service)
                        self._set(())
                    else:
                        delay = min(delay, stale_left)
            except Exception:
                log.exception("unexpected error resolving %s", self.service)
                delay = RETRY_BACKOFF_MAX
            else:
                backoff = RETRY_BACKOFF_FIRST
                self.source = resolution.source
                # A hosts answer names no DNS name to query directly next time.
                self.answered_name = (
                    resolution.answered_name if resolution.source == "dns" else None
                )
                self.last_resolved = time.time()
                self.last_error = None
                self.ttl = resolution.ttl
                self._expires = time.monotonic() + resolution.ttl
                self._set(resolution.endpoints)
                delay = resolution.ttl * REFRESH_AT
            self._looked_up.set()
            await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        """Sleep until the delay ends or a nudge comes; nudges re-query at most once a second.

        Only nudges are rate-limited: the scheduled refresh must stay ahead of a short
        TTL (0.75 s for 1 s), and failed lookups follow their own backoff.
        """
        deadline = time.monotonic() + delay
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            # The lookup about to run also serves a nudge that came with the timeout.
            self._wake.clear()
            return
        wait = min(self._last_attempt + EARLY_REFRESH_INTERVAL, deadline) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        # Nudges that came during the wait are served by the same lookup.
        self._wake.clear()

    def _set(self, endpoints: tuple[Address, ...]) -> None:
        if endpoints:
            self._resolved.set()
        stats = self._stats
        if stats is not None:
            stats.by_port[self.port] = len(endpoints)
        if endpoints == self.endpoints:
            return
        if self.endpoints and stats is not None:
            stats.changes += 1
        log.info(
            "%s now resolves to %s",
            self.service,
            ", ".join(join_host_port(*a) for a in endpoints) or "nothing",
        )
        self.endpoints = endpoints
        for listener in list(self._listeners):
            try:
                listener(endpoints)
            except Exception:  # one broken subscriber must not stop DNS refreshes
                log.exception("endpoint update for %s failed", self.service)


class HostsFile:
    """The addresses /etc/hosts gives a name, read again only when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._names: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"<HostsFile {self.path} names={len(self._names)}>"

    def lookup(self, name: str) -> tuple[str, ...]:
        """IPv4 addresses if the name has any, else IPv6 ones (as A, then AAAA, in DNS)."""
        self._refresh()
        found = self._names.get(name.lower().rstrip("."), ())
        v4 = tuple(a for a in found if ":" not in a)
        return v4 or found

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._signature, self._names = None, {}
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return
        try:
            text = Path(self.path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        self._signature, self._names = signature, parse_hosts(text)


def parse_hosts(text: str) -> dict[str, tuple[str, ...]]:
    """hosts(5): an address, then its names; ``#`` starts a comment; bad lines are skipped."""
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        address = fields[0].split("%", 1)[0]  # fe80::1%eth0: the zone is not ours to use
        if not is_ip(address):
            continue
        for name in fields[1:]:
            listed = names.setdefault(name.lower().rstrip("."), [])
            if address not in listed:
                listed.append(address)
    return {name: tuple(addresses) for name, addresses in names.items()}


def _system_resolver() -> dns.resolver.Resolver | None:
    try:
        return dns.resolver.Resolver(configure=True)
    except (dns.resolver.NoResolverConfiguration, OSError):
        return None


def _own_namespace(environ: Mapping[str, str], search: Iterable[dns.name.Name]) -> str | None:
    """The pod's namespace: $POD_NAMESPACE, the service account's file, or the search list."""
    if environ.get("POD_NAMESPACE"):
        return environ["POD_NAMESPACE"]
    with contextlib.suppress(OSError):
        return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or None
    for domain in search:
        labels = [label.decode() for label in domain.labels if label]
        if len(labels) >= 3 and labels[1] == "svc":
            return labels[0]
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, dns.resolver.NoNameservers):
        return "every nameserver failed (SERVFAIL, REFUSED or unreachable)"
    return str(e) or type(e).__name__
