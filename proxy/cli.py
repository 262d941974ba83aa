"""The ``sidelink`` command: argument parsing and the commands. The only place that exits."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import math
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import yaml

from proxy import __version__, build
from proxy.addr import is_ip, join_host_port, split_host_port
from proxy.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    LOG_FORMATS,
    LOG_LEVELS,
    ROUTES_ENV,
    ConfigError,
    ConfigSource,
    Overrides,
    format_duration,
    upstream_port,
    utf8_text,
    valid_service,
    valid_subdomain,
)
from proxy.inject import CONFIG_MOUNT_PATH, DEFAULT_IMAGE
from proxy.logs import configure_logging

# The commands import what they need (aiohttp, dnspython, the forwarders) themselves,
# so `check`, `inject` and `--version` start fast.

# Where `sidelink top` looks: a port-forward to the pod's admin port, or the pod itself.
DEFAULT_ADMIN = "127.0.0.1:9901"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# Allocations between collections of the young generation, while serving (see cmd_run).
YOUNG_COLLECTION = 5000

log = logging.getLogger("sidelink")
T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
    except ConfigError as e:
        if getattr(args, "log_format", None) == "json":
            # (run --log-format json: a log pipeline gets the lines that explain the exit
            # as JSON too, each problem its own object.)
            configure_logging("info", "json")
            for problem in e.problems:
                log.error("%s", problem)
        else:
            for problem in e.problems:
                print(problem, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # The reader left (`sidelink check | head`): no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    return code


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples keep their lines; options are listed as argparse does."""


def _command(
    sub: Any, name: str, summary: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.dedent(description).strip(),
        epilog=textwrap.dedent(epilog).strip(),
        formatter_class=_HelpFormatter,
    )
    return parser


