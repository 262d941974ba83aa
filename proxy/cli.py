"""The ``sidelink`` command: argument parsing and the commands. The only place that exits."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import yaml

from proxy import __version__, build
from proxy.addr import join_host_port
from proxy.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    ConfigSource,
    Overrides,
)
from proxy.logs import configure_logging

# The commands import what they need (aiohttp, dnspython, the forwarders) themselves,
# so `check`, `inject` and `--version` start fast.

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("sidelink")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidelink", description="A sidecar proxy for stable pod-to-service calls."
    )
    parser.add_argument(
        "--version", action="version", version=f"sidelink {__version__} ({build()})"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy until SIGTERM/SIGINT")
    _config_arg(run)
    _route_arg(run)
    run.add_argument("--admin", metavar="ADDR", help="admin listen address (IP:PORT)")
    run.add_argument("--log-level", choices=LOG_LEVELS)
    run.add_argument("--log-format", choices=LOG_FORMATS)
    run.set_defaults(handler=cmd_run)

    check = sub.add_parser("check", help="validate a config and print it normalised")
    _config_arg(check)
    _route_arg(check)
    check.set_defaults(handler=cmd_check)

    resolve = sub.add_parser("resolve", help="show how a name resolves")
    resolve.add_argument("name", metavar="NAME")
    resolve.add_argument("--port", default="80", help="port number, or a port name (SRV)")
    _config_arg(resolve)
    resolve.set_defaults(handler=cmd_resolve)

    inject = sub.add_parser("inject", help="add the sidelink sidecar to Kubernetes manifests")
    inject.add_argument("file", nargs="?", default="-", metavar="FILE|-")
    _route_arg(inject)
    inject.add_argument("--config-map", metavar="NAME")
    inject.add_argument("--image", metavar="IMAGE")
    inject.add_argument("--classic", action="store_true", help="a regular container")
    inject.set_defaults(handler=cmd_inject)

    demo = sub.add_parser("demo", help="a local cluster with rollouts, sidelink in front")
    demo.add_argument("--duration", type=float, default=20.0, metavar="S")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="config file (YAML)")


def _route_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="SPEC",
        help="[HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http]; repeatable",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.server import Server, StartupError

    source = ConfigSource.discover(
        args.config, args.route, Overrides(args.admin, args.log_level, args.log_format)
    )
    config = source.load()
    if not config.routes:
        raise ConfigError(["no routes: give -c FILE, --route SPEC or $SIDELINK_ROUTES"])
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
        # Everything loaded so far (modules, config) lives as long as the process: keep it
        # out of the collector's sight, so full collections stay short (tail latency).
        gc.collect()
        gc.freeze()
        await server.serve_until_shutdown()
        log.info("sidelink stopped")
        return EXIT_OK

    return run_async(serve())


def cmd_check(args: argparse.Namespace) -> int:
    config = ConfigSource.discover(args.config, args.route).load()
    print(f"# {config.source or 'no config file'}: ok, {len(config.routes)} route(s)")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return EXIT_OK


def cmd_resolve(args: argparse.Namespace) -> int:
    from proxy.resolver import DnsError, Resolver

    config = ConfigSource.discover(args.config).load()
    port: int | str = int(args.port) if args.port.isdigit() else args.port
    resolver = Resolver(config.resolver)
    print(f"resolver: {resolver!r}")

    async def lookup() -> int:
        try:
            res = await resolver.lookup(args.name, port)
        except DnsError as e:
            for name in e.names_tried:
                print(f"tried:    {name}")
            print(f"error:    {e} ({e.result})")
            env = resolver.env_endpoints(args.name, port)
            if env:
                print(
                    f"env:      {', '.join(join_host_port(*a) for a in env)} (from $*_SERVICE_HOST)"
                )
            return EXIT_FAILURE
        for name in res.names_tried:
            print(f"tried:    {name}")
        print(f"answered: {res.answered_name or '-'} (source: {res.source})")
        for address in res.endpoints:
            print(f"address:  {join_host_port(*address)}")
        print(f"ttl:      {res.record_ttl}s (used: {res.ttl:g}s)")
        print(f"headless: {'yes' if res.headless else 'no'}")
        return EXIT_OK

    return run_async(lookup())


def cmd_inject(args: argparse.Namespace) -> int:
    from proxy.inject import DEFAULT_IMAGE, InjectError, inject

    try:
        if args.file == "-":
            text, source = sys.stdin.read(), "<stdin>"
        else:
            with open(args.file, encoding="utf-8") as f:
                text, source = f.read(), args.file
    except OSError as e:
        print(f"{args.file}: cannot read: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = inject(
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
    sys.stdout.write(out)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_async(run_demo(args.duration))


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop

        new_event_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # uvloop is optional: the default loop works, slower
        new_event_loop = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)
