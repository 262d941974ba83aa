"""The one typed, frozen configuration object, and how it is loaded and validated.

Every default lives here, and each key is declared once, on the dataclass field it
fills ("how a key is declared" below). Loading never stops at the first problem: all of
them are collected, each naming the file, the line and the key, and raised together as
one :class:`ConfigError`. Only ``cli.py`` turns that into an exit code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import yaml

from proxy.addr import is_ip, is_loopback, join_host_port, split_host_port

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")
_DEFAULT_PORT: int | str = 80  # typed so, as a port may be a name

DEFAULT_CONFIG_PATH = "/etc/sidelink/sidelink.yaml"
CONFIG_ENV = "SIDELINK_CONFIG"
ROUTES_ENV = "SIDELINK_ROUTES"
# The key a ConfigMap holds the config under: mounted on /etc/sidelink, it is the default path.
CONFIG_MAP_KEY = DEFAULT_CONFIG_PATH.rsplit("/", 1)[1]
# A config is a few kilobytes; a file far past that is a mistake (or a log), not read whole.
MAX_CONFIG_BYTES = 1 << 20

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
BALANCERS = ("p2c", "ewma", "round_robin")
UPSTREAM_PROTOCOLS = ("auto", "http1", "http2")

PROTOCOLS = ("http", "tcp")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_MAX_DURATION = 100 * 365 * 86400.0
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Kubernetes' IANA_SVC_NAME: 1-15 of [a-z0-9-], a letter somewhere, no "--", no hyphen at the ends.
_PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
_QUICK_ROUTE = re.compile(
    r"^(?:(?P<host>\[[^\]]+\]|[^:=\[\]]+):)?(?P<listen>\d+)="
    r"(?P<service>[^:/=]+)(?::(?P<port>[^/=]+))?(?:/(?P<protocol>[a-z]+))?$"
)


class ConfigError(Exception):
    """Every problem found in a configuration, one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def parse_duration(value: object) -> float:
    """``250ms``, ``1.5s``, ``5m``, ``1h`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like 250ms, 1.5s, 5m, 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        seconds: float | int = value
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError("must be a duration like 250ms, 1.5s, 5m, 1h")
    # .inf, .nan and numbers past a float's range would poison every timer they reach.
    # (``not <=`` also catches nan; comparing a huge int with a float cannot overflow.)
    if not seconds <= _MAX_DURATION:
        raise ValueError("must be a finite duration (at most 100 years)")
    return float(seconds)


def format_duration(seconds: float) -> str:
    """The shortest readable form that parse_duration reads back to exactly ``seconds``."""
    if seconds == 0:
        return "0s"
    candidates = [
        f"{int(seconds / size)}{unit}"
        for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0))
        if seconds >= size and (seconds / size).is_integer()
    ]
    if seconds < 1:
        candidates.append(f"{_plain(seconds * 1000)}ms")
    for text in candidates:
        if parse_duration(text) == seconds:
            return text
    return f"{_plain(seconds)}s"


def _plain(number: float) -> str:
    """A float's shortest round-tripping digits, never in exponent notation (1e-05).
    (By hand, not with decimal: that module is 0.4 MiB of every sidelink's memory.)"""
    text = repr(float(number))
    mantissa, _, exponent = text.partition("e")
    if exponent:
        sign = "-" if mantissa[0] == "-" else ""
        whole, _, fraction = mantissa.lstrip("-").partition(".")
        digits = whole + fraction
        point = len(whole) + int(exponent)  # where the point goes among the digits
        if point <= 0:
            text = f"{sign}0.{'0' * -point}{digits}"
        elif point >= len(digits):
            text = sign + digits + "0" * (point - len(digits))
        else:
            text = f"{sign}{digits[:point]}.{digits[point:]}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def valid_service(name: str) -> bool:
    """A DNS name (``svc``, ``svc.ns``, ``svc.ns.svc.cluster.local.``) or an IP literal."""
    return is_ip(name) or valid_subdomain(name.lower().removesuffix("."))


def valid_subdomain(name: str) -> bool:
    """A DNS subdomain name (RFC 1123), as Kubernetes names most objects: lowercase."""
    return len(name) <= 253 and all(_DNS_LABEL.match(label) for label in name.split("."))


# --- converters: each takes the YAML value and returns the typed one or raises ValueError ---


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _int_range(lo: int, hi: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer {lo}..{hi}")
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo}..{hi}")
        return value

    return convert


def _optional(convert: Callable[[object], T]) -> Callable[[object], T | None]:
    return lambda value: None if value is None else convert(value)


def _choice(options: Sequence[str]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in options:
            raise ValueError(f"must be one of {' | '.join(options)}")
        return str(value)

    return convert


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


# A route's name is a metric label and a log field: printable, no space (the text log is
# key=value), and no longer than a DNS name. (Only a name written out is checked: the
# default, the service or service:port, is always printable.)
MAX_NAME: Final = 253


def _name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    if len(value) > MAX_NAME or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"must be 1..{MAX_NAME} printable characters, no space")
    return value


def _service(value: object) -> str:
    if not isinstance(value, str) or not valid_service(value):
        raise ValueError("must be a DNS name (svc, svc.ns, svc.ns.svc.cluster.local) or an IP")
    return value


def upstream_port(value: object) -> int | str:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            raise ValueError("must be 1..65535 or a port name")
        return value
    if isinstance(value, str) and _PORT_NAME.match(value):
        return value
    raise ValueError("must be 1..65535 or a port name")


def _listen_address(value: object) -> tuple[str, int]:
    """A bare port (bound on 127.0.0.1) or HOST:PORT with an IP host."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "127.0.0.1", _int_range(0, 65535)(value)
    if isinstance(value, str):
        if value.isdigit():
            return "127.0.0.1", _int_range(0, 65535)(int(value))
        text = value.replace("localhost:", "127.0.0.1:", 1)
        try:
            return split_host_port(text)
        except ValueError as e:
            raise ValueError(f"must be PORT or IP:PORT ({e})") from None
    raise ValueError("must be PORT or IP:PORT")


def _nameservers(value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of "IP" or "IP:PORT"')
    out, bad = [], []
    for item in value:
        try:
            out.append(split_host_port(str(item), 53))
        except ValueError as e:
            bad.append(f"{item!r}: {e}")
    if bad:  # every one named, so that one run of check shows them all
        raise ValueError(f'must be a list of "IP" or "IP:PORT" ({"; ".join(bad)})')
    return tuple(out)


def _search_list(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(s, str) and valid_service(s) for s in value
    ):
        raise ValueError("must be a list of domain names, or null")
    return tuple(value)


def _host_setting(value: object) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in " \t\r\n"):
        raise ValueError("must be auto, preserve, or a host name")
    return value


# --- how a key is declared ---------------------------------------------------------------
#
# Each key of the file is declared once, on the dataclass field it fills: its default, the
# converter that checks the YAML value, and how ``sidelink check`` shows it. The reader, the
# "expected one of" lists and Config.to_dict all walk dataclasses.fields(), so a new key is
# one line in its section (a new section: its class, and one line in its owner).

_KEY = "sidelink.key"  # the field metadata entry holding how a key is read and shown


@dataclass(frozen=True, slots=True)
class _Value:
    """A key whose YAML value the converter turns into the field's value.

    ``also`` names further fields the one value fills: ``listen: "IP:PORT"`` is declared
    on the host field and fills the port field too; convert then returns one value per field.
    """

    convert: Callable[[Any], Any]
    show: Callable[..., object]
    name: str = ""  # the key as written, when it is not the field's name
    also: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Section:
    """A key holding a mapping of its own keys, read into the field's default_factory class."""

    inline: bool = False  # its keys are written beside the owner's own (a route's settings)


@dataclass(frozen=True, slots=True)
class _List:
    """A key holding a list of mappings; its owner reads it, as items start from other keys."""


@dataclass(frozen=True, slots=True)
class _Key:
    """One key of a section, resolved from its field: as written, and the fields it fills."""

    name: str
    fields: tuple[str, ...]
    kind: _Value | _Section | _List
    cls: type[Any] | None = None  # the class a section is read into


def _same(value: T) -> T:
    return value


def setting(default: T, convert: Callable[[Any], T], show: Callable[[T], object] = _same) -> T:
    """A key of its section: ``default`` when it is not written, else ``convert(value)``."""
    return field(default=default, metadata={_KEY: _Value(convert, show)})


def duration(default: float, *, zero: bool = False) -> float:
    """A duration key, shown by format_duration; 0 is accepted only where ``zero`` says so."""
    return setting(default, parse_duration if zero else _positive_duration, format_duration)


# The metadata of a field holding a nested section, ``field(default_factory=Cls, metadata=...)``.
_SECTION: Final = {_KEY: _Section()}
_INLINE: Final = {_KEY: _Section(inline=True)}  # its keys are written beside the owner's own
_LIST: Final = {_KEY: _List()}


def _listen(host: str, port_field: str) -> str:
    """The ``listen`` key, PORT or IP:PORT: declared on the host field, it fills ``port_field``."""
    spec = _Value(_listen_address, join_host_port, "listen", (port_field,))
    return field(default=host, metadata={_KEY: spec})


def _keys(cls: type[Any]) -> tuple[_Key, ...]:
    """The keys of a section class, in field order; fields without one are filled otherwise."""
    keys = []
    for f in dataclasses.fields(cls):
        kind = f.metadata.get(_KEY)
        if isinstance(kind, _Value):
            keys.append(_Key(kind.name or f.name, (f.name, *kind.also), kind))
        elif kind is not None:
            factory = f.default_factory
            keys.append(
                _Key(f.name, (f.name,), kind, factory if isinstance(factory, type) else None)
            )
    return tuple(keys)


def _names(cls: type[Any]) -> tuple[str, ...]:
    """The keys a mapping of ``cls`` accepts, an inline section's keys in its place."""
    names: list[str] = []
    for key in _keys(cls):
        if isinstance(key.kind, _Section) and key.kind.inline and key.cls is not None:
            names += _names(key.cls)
        else:
            names.append(key.name)
    return tuple(names)


def _shown(obj: object) -> dict[str, Any]:
    """``obj``'s keys in the file's own shape, normalised (durations as format_duration)."""
    out: dict[str, Any] = {}
    for key in _keys(type(obj)):
        value = getattr(obj, key.fields[0])
        if isinstance(key.kind, _Section):
            if key.kind.inline:
                out.update(_shown(value))
            else:
                out[key.name] = _shown(value)
        elif isinstance(key.kind, _List):
            out[key.name] = [_shown(item) for item in value]
        else:
            out[key.name] = key.kind.show(*(getattr(obj, f) for f in key.fields))
    return out


# --- the config ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_idle: int = setting(64, _int_range(0, 100_000))
    idle_timeout: float = duration(60.0)
    max_lifetime: float = duration(300.0)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive health: when an endpoint is ejected, and for how long."""

    # (low, high): durations the first of which must not exceed the second.
    ORDERED: ClassVar[tuple[str, str]] = ("base_ejection", "max_ejection")

    consecutive_failures: int = setting(5, _int_range(1, 1000))
    base_ejection: float = duration(1.0)
    max_ejection: float = duration(30.0)
    max_ejected_percent: int = setting(50, _int_range(0, 100))


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    """How many retries may be added to a route's requests."""

    percent: int = setting(20, _int_range(0, 1000))
    min_per_second: int = setting(10, _int_range(0, 100_000))


@dataclass(frozen=True, slots=True)
class Http2Config:
    """HTTP/2 limits: streams a client may open at once, streams put on one upstream connection."""

    max_concurrent_streams: int = setting(256, _int_range(1, 100_000))
    max_streams_per_connection: int = setting(100, _int_range(1, 100_000))


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """The keys of ``defaults:``, which every route may override."""

    connect_timeout: float = duration(2.0)
    request_timeout: float = duration(30.0)
    idle_timeout: float = duration(300.0)
    head_timeout: float = duration(10.0)
    retries: int = setting(2, _int_range(0, 10))
    balance: str = setting("p2c", _choice(BALANCERS))
    outlier: OutlierConfig = field(default_factory=OutlierConfig, metadata=_SECTION)
    retry_budget: RetryBudgetConfig = field(default_factory=RetryBudgetConfig, metadata=_SECTION)
    slow_start: float = duration(0.0, zero=True)
    host: str = setting("auto", _host_setting)
    pool: PoolConfig = field(default_factory=PoolConfig, metadata=_SECTION)
    upstream_protocol: str = setting("auto", _choice(UPSTREAM_PROTOCOLS))
    http2: Http2Config = field(default_factory=Http2Config, metadata=_SECTION)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    # A file must write listen and service (the reader checks); these defaults are what a
    # route missing them is read as, so that its other problems are still found.
    name: str = setting("", _name)  # "" until parse() names it after its service
    listen_host: str = _listen("127.0.0.1", "listen_port")
    listen_port: int = 0
    service: str = setting("", _service)
    port: int | str = setting(_DEFAULT_PORT, upstream_port)
    protocol: str = setting("tcp", _choice(PROTOCOLS))
    expose: bool = setting(False, _boolean)
    settings: RouteSettings = field(default_factory=RouteSettings, metadata=_INLINE)
    # Given as a quick route (--route, $SIDELINK_ROUTES), not in the file: only naming reads it.
    quick: bool = field(default=False, compare=False)

    @property
    def listen(self) -> str:
        return join_host_port(self.listen_host, self.listen_port)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = _listen("0.0.0.0", "port")
    port: int = 9901

    @property
    def listen(self) -> str:
        return join_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    ORDERED: ClassVar[tuple[str, str]] = ("min_ttl", "max_ttl")  # (as OutlierConfig's)

    nameservers: tuple[tuple[str, int], ...] = setting(
        (), _nameservers, lambda ns: [join_host_port(h, p) for h, p in ns]
    )
    search: tuple[str, ...] | None = setting(
        None, _search_list, lambda s: None if s is None else list(s)
    )
    ndots: int | None = setting(None, _optional(_int_range(0, 15)))
    timeout: float = duration(2.0)
    min_ttl: float = duration(1.0, zero=True)
    max_ttl: float = duration(60.0)
    stale_ttl: float = duration(300.0, zero=True)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = setting("info", _choice(LOG_LEVELS))
    format: str = setting("text", _choice(LOG_FORMATS))
    access_log: bool = setting(False, _boolean)


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    drain_delay: float = duration(5.0, zero=True)
    drain_timeout: float = duration(30.0, zero=True)


@dataclass(frozen=True, slots=True)
class Config:
    admin: AdminConfig = field(default_factory=AdminConfig, metadata=_SECTION)
    resolver: ResolverConfig = field(default_factory=ResolverConfig, metadata=_SECTION)
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=_SECTION)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig, metadata=_SECTION)
    defaults: RouteSettings = field(default_factory=RouteSettings, metadata=_SECTION)
    routes: tuple[RouteConfig, ...] = field(default=(), metadata=_LIST)
    source: str | None = None  # the file read, if any
    # Where in the file the config sat, when the file is a ConfigMap manifest.
    embedded: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The normalised config, in the file's own shape (what ``sidelink check`` prints)."""
        return _shown(self)