_CONFIG_SOURCES = f"""\
    config: -c FILE, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH} if it exists;
            routes from the file plus --route (else ${ROUTES_ENV}, comma-separated)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidelink",
        description="A sidecar proxy for stable pod-to-service calls.",
        epilog="Run `sidelink COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument(
        "--version", action="version", version=f"sidelink {__version__} ({build()})"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = _command(
        sub,
        "run",
        "run the proxy until SIGTERM/SIGINT",
        """
        Run the proxy: listen on every route, forward to its service, serve the admin
        endpoints (/metrics /healthz /readyz /routes) until SIGTERM or SIGINT. SIGHUP, or a
        change of the config file, reloads the config.
        """,
        f"""
        {_CONFIG_SOURCES}
        exit:   0 clean shutdown, 2 config or usage error, 1 cannot start (a port taken)

        example:
          sidelink run --route 8081=app1-service.namespace-a:80/http --admin 127.0.0.1:9901
        """,
    )
    _config_arg(run)
    _route_arg(run)
    run.add_argument(
        "--admin",
        metavar="ADDR",
        help="admin listen address IP:PORT (default: admin.listen, 0.0.0.0:9901)",
    )
    run.add_argument("--log-level", choices=LOG_LEVELS, help="default: logging.level, info")
    run.add_argument("--log-format", choices=LOG_FORMATS, help="default: logging.format, text")
    run.set_defaults(handler=cmd_run)

    check = _command(
        sub,
        "check",
        "validate a config and print it normalised",
        """
        Validate the config exactly as `run` does, then print it normalised (every default
        filled in) as YAML. A ConfigMap manifest is read from its data."sidelink.yaml".
        """,
        f"""
        {_CONFIG_SOURCES}
        exit:   0 valid; 2 with every problem listed on stderr, one per line (file:line: key)

        example:
          sidelink check -c config/sidelink.yaml
        """,
    )
    _config_arg(check)
    _route_arg(check)
    check.set_defaults(handler=cmd_check)

    resolve = _command(
        sub,
        "resolve",
        "show how a name resolves",
        """
        Resolve NAME once as a route to it would: the hosts file, then DNS through the
        configured resolver (nameservers, search list, ndots), then Kubernetes'
        <SVC>_SERVICE_HOST variables. Prints the names tried, the one that answered, the
        addresses, the TTL and whether the Service is headless.
        """,
        f"""
        {_CONFIG_SOURCES}
        exit:   0 resolved (an answer from the environment counts, as it does for run);
                1 no answer; 2 a name or port the config would refuse

        example:
          sidelink resolve app1-service.namespace-a --port 80 --nameserver 10.96.0.10
        """,
    )
    resolve.add_argument("name", metavar="NAME", help="svc, svc.ns, svc.ns.svc..., or an IP")
    resolve.add_argument(
        "--port", default="80", help="1..65535, or a port name looked up by SRV (default: 80)"
    )
    resolve.add_argument(
        "--nameserver",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="ask this server instead of the configured ones; repeatable (default port 53)",
    )
    _config_arg(resolve)
    resolve.set_defaults(handler=cmd_resolve)

    inject = _command(
        sub,
        "inject",
        "add the sidelink sidecar to Kubernetes manifests",
        """
        Read Kubernetes YAML (several documents, kind: List too) and add a container named
        sidelink to every pod template: a native sidecar first in initContainers with
        restartPolicy: Always (--classic: a regular container). Documents go to stdout in
        the same order; what was done to each object goes to stderr. Running it twice
        changes nothing. Routes are checked as `run` checks them: a sidecar that could not
        start is refused.
        """,
        f"""
        routes: --route values go into ${ROUTES_ENV}; --config-map NAME mounts that
                ConfigMap (key sidelink.yaml) on {CONFIG_MOUNT_PATH}; one of them is required
        exit:   0 written; 2 bad input or routes the sidecar would refuse

        example:
          sidelink inject deploy/client-app.yaml --route 8081=app1-service.namespace-a:80/http \\
            | kubectl apply -f -
        """,
    )
    inject.add_argument("file", nargs="?", default="-", metavar="FILE|-", help="default: stdin")
    _route_arg(inject)
    inject.add_argument(
        "--config-map", type=_config_map, metavar="NAME", help="a ConfigMap holding sidelink.yaml"
    )
    inject.add_argument("--image", type=_image, metavar="IMAGE", help=f"default: {DEFAULT_IMAGE}")
    inject.add_argument(
        "--classic", action="store_true", help="a regular container (Kubernetes before 1.29)"
    )
    inject.set_defaults(handler=cmd_inject)

    webhook = _command(
        sub,
        "webhook",
        "the admission webhook that injects the sidecar into new pods",
        """
        Serve the mutating admission webhook over HTTPS: each pod CREATE the API server
        sends (AdmissionReview v1) is answered with a JSONPatch that does what `inject` does
        to a pod. POST /mutate injects pods not annotated sidelink.io/inject: disabled (the
        namespaces labelled sidelink.io/inject=enabled); POST /mutate/annotated only pods
        annotated sidelink.io/inject: enabled. A pod's routes come from its annotation
        sidelink.io/routes; a request it cannot read, or a pod it cannot inject, is allowed
        with a warning. GET /healthz. The certificate is reloaded when its files change
        and on SIGHUP; SIGTERM turns /healthz 503, serves --drain-delay more, then exits.
        See deploy/webhook/.
        """,
        """
        exit:   0 clean shutdown; 2 usage error or a certificate that cannot be loaded;
                1 cannot start (the address taken)

        example:
          sidelink webhook --cert /etc/sidelink-webhook/tls.crt --key /etc/sidelink-webhook/tls.key
        """,
    )
    webhook.add_argument("--cert", required=True, metavar="FILE", help="PEM certificate (chain)")
    webhook.add_argument("--key", required=True, metavar="FILE", help="PEM private key")
    webhook.add_argument(
        "--listen", metavar="ADDR", default="0.0.0.0:8443", help="IP:PORT (default: 0.0.0.0:8443)"
    )
    webhook.add_argument("--image", type=_image, metavar="IMAGE", help=f"default: {DEFAULT_IMAGE}")
    webhook.add_argument(
        "--config-map",
        type=_config_map,
        metavar="NAME",
        help="mount this ConfigMap (key sidelink.yaml, in the pod's namespace) in every sidecar",
    )
    webhook.add_argument(
        "--classic", action="store_true", help="a regular container (Kubernetes before 1.29)"
    )
    webhook.add_argument(
        "--drain-delay",
        type=_seconds_in(0, 300),
        default=3.0,
        metavar="S",
        help="seconds served after SIGTERM, while endpoints follow /healthz (default: 3)",
    )
    webhook.set_defaults(handler=cmd_webhook)

    top = _command(
        sub,
        "top",
        "a live view of a running sidelink",
        """
        Show a running sidelink live, read from its admin endpoints (/metrics, /routes):
        one row per route with requests per second (connections for tcp) and their
        success rate over the last interval, p50/p99 request duration from the histogram,
        endpoints by state, and where and how long ago the addresses were resolved.
        Ctrl-C ends it.
        """,
        """
        exit:   0; 1 when --once cannot reach the admin server

        example:
          kubectl port-forward pod/client-app-7d9c 9901 &  sidelink top --admin 127.0.0.1:9901
        """,
    )
    top.add_argument(
        "--admin", metavar="ADDR", default=DEFAULT_ADMIN, help=f"IP:PORT (default: {DEFAULT_ADMIN})"
    )
    top.add_argument(
        "--interval",
        type=_seconds_in(0.05, 3600),
        default=1.0,
        metavar="S",
        help="seconds per frame (default: 1)",
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(handler=cmd_top)

    demo = _command(
        sub,
        "demo",
        "a local cluster with rollouts, sidelink in front",
        """
        A self-contained local "cluster": an in-process DNS server, replica servers on
        127.0.0.x, sidelink in front, traffic flowing and rolling updates of the replicas,
        with live figures. Needs no root and no network.
        """,
        """
        example:
          sidelink demo --duration 10
        """,
    )
    demo.add_argument(
        "--duration",
        type=_seconds_in(0.05, 3600),
        default=20.0,
        metavar="S",
        help="seconds (default: 20)",
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def _config_map(text: str) -> str:
    if not valid_subdomain(text):
        raise argparse.ArgumentTypeError(
            f"must be a ConfigMap name (lowercase letters, digits, '-' and '.'), got {text!r}"
        )
    return text


def _image(text: str) -> str:
    if not text or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError(f"must be an image reference, got {text!r}")
    return text


def _seconds_in(low: float, high: float) -> Callable[[str], float]:
    """An argument type: a number of seconds, ``low`` to ``high``."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # (refused below, as nan and inf are)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low:g}..{high:g} seconds, got {text}")
        return value

    return seconds


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="config file (YAML)")


def _route_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="SPEC",
        help="[HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http]; repeatable (default port 80, tcp)",
    )


def settle_collector() -> None:
    """Set the garbage collector up for serving, once started."""
    # Everything loaded so far (modules, config) lives as long as the process: keep it
    # out of the collector's sight, so full collections stay short (tail latency).
    gc.collect()
    gc.freeze()
    # The forwarding path makes no reference cycles, so the young generation is
    # collected after 5,000 allocations rather than 700: 8% less CPU per HTTP/2 stream
    # at 100 streams a connection (benchmarks.inprocess_h2), for pauses of 0.2-0.3 ms
    # at most (they walk the young objects still alive: the streams in flight).
    gc.set_threshold(YOUNG_COLLECTION, 10, 10)


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.server import Server, StartupError

    source = ConfigSource.discover(
        args.config, args.route, Overrides(args.admin, args.log_level, args.log_format)
    )
    config = source.load()
    configure_logging(config.logging.level, config.logging.format)

    async def serve() -> int:
        server = Server(config, source)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, server.shutdown)
        loop.add_signal_handler(signal.SIGINT, server.shutdown)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.reload()))
        try:
            await server.start()
        except StartupError as e:
            log.error("cannot start: %s", e)
            return EXIT_FAILURE
        settle_collector()
        await server.serve_until_shutdown()
        log.info("sidelink stopped")
        return EXIT_OK

    return run_async(serve())


def cmd_check(args: argparse.Namespace) -> int:
    config = ConfigSource.discover(args.config, args.route).load()
    where = config.source or "no config file"
    if config.embedded:
        where += f" ({config.embedded})"
    print(f"# {where}: ok, {len(config.routes)} route(s)")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return EXIT_OK