@dataclass(frozen=True, slots=True)
class Overrides:
    """What the command line says over the file."""

    admin: str | None = None
    log_level: str | None = None
    log_format: str | None = None


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where a config comes from, kept so that a reload reads the same places again."""

    path: str | None
    quick_routes: tuple[str, ...] = ()
    quick_origin: str = "--route"
    overrides: Overrides = Overrides()

    @classmethod
    def discover(
        cls,
        path: str | None,
        quick_routes: Sequence[str] = (),
        overrides: Overrides = Overrides(),
        environ: Mapping[str, str] = os.environ,
    ) -> ConfigSource:
        """Apply the documented precedence: -c, $SIDELINK_CONFIG, the default path."""
        if path is None:
            path = environ.get(CONFIG_ENV) or None
        if path is None and Path(DEFAULT_CONFIG_PATH).exists():
            path = DEFAULT_CONFIG_PATH
        origin = "--route"
        routes = tuple(quick_routes)
        if not routes and environ.get(ROUTES_ENV, "").strip():
            routes = tuple(s for s in environ[ROUTES_ENV].split(",") if s.strip())
            origin = "$" + ROUTES_ENV
        return cls(path, routes, origin, overrides)

    def load(self, *, require_routes: bool = True) -> Config:
        """Read and validate the config; with ``require_routes``, one without routes is refused.

        ``run`` and ``check`` (and a reload) all come through here, so they accept exactly the
        same configs; ``resolve`` needs only the resolver section and passes False.
        """
        text = None
        if self.path is not None:
            text = _read_config_file(self.path)
        config = parse(
            text, self.path or "<none>", self.quick_routes, self.quick_origin, self.overrides
        )
        if require_routes and not config.routes:
            raise ConfigError([self.no_routes()])
        return config

    def no_routes(self) -> str:
        """Why there are no routes, naming what was looked at."""
        env = "$" + ROUTES_ENV
        if self.path is not None:
            return (
                f"{self.path}: no routes: the file has no routes: list, and no --route SPEC "
                f"or {env} adds one"
            )
        return (
            f"no routes: no config file (none given with -c FILE or ${CONFIG_ENV}, and "
            f"{DEFAULT_CONFIG_PATH} does not exist), and no --route SPEC or {env}"
        )


def _read_config_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"{path}: too large: a config file may hold at most {MAX_CONFIG_BYTES} bytes (1 MiB)"]
        )
    return utf8_text(data, str(path))


def utf8_text(data: bytes, source: str) -> str:
    """``data`` as text; else a ConfigError naming the line of the first byte not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{source}:{line}: cannot read: not UTF-8 text ({e.reason})"]) from e


def text_start(node: yaml.ScalarNode) -> int:
    """The 0-based line where a string value's text begins: a block scalar (``|``) on the
    line after its indicator, any other where it stands."""
    return int(node.start_mark.line) + (1 if node.style in ("|", ">") else 0)


def unacceptable(text: str, e: yaml.reader.ReaderError) -> tuple[int, str]:
    """The line of a character YAML refuses in ``text`` (a control character, say), and
    what it is: one line, where PyYAML says it in two and by offset."""
    line = text.count("\n", 0, e.position) + 1
    character = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
    return line, f"unacceptable character {character}: {e.reason}"


def parse(
    text: str | None,
    filename: str = "<string>",
    quick_routes: Sequence[str] = (),
    quick_origin: str = "--route",
    overrides: Overrides = Overrides(),
) -> Config:
    """Build a Config from YAML text plus quick routes; raise ConfigError listing every problem.

    ``text`` may also be a ConfigMap manifest (one document or several): the config is then
    read from its ``data`` key ``sidelink.yaml``, and problems name the manifest's lines.
    """
    reader = _Reader(Path(filename).name if filename.startswith("/") else filename)
    try:
        return _parse(
            reader,
            text,
            filename=filename,
            quick_routes=quick_routes,
            quick_origin=quick_origin,
            overrides=overrides,
        )
    except RecursionError:
        # PyYAML composes and constructs recursively: [[[[...]]]] a few thousand deep ends here.
        raise ConfigError([f"{reader.filename}: invalid YAML: nested too deeply"]) from None