def cmd_resolve(args: argparse.Namespace) -> int:
    from proxy.resolver import DnsError, Resolution, Resolver

    name, port = _resolve_target(args.name, args.port)
    config = ConfigSource.discover(args.config).load(require_routes=False)
    resolver_config = config.resolver
    if args.nameserver:
        servers = []
        for text in args.nameserver:
            try:
                servers.append(split_host_port(text, 53))
            except ValueError as e:
                raise ConfigError(
                    [f"--nameserver: must be IP or IP:PORT ({e}), got {text!r}"]
                ) from None
        resolver_config = dataclasses.replace(resolver_config, nameservers=tuple(servers))
    resolver = Resolver(resolver_config)
    servers_text = " ".join(join_host_port(h, p) for h, p in resolver.nameservers)
    _field("nameservers", servers_text or "(none)")
    _field("search", " ".join(s.to_text() for s in resolver.search) or "(none)")
    _field("ndots", str(resolver.ndots))
    _field("hosts file", resolver.hosts.path)

    async def lookup() -> Resolution | DnsError:
        try:
            return await resolver.lookup(name, port)
        except DnsError as e:
            return e

    res = run_async(lookup())
    if isinstance(res, DnsError):
        for tried in res.names_tried:
            _field("tried", tried)
        _field("error", f"{res} ({res.result})")
        env = resolver.env_endpoints(name, port)
        if not env:
            return EXIT_FAILURE
        # run serves these addresses while DNS has not answered, so the name does resolve.
        variable = name.split(".")[0].upper().replace("-", "_") + "_SERVICE_HOST"
        _field("answered", f"- (source: env, from ${variable})")
        for address in env:
            _field("address", join_host_port(*address))
        return EXIT_OK
    for tried in res.names_tried:
        _field("tried", tried)
    _field("answered", f"{res.answered_name or '-'} (source: {res.source})")
    for address in res.endpoints:
        _field("address", join_host_port(*address))
    if res.source == "dns":
        _field("ttl", f"{res.record_ttl}s (used: {format_duration(res.ttl)})")
    _field("headless", "yes" if res.headless else "no")
    return EXIT_OK


def _resolve_target(name: str, port_text: str) -> tuple[str, int | str]:
    """NAME and --port as a route's service and port: what the config refuses, resolve does."""
    problems = []
    if not valid_service(name):
        problems.append(
            "NAME: must be a DNS name (svc, svc.ns, svc.ns.svc.cluster.local) or an IP, "
            f"got {name!r}"
        )
    port: int | str = 80
    try:
        port = upstream_port(port_text)
    except ValueError as e:
        problems.append(f"--port: {e}, got {port_text!r}")
    if not problems and isinstance(port, str) and is_ip(name):
        problems.append(f"--port: a port name ({port}) needs a DNS name, not an IP")
    if problems:
        raise ConfigError(problems)
    return name, port


def _field(label: str, value: str) -> None:
    print(f"{label + ':':<12} {value}")


def cmd_inject(args: argparse.Namespace) -> int:
    from proxy.inject import InjectError, inject_objects

    source = "<stdin>" if args.file == "-" else args.file
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
        text = utf8_text(data, source)
    except OSError as e:
        print(f"{source}: cannot read: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        done = inject_objects(
            text,
            routes=args.route,
            config_map=args.config_map,
            image=args.image or DEFAULT_IMAGE,
            classic=args.classic,
            source=source,
        )
    except InjectError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(done.text)
    for line in done.report:
        print(line, file=sys.stderr)
    return EXIT_OK


def cmd_webhook(args: argparse.Namespace) -> int:
    from proxy.inject import SidecarOptions
    from proxy.webhook import CertificateError, Webhook

    try:
        host, port = split_host_port(args.listen)
    except ValueError as e:
        raise ConfigError([f"--listen: must be IP:PORT ({e}), got {args.listen!r}"]) from None
    options = SidecarOptions(
        config_map=args.config_map, image=args.image or DEFAULT_IMAGE, classic=args.classic
    )
    configure_logging("info", "text")

    async def serve() -> int:
        try:
            webhook = Webhook(options, args.cert, args.key, drain_delay=args.drain_delay)
        except CertificateError as e:
            raise ConfigError([str(e)]) from None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, webhook.shutdown)
        loop.add_signal_handler(signal.SIGINT, webhook.shutdown)
        loop.add_signal_handler(signal.SIGHUP, webhook.reload_certificate)
        try:
            await webhook.start(host, port)
        except OSError as e:
            log.error("cannot start: %s: %s", args.listen, e.strerror or e)
            return EXIT_FAILURE
        await webhook.serve_until_shutdown()
        log.info("webhook stopped")
        return EXIT_OK

    return run_async(serve())


def cmd_top(args: argparse.Namespace) -> int:
    from proxy.top import run_top

    try:
        split_host_port(args.admin)
    except ValueError as e:
        raise ConfigError([f"--admin: must be IP:PORT ({e}), got {args.admin!r}"]) from None
    return run_top(args.admin, once=args.once, interval=args.interval)


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    async def main() -> int:
        ended = asyncio.Event()  # Ctrl-C or SIGTERM: the demo stops early, with its summary
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, ended.set)
        loop.add_signal_handler(signal.SIGINT, ended.set)
        return await run_demo(args.duration, ended)

    return run_async(main())


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop

        new_event_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # uvloop is optional: the default loop works, slower
        new_event_loop = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)