def _parse(
    reader: _Reader,
    text: str | None,
    *,
    filename: str,
    quick_routes: Sequence[str],
    quick_origin: str,
    overrides: Overrides,
) -> Config:
    root: yaml.Node | None = None
    embedded = None
    if text is not None:
        root = _compose(reader, text)
        found = _config_map(reader, text, root)
        if found is not None:
            embedded, config_text, reader.line_offset = found
            root = _compose(reader, config_text)
    config = reader.config(root)
    routes = list(config.routes)
    for i, spec in enumerate(quick_routes):
        route = reader.quick_route(spec, f"{quick_origin}[{i}]", config.defaults)
        if route is not None:
            routes.append(route)
    config = _apply_overrides(reader, config, overrides)
    config = dataclasses.replace(
        config,
        routes=tuple(_name_routes(routes)),
        source=None if text is None else filename,
        embedded=embedded,
    )
    reader.check_listeners(config)
    if reader.problems:
        raise ConfigError(sorted(reader.problems, key=_line_of))
    return config


def _compose(reader: _Reader, text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as e:
        line, what = unacceptable(text, e)
        raise ConfigError([f"{reader.filename}:{line + reader.line_offset}: {what}"]) from e
    except yaml.composer.ComposerError as e:
        if e.context and e.context.startswith("expected a single document"):
            # Several documents: _config_map looks for a ConfigMap among them, else this is it.
            reader.several_documents = _yaml_problem(reader, e)
            return None
        raise ConfigError([_yaml_problem(reader, e)]) from e
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(reader, e)]) from e


def _yaml_problem(reader: _Reader, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 + reader.line_offset if mark is not None else 1
    problem = getattr(e, "problem", None) or str(e)
    if context := getattr(e, "context", None):  # "while parsing a flow sequence"
        problem = f"{context}{',' if problem.startswith('but') else ':'} {problem}"
    return f"{reader.filename}:{line}: invalid YAML: {problem}"


def _config_map(reader: _Reader, text: str, root: yaml.Node | None) -> tuple[str, str, int] | None:
    """(where, the config text, its line offset) when the file is a ConfigMap manifest.

    None for a plain config. A manifest without the key is an error saying what it holds.
    """
    documents = [root] if root is not None else list(yaml.compose_all(text, yaml.SafeLoader))
    maps = [d for d in documents if d is not None and _kind(d) == "ConfigMap"]
    if not maps:
        if reader.several_documents is not None:
            raise ConfigError([reader.several_documents])
        return None
    seen = []
    for node in maps:
        name = _scalar(_child(_child(node, "metadata"), "name")) or "(unnamed)"
        data = _child(node, "data")
        value = _child(data, CONFIG_MAP_KEY)
        if isinstance(value, yaml.ScalarNode):
            offset = text_start(value)
            return f"ConfigMap {name}, data.{CONFIG_MAP_KEY}", str(value.value), offset
        keys = [str(k.value) for k, _ in data.value] if isinstance(data, yaml.MappingNode) else []
        seen.append(f"ConfigMap {name} has data keys: {', '.join(keys) or '(none)'}")
    raise ConfigError(
        [
            f"{reader.filename}:{maps[0].start_mark.line + 1}: a ConfigMap manifest without "
            f"data.{CONFIG_MAP_KEY}, the key the sidecar reads ({DEFAULT_CONFIG_PATH}); "
            + "; ".join(seen)
        ]
    )


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key and isinstance(v, yaml.Node):
            return v
    return None


def _scalar(node: yaml.Node | None) -> str | None:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else None


def _kind(node: yaml.Node) -> str | None:
    return _scalar(_child(node, "kind"))


# --- the reader ------------------------------------------------------------------------


class _Reader:
    """Walks the YAML node tree, so every value keeps its line number for messages."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.line_offset = 0  # the config's first line in the file (a ConfigMap's data)
        self.several_documents: str | None = None  # the problem, unless one is a ConfigMap
        self.problems: list[str] = []
        # Where each accepted route came from, in order, for problems found across routes.
        self.route_origins: list[_Origin] = []
        # The keys written in each mapping read, by path, for checks across keys.
        self.written: dict[str, dict[str, yaml.Node]] = {}
        self._constructor = yaml.SafeLoader("")

    def at(self, node: yaml.Node | None) -> str:
        """The ``file:line: `` prefix of a problem about ``node``."""
        return "" if node is None else f"{self.filename}:{self.line(node)}: "

    def line(self, node: yaml.Node) -> int:
        return int(node.start_mark.line) + 1 + self.line_offset

    def problem(self, node: yaml.Node | None, path: str, message: str) -> None:
        where = self.filename if node is None else f"{self.filename}:{self.line(node)}"
        self.problems.append(f"{where}: {path}: {message}")

    def value(self, node: yaml.Node) -> Any:
        """The Python value of a node; ValueError for one YAML cannot build (``!!int abc``)."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ArithmeticError, LookupError, TypeError, ValueError) as e:
            # A failed construction leaves the node marked as in progress: start afresh.
            self._constructor = yaml.SafeLoader("")
            problem = e.problem if isinstance(e, yaml.MarkedYAMLError) else str(e)
            raise ValueError(f"invalid YAML value: {problem}") from None

    def mapping(
        self, node: yaml.Node | None, path: str, keys: Sequence[str]
    ) -> dict[str, yaml.Node]:
        """The keys of a mapping node; unknown or repeated keys are problems."""
        out: dict[str, yaml.Node] = {}
        self.written[path] = out
        if node is None or _is_null(node):
            return out
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path or "(top level)", "must be a mapping")
            return out
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problem(
                    key_node,
                    _join(path, "<<"),
                    "YAML merge keys are not supported (shared route settings go in defaults:)",
                )
                continue
            try:
                key = str(self.value(key_node))
            except ValueError as e:
                self.problem(key_node, path or "(top level)", str(e))
                continue
            where = _join(path, key)
            if key not in keys:
                self.problem(key_node, where, f"unknown key (expected one of: {', '.join(keys)})")
            elif key in out:
                self.problem(key_node, where, "duplicate key")
            else:
                out[key] = value_node
        return out

    def get(
        self,
        nodes: Mapping[str, yaml.Node],
        key: str,
        path: str,
        default: T,
        convert: Callable[[Any], T],
    ) -> T:
        node = nodes.get(key)
        if node is None:
            return default
        where = _join(path, key)
        try:
            raw = self.value(node)
        except ValueError as e:
            self.problem(node, where, str(e))
            return default
        try:
            return convert(raw)
        except (ValueError, TypeError) as e:
            self.problem(node, where, f"{e}, got {_show(raw)}")
            return default

    def section(self, node: yaml.Node | None, path: str, base: D) -> D:
        """The mapping at ``node`` read over ``base``: each key written replaces its value."""
        nodes = self.mapping(node, path, _names(type(base)))
        out = self.fill(nodes, path, base)
        self.check_order(out, nodes, path)
        return out

    def check_order(self, section: object, nodes: Mapping[str, yaml.Node], path: str) -> None:
        """A section's ORDERED pair of durations, low <= high, where either is written."""
        pair: tuple[str, str] | None = getattr(type(section), "ORDERED", None)
        if pair is None:
            return
        low, high = pair
        if getattr(section, low) <= getattr(section, high):
            return
        if low in nodes:
            self.problem(nodes[low], _join(path, low), f"must not exceed {high}")
        elif high in nodes:  # only high is written, below low's value: blame the line there is
            shown = format_duration(getattr(section, low))
            self.problem(nodes[high], _join(path, high), f"must not be less than {low} ({shown})")

    def fill(self, nodes: Mapping[str, yaml.Node], path: str, base: D) -> D:
        """``base`` with the keys of its class that ``nodes`` holds, each converted."""
        changes: dict[str, Any] = {}
        for key in _keys(type(base)):
            kind, own = key.kind, key.fields[0]
            if isinstance(kind, _Section) and kind.inline:
                changes[own] = self.fill(nodes, path, getattr(base, own))
            elif isinstance(kind, _Section):
                changes[own] = self.section(
                    nodes.get(key.name), _join(path, key.name), getattr(base, own)
                )
            elif isinstance(kind, _Value) and kind.also:
                default = tuple(getattr(base, f) for f in key.fields)
                values = self.get(nodes, key.name, path, default, kind.convert)
                changes.update(zip(key.fields, values, strict=True))
            elif isinstance(kind, _Value):
                changes[own] = self.get(nodes, key.name, path, getattr(base, own), kind.convert)
        return dataclasses.replace(base, **changes)

    # the sections whose keys need more than their fields say

    def config(self, root: yaml.Node | None) -> Config:
        top = self.mapping(root, "", _names(Config))
        config = self.fill(top, "", Config())
        return dataclasses.replace(
            config, routes=tuple(self.routes(top.get("routes"), config.defaults))
        )

    def routes(self, node: yaml.Node | None, defaults: RouteSettings) -> Iterator[RouteConfig]:
        if node is None or _is_null(node):
            return
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, "routes", "must be a list")
            return
        for i, item in enumerate(node.value):
            if _is_null(item):  # (a stray "-": a route lost, not an optional section)
                self.problem(
                    item, f"routes[{i}]", "is empty: a route is a mapping (listen, service)"
                )
                continue
            route = self.route(item, f"routes[{i}]", defaults)
            if route is not None:
                yield route

    def route(self, node: yaml.Node, path: str, defaults: RouteSettings) -> RouteConfig | None:
        nodes = self.mapping(node, path, _names(RouteConfig))
        if not isinstance(node, yaml.MappingNode):
            return None
        for required in ("listen", "service"):
            if required not in nodes:
                self.problem(node, f"{path}.{required}", "is required")
        route = self.fill(nodes, path, RouteConfig(settings=defaults))
        self.check_exposure(route, nodes.get("listen"), f"{path}.listen")
        if isinstance(route.port, str) and is_ip(route.service):
            self.problem(
                nodes.get("port"), f"{path}.port", "a port name needs a DNS name as service (SRV)"
            )
        if "listen" not in nodes or "service" not in nodes:
            return None
        self.route_origins.append(
            _Origin(
                path, self.at(nodes["listen"]), self.at(nodes.get("name", node)), "name" in nodes
            )
        )
        return route

    def quick_route(self, spec: str, where: str, defaults: RouteSettings) -> RouteConfig | None:
        m = _QUICK_ROUTE.match(spec.strip())
        if m is None:
            self.problems.append(
                f"{where}: expected [HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http], got {spec!r}"
            )
            return None
        host = (m["host"] or "127.0.0.1").strip("[]")
        host = "127.0.0.1" if host == "localhost" else host  # as a file's listen: accepts
        problems = []
        try:
            listen_port = _int_range(0, 65535)(int(m["listen"]))
            ipaddress.ip_address(host)
        except ValueError as e:
            problems.append(f"listen: {e}")
        service = m["service"]
        if not valid_service(service):
            problems.append(f"service: not a DNS name or IP address: {service!r}")
        elif is_ip(service) and m["port"] and not m["port"].isdigit():
            problems.append("port: a port name needs a DNS name as service (SRV)")
        port = _DEFAULT_PORT
        try:
            port = upstream_port(m["port"]) if m["port"] else _DEFAULT_PORT
        except ValueError as e:
            problems.append(f"port: {e}")
        protocol = m["protocol"] or "tcp"
        if protocol not in PROTOCOLS:
            problems.append(f"protocol: must be tcp or http, got {protocol!r}")
        if problems:
            self.problems.extend(f"{where}: {p} (in {spec!r})" for p in problems)
            return None
        self.route_origins.append(_Origin(where))
        # Naming a non-loopback host in a quick route is the explicit opt-in to expose it.
        return RouteConfig(
            name="",
            listen_host=host,
            listen_port=listen_port,
            service=service,
            port=port,
            protocol=protocol,
            expose=m["host"] is not None and not is_loopback(host),
            settings=defaults,
            quick=True,
        )

    def check_exposure(self, route: RouteConfig, node: yaml.Node | None, path: str) -> None:
        if not route.expose and not is_loopback(route.listen_host):
            self.problem(
                node,
                path,
                f"{route.listen} is not a loopback address; set expose: true to listen on it",
            )

    def check_listeners(self, config: Config) -> None:
        seen: dict[int, list[tuple[str, str]]] = {}
        claims = [("", "admin.listen", config.admin.host, config.admin.port)]
        claims += [
            (origin.listen_at, f"{origin.path}.listen", r.listen_host, r.listen_port)
            for origin, r in zip(self.route_origins, config.routes, strict=True)
        ]
        for at, who, host, port in claims:
            if port == 0:
                continue
            for other, other_host in seen.get(port, []):
                if host == other_host or _wildcard(host) or _wildcard(other_host):
                    address = join_host_port(host, port)
                    self.problems.append(f"{at}{who}: {address} is already used by {other}")
            seen.setdefault(port, []).append((who, host))
        names: dict[str, str] = {}
        for origin, r in zip(self.route_origins, config.routes, strict=True):
            if r.name in names:
                hint = "" if origin.named or r.quick else " (routes to one service need a name:)"
                self.problems.append(
                    f"{origin.name_at}{origin.path}.name: {r.name!r} is already the name of "
                    f"{names[r.name]}{hint}"
                )
            names.setdefault(r.name, origin.path)


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a route was written: its key path, and the ``file:line: `` of its listen and name."""

    path: str
    listen_at: str = ""
    name_at: str = ""
    named: bool = False  # the route wrote its name: key


def _apply_overrides(reader: _Reader, config: Config, overrides: Overrides) -> Config:
    if overrides.admin is not None:
        try:
            host, port = _listen_address(overrides.admin)
            config = dataclasses.replace(config, admin=AdminConfig(host, port))
        except ValueError as e:
            reader.problems.append(f"--admin: {e}, got {overrides.admin!r}")
    log = config.logging
    if overrides.log_level is not None:
        log = dataclasses.replace(log, level=overrides.log_level)
    if overrides.log_format is not None:
        log = dataclasses.replace(log, format=overrides.log_format)
    return dataclasses.replace(config, logging=log)


def _name_routes(routes: list[RouteConfig]) -> Iterator[RouteConfig]:
    """Name each unnamed route from its own fields, so adding a route renames no other.

    The name is the metric label: a file route's default is its service (SPEC.md); a quick
    route, which has no way to write a name, is ``service:listen_port``, unique per listener.
    Two file routes to one service without names clash, and check_listeners says so.
    """
    for r in routes:
        if r.name:
            yield r
        elif r.quick:
            yield dataclasses.replace(r, name=f"{r.service}:{r.listen_port}")
        else:
            yield dataclasses.replace(r, name=r.service)


def _line_of(problem: str) -> int:
    """Sort key: problems in file order, then those without a line (quick routes)."""
    m = re.match(r"^[^:]*:(\d+): ", problem)
    return int(m.group(1)) if m else 1 << 30


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
